// The direct convolution of the kept filters (conv_direct.cpp), conv_gather's path for maps of
// more than ftwt_dot::kMaxPositions output positions.
#pragma once

#include <torch/types.h>

#include <optional>

namespace ftwt_direct {

// Lanes of the vectors conv_direct runs rows of ow output columns in, or 0 where it does not.
int lanes(int64_t ow);

at::Tensor conv_direct(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out_idx,
                       const at::Tensor& in_idx, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                       int64_t pw, int64_t dh, int64_t dw, const std::optional<at::Tensor>& bias);

}  // namespace ftwt_direct
