// ftwt::gather_dot: the kept filters of a convolution on a map of a few positions.
//
//   y[j, p] = bias[O[j]] + sum_a sum_t weight[O[j], I[a] * taps + t] * cols_t[p, a * taps + t]
//
// is gather_mm with the positions as rows of cols_t. With a handful of positions (VGG's 2x2
// maps at batch 1) gather_mm's tiles, vectors of positions, would be mostly empty and
// each weight is used only a few times: the product is bound by reading the weight block.
// Here vectors run along each weight row instead. Consecutive live input channels are one
// contiguous run of weights (and of cols_t), so a row is read in runs of whole vectors, a
// short masked load ending each run, and each weight read serves every position of the tile.

#include "gather_dot.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "simd.h"

namespace ftwt_dot {
namespace {

// Eight-float vectors where the ISA has them: runs are short (a few live channels of 9 taps),
// and the narrower vector wastes fewer lanes on each run's partial last vector.
#if defined(__AVX__)
typedef ftwt_simd::v8 VD;
#else
typedef ftwt_simd::VF VD;
#endif
constexpr int kDV = sizeof(VD) / sizeof(float);

struct Run {
  int64_t w, c, len;  // offsets in a weight row and in a cols_t row, length in floats
};

// Filters x positions per register tile: JB * PB accumulators, plus JB weights and PB cols.
constexpr int kPB = 4;
constexpr int kJB = ftwt_simd::kRegs >= 32 ? 4 : 2;

inline float sum_lanes(VD v) {
  float s = 0.f;
  for (int i = 0; i < kDV; ++i) s += v[i];
  return s;
}

template <int JB, int PB>
void tile(const float* const* w, const float* const* c, const std::vector<Run>& runs, const float* bias, float* y,
          int64_t ldy) {
  VD acc[JB][PB];
  for (int j = 0; j < JB; ++j)
    for (int p = 0; p < PB; ++p) acc[j][p] = VD{};
  for (const Run& r : runs) {
    int64_t off = 0;
    for (; off + kDV <= r.len; off += kDV) {
      VD cv[PB];
      for (int p = 0; p < PB; ++p) cv[p] = ftwt_simd::load<VD>(c[p] + r.c + off);
      for (int j = 0; j < JB; ++j) {
        const VD wv = ftwt_simd::load<VD>(w[j] + r.w + off);
        for (int p = 0; p < PB; ++p) acc[j][p] += wv * cv[p];
      }
    }
    if (off < r.len) {  // the run's last, partial vector: masked loads, nothing read past it
      const int n = static_cast<int>(r.len - off);
      VD cv[PB];
      for (int p = 0; p < PB; ++p) cv[p] = ftwt_simd::load_first<VD>(c[p] + r.c + off, n);
      for (int j = 0; j < JB; ++j) {
        const VD wv = ftwt_simd::load_first<VD>(w[j] + r.w + off, n);
        for (int p = 0; p < PB; ++p) acc[j][p] += wv * cv[p];
      }
    }
  }
  for (int j = 0; j < JB; ++j)
    for (int p = 0; p < PB; ++p) y[j * ldy + p] = bias[j] + sum_lanes(acc[j][p]);
}

template <int JB>
void run_tile(int pb, const float* const* w, const float* const* c, const std::vector<Run>& runs, const float* bias,
              float* y, int64_t ldy) {
  switch (pb) {
    case 1: tile<JB, 1>(w, c, runs, bias, y, ldy); break;
    case 2: tile<JB, 2>(w, c, runs, bias, y, ldy); break;
    case 3: tile<JB, 3>(w, c, runs, bias, y, ldy); break;
    default: tile<JB, kPB>(w, c, runs, bias, y, ldy); break;
  }
}

}  // namespace

at::Tensor gather_dot(const at::Tensor& weight, const at::Tensor& cols_t, const at::Tensor& out_idx,
                      const at::Tensor& in_idx, int64_t taps, const std::optional<at::Tensor>& bias) {
  ftwt_checks::operands("gather_dot", weight, cols_t, out_idx, in_idx);
  TORCH_CHECK(taps >= 1 && cols_t.size(1) == in_idx.size(0) * taps, "gather_dot: cols_t must have |I| * taps columns");
  const int64_t n_out = out_idx.size(0), n_in = in_idx.size(0), positions = cols_t.size(0), row = weight.size(1);
  at::Tensor y = at::empty({n_out, positions}, cols_t.options());
  if (n_out == 0 || positions == 0) return y;
  const at::Tensor ins = in_idx.contiguous(), outs = out_idx.contiguous();
  const int64_t* in = ins.data_ptr<int64_t>();
  const int64_t* o = outs.data_ptr<int64_t>();
  std::vector<Run> runs;
  for (int64_t a = 0; a < n_in; ++a) {
    TORCH_CHECK(in[a] >= 0 && (in[a] + 1) * taps <= row, "gather_dot: input index out of range");
    if (!runs.empty() && in[a] == in[a - 1] + 1)
      runs.back().len += taps;
    else
      runs.push_back({in[a] * taps, a * taps, taps});
  }
  ftwt_checks::filters("gather_dot", o, n_out, weight.size(0));
  const at::Tensor b = ftwt_checks::bias("gather_dot", bias, weight.size(0));
  const float* wp = weight.data_ptr<float>();
  const float* cp = cols_t.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (n_out + kJB - 1) / kJB, k = cols_t.size(1);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    const float* w[kJB];
    const float* c[kPB];
    float bj[kJB];
    float scratch[kJB * kPB];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t j0 = blk * kJB, nj = std::min<int64_t>(kJB, n_out - j0);
      for (int j = 0; j < kJB; ++j) {  // a short last block repeats its last filter, not stored
        const int64_t jj = o[j0 + std::min<int64_t>(j, nj - 1)];
        w[j] = wp + jj * row;
        bj[j] = bp ? bp[jj] : 0.f;
      }
      for (int64_t p0 = 0; p0 < positions; p0 += kPB) {
        const int pb = static_cast<int>(std::min<int64_t>(kPB, positions - p0));
        for (int p = 0; p < pb; ++p) c[p] = cp + (p0 + p) * k;
        run_tile<kJB>(pb, w, c, runs, bj, scratch, kPB);
        for (int64_t j = 0; j < nj; ++j)
          for (int p = 0; p < pb; ++p) yp[(j0 + j) * positions + p0 + p] = scratch[j * kPB + p];
      }
    }
  });
  return y;
}

