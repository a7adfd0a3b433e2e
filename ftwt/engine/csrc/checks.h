// Argument checks shared by the gathered products (gather_mm, gather_dot): the operands' types
// and layout, the kept filters' indices and the bias, with the operator's name in each message.
#pragma once

#include <torch/types.h>

#include <optional>

namespace ftwt_checks {

inline void operands(const char* op, const at::Tensor& weight, const at::Tensor& cols, const at::Tensor& out_idx,
                     const at::Tensor& in_idx) {
  TORCH_CHECK(weight.dim() == 2 && cols.dim() == 2 && out_idx.dim() == 1 && in_idx.dim() == 1, op,
              ": expected a 2-D weight and cols and 1-D indices");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && cols.scalar_type() == at::kFloat, op, ": float32 only");
  TORCH_CHECK(out_idx.scalar_type() == at::kLong && in_idx.scalar_type() == at::kLong, op, ": int64 indices");
  TORCH_CHECK(weight.is_contiguous() && cols.is_contiguous(), op, ": contiguous weight and cols");
}

inline void filters(const char* op, const int64_t* o, int64_t n_out, int64_t c_out) {
  for (int64_t j = 0; j < n_out; ++j) TORCH_CHECK(o[j] >= 0 && o[j] < c_out, op, ": output index out of range");
}

// The bias, contiguous, or an undefined tensor when there is none.
inline at::Tensor bias(const char* op, const std::optional<at::Tensor>& b, int64_t c_out) {
  if (!b.has_value() || !b->defined()) return at::Tensor();
  TORCH_CHECK(b->scalar_type() == at::kFloat && b->dim() == 1 && b->size(0) == c_out, op,
              ": bias must be float32 (C_out,)");
  return b->contiguous();
}

}  // namespace ftwt_checks
