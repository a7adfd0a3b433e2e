// ftwt::gather_dot and the small-map convolution built on it (gather_dot.cpp).
#pragma once

#include <torch/types.h>

#include <optional>

namespace ftwt_dot {

// Up to this many output positions conv_gather runs as conv_dot (see gather_dot.cpp).
constexpr int64_t kMaxPositions = 4;

at::Tensor gather_dot(const at::Tensor& weight, const at::Tensor& cols_t, const at::Tensor& out_idx,
                      const at::Tensor& in_idx, int64_t taps, const std::optional<at::Tensor>& bias);

at::Tensor conv_dot(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out_idx, const at::Tensor& in_idx,
                    int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                    const std::optional<at::Tensor>& bias);

}  // namespace ftwt_dot