// The convolution (zero padding) of x (N, |I|, H, W) by the kept filters O, through gather_dot:
// cols_t (N * H' * W', |I| * kh * kw) is the transposed im2col, small at these map sizes.
at::Tensor conv_dot(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out_idx, const at::Tensor& in_idx,
                    int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                    const std::optional<at::Tensor>& bias) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), wd = x.size(3);
  const int64_t oh = (h + 2 * ph - dh * (kh - 1) - 1) / sh + 1, ow = (wd + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  const int64_t taps = kh * kw, k = c * taps;
  at::Tensor cols_t = at::empty({n * oh * ow, k}, x.options());
  const float* xp = x.data_ptr<float>();
  float* cp = cols_t.data_ptr<float>();
  for (int64_t b = 0; b < n; ++b)
    for (int64_t y = 0; y < oh; ++y)
      for (int64_t xx = 0; xx < ow; ++xx) {
        float* d = cp + ((b * oh + y) * ow + xx) * k;
        for (int64_t a = 0; a < c; ++a) {
          const float* src = xp + (b * c + a) * h * wd;
          for (int64_t i = 0; i < kh; ++i) {
            const int64_t iy = y * sh - ph + i * dh;
            for (int64_t j = 0; j < kw; ++j, ++d) {
              const int64_t ix = xx * sw - pw + j * dw;
              *d = iy >= 0 && iy < h && ix >= 0 && ix < wd ? src[iy * wd + ix] : 0.f;
            }
          }
        }
      }
  return gather_dot(weight, cols_t, out_idx, in_idx, taps, bias);
}

}  // namespace ftwt_dot

TORCH_LIBRARY_FRAGMENT(ftwt, m) {
  m.def("gather_dot(Tensor weight, Tensor cols_t, Tensor out_idx, Tensor in_idx, int taps, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(ftwt, CPU, m) { m.impl("gather_dot", &ftwt_dot::gather_dot); }
