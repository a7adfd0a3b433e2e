// Native CPU kernels of the sparse engine (float32), registered as operators in the ftwt
// namespace so that PyTorch's FlopCounterMode counts them (see _native.py).
//
// ftwt::gather_mm, a fused gather + matrix product:
//
//   y[j, p] = bias[O[j]] + sum_a sum_t weight[O[j], I[a] * taps + t] * cols[a * taps + t, p]
//
// computes the kept filters O of a convolution from its live input channels I without
// first copying the weight block W[O][:, I] out: each output row streams the chunks of its
// weight row that it needs. For layers with few output positions the weight traffic is the
// cost, and the copy that a gather + GEMM makes reads and writes that block once more.
// Also: ftwt::conv_gather (a direct convolution, conv_direct.cpp, or im2col + gather_mm),
// ftwt::gate_live (a unit's gate and live inputs) and ftwt::union_add (a residual add of two
// compact values), described below.

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

#include "checks.h"
#include "conv_direct.h"
#include "gather_dot.h"
#include "simd.h"

namespace {

using namespace ftwt_simd;

constexpr int kWide = kNV * kVec;  // positions of the widest tile

// JB output rows times NV vectors of positions, accumulated in registers over every (input, tap).
template <int JB, typename V, int NV>
inline void tile(const float* const* rows, const int64_t* __restrict in_off, int64_t n_in, int64_t taps,
                 const float* __restrict cols, int64_t positions, int64_t p0, const float* bias, float* __restrict y,
                 int64_t ldy) {
  constexpr int W = sizeof(V) / sizeof(float);
  V acc[JB][NV];
  for (int j = 0; j < JB; ++j)
    for (int v = 0; v < NV; ++v) acc[j][v] = V{} + bias[j];
  for (int64_t a = 0; a < n_in; ++a) {
    const int64_t off = in_off[a];
    const float* c = cols + a * taps * positions + p0;
    for (int64_t t = 0; t < taps; ++t, c += positions) {
      V cv[NV];
      for (int v = 0; v < NV; ++v) cv[v] = load<V>(c + W * v);
      for (int j = 0; j < JB; ++j) {
        const float w = rows[j][off + t];
        for (int v = 0; v < NV; ++v) acc[j][v] += w * cv[v];
      }
    }
  }
  for (int j = 0; j < JB; ++j)
    for (int v = 0; v < NV; ++v) store<V>(y + j * ldy + W * v, acc[j][v]);
}

// The last n < kVec positions: one vector V of cols per (input, tap) by masked loads (nothing
// read past the row's end), only the n positions stored. Scalar positions would each stream
// the whole weight block once more.
template <int JB, typename V>
inline void tile_rest(const float* const* rows, const int64_t* __restrict in_off, int64_t n_in, int64_t taps,
                      const float* __restrict cols, int64_t positions, int64_t p0, int n, const float* bias,
                      float* __restrict y, int64_t ldy) {
  V acc[JB];
  for (int j = 0; j < JB; ++j) acc[j] = V{} + bias[j];
  for (int64_t a = 0; a < n_in; ++a) {
    const int64_t off = in_off[a];
    const float* c = cols + a * taps * positions + p0;
    for (int64_t t = 0; t < taps; ++t, c += positions) {
      const V cv = load_first<V>(c, n);
      for (int j = 0; j < JB; ++j) acc[j] += rows[j][off + t] * cv;
    }
  }
  for (int j = 0; j < JB; ++j) std::memcpy(y + j * ldy, &acc[j], n * sizeof(float));
}

// Position tiles: kWide, one vector, then the rest (fewer than one vector) in one pass: half a
// vector exactly, else masked in a half or whole vector (half-width ops are faster on CPUs
// with fewer full-width FMA units).
enum Width { WFULL, WONE, WHALF, WREST_HALF, WREST };

struct PositionTile {
  int64_t p;
  Width width;
  int n;  // positions in the tile
};

std::vector<PositionTile> position_tiles(int64_t positions) {
  std::vector<PositionTile> tiles;
  int64_t p = 0;
  for (; p + kWide <= positions; p += kWide) tiles.push_back({p, WFULL, kWide});
  for (; p + kVec <= positions; p += kVec) tiles.push_back({p, WONE, kVec});
  const int rest = static_cast<int>(positions - p);
  if (rest == kVec / 2)
    tiles.push_back({p, WHALF, rest});
  else if (rest)
    tiles.push_back({p, rest < kVec / 2 ? WREST_HALF : WREST, rest});
  return tiles;
}

template <int JB>
void run_tile(const PositionTile& pt, const float* const* rows, const int64_t* in_off, int64_t n_in, int64_t taps,
              const float* cols, int64_t positions, const float* bias, float* y, int64_t ldy) {
  switch (pt.width) {
    case WFULL: tile<JB, VF, kNV>(rows, in_off, n_in, taps, cols, positions, pt.p, bias, y, ldy); break;
    case WONE: tile<JB, VF, 1>(rows, in_off, n_in, taps, cols, positions, pt.p, bias, y, ldy); break;
    case WHALF: tile<JB, VH, 1>(rows, in_off, n_in, taps, cols, positions, pt.p, bias, y, ldy); break;
    case WREST_HALF: tile_rest<JB, VH>(rows, in_off, n_in, taps, cols, positions, pt.p, pt.n, bias, y, ldy); break;
    case WREST: tile_rest<JB, VF>(rows, in_off, n_in, taps, cols, positions, pt.p, pt.n, bias, y, ldy); break;
  }
}

at::Tensor gather_mm(const at::Tensor& weight, const at::Tensor& cols, const at::Tensor& out_idx,
                     const at::Tensor& in_idx, int64_t taps, const std::optional<at::Tensor>& bias) {
  ftwt_checks::operands("gather_mm", weight, cols, out_idx, in_idx);
  TORCH_CHECK(taps >= 1 && cols.size(0) == in_idx.size(0) * taps, "gather_mm: cols must have |I| * taps rows");
  const int64_t n_out = out_idx.size(0), n_in = in_idx.size(0), positions = cols.size(1), row = weight.size(1);
  at::Tensor y = at::empty({n_out, positions}, cols.options());
  if (n_out == 0 || positions == 0) return y;
  // Row offsets of the live inputs, in a plain buffer: a tensor product here would be one more
  // dispatched op per call, on layers whose whole product takes microseconds.
  const at::Tensor ins = in_idx.contiguous();
  const int64_t* in_ch = ins.data_ptr<int64_t>();
  std::vector<int64_t> in_off(n_in);
  for (int64_t a = 0; a < n_in; ++a) in_off[a] = in_ch[a] * taps;
  const at::Tensor outs = out_idx.contiguous();
  const int64_t* o = outs.data_ptr<int64_t>();
  const int64_t* in = in_off.data();
  for (int64_t a = 0; a < n_in; ++a)
    TORCH_CHECK(in[a] >= 0 && in[a] + taps <= row, "gather_mm: input index out of range");
  ftwt_checks::filters("gather_mm", o, n_out, weight.size(0));
  const at::Tensor b = ftwt_checks::bias("gather_mm", bias, weight.size(0));
  const float* w = weight.data_ptr<float>();
  const float* c = cols.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  constexpr int JB = kJB;
  const int64_t row_blocks = (n_out + JB - 1) / JB;
  const auto tiles = position_tiles(positions);
  // Work items ordered position tile first: consecutive items share one tile of cols, which
  // stays in cache while the filters' weight rows stream past it.
  const int64_t items = row_blocks * static_cast<int64_t>(tiles.size());
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    const float* rows[JB];
    float bj[JB];
    for (int64_t item = begin; item < end; ++item) {
      const PositionTile& pt = tiles[item / row_blocks];
      const int64_t j0 = (item % row_blocks) * JB, nj = std::min<int64_t>(JB, n_out - j0);
      for (int j = 0; j < JB; ++j) {
        const int64_t jj = j0 + std::min<int64_t>(j, nj - 1);
        rows[j] = w + o[jj] * row;
        bj[j] = bp ? bp[o[jj]] : 0.f;
      }
      float* yj = yp + j0 * positions + pt.p;
      if (nj == JB) {
        run_tile<JB>(pt, rows, in, n_in, taps, c, positions, bj, yj, positions);
      } else {
        // A short last block of filters: a half or full tile with its last row repeated,
        // written to scratch, then its real rows copied (single rows would be load-bound).
        float scratch[JB * kWide];
        if (nj <= JB / 2)
          run_tile<JB / 2>(pt, rows, in, n_in, taps, c, positions, bj, scratch, kWide);
        else
          run_tile<JB>(pt, rows, in, n_in, taps, c, positions, bj, scratch, kWide);
        for (int64_t j = 0; j < nj; ++j) std::memcpy(yj + j * positions, scratch + j * kWide, pt.n * sizeof(float));
      }
    }
  });
  return y;
}

// ftwt::conv_gather: a convolution of the kept filters O over the live input channels I of x
// (N, |I|, H, W) with zero padding. Returns (|O|, N * H' * W'), positions ordered (n, y, x).
// A few positions: conv_dot; rows that fit conv_direct's vectors: conv_direct; else gather_mm
// on the im2col of x, built here in one pass (no padded copy of x, no Python-level ops).
// A strided 1x1 kernel first takes the rows and columns it reads and runs at stride 1.
at::Tensor conv_gather(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& out_idx,
                       const at::Tensor& in_idx, at::IntArrayRef kernel, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.scalar_type() == at::kFloat, "conv_gather: float32 (N, C, H, W) input");
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "conv_gather: 2-D kernel, stride, padding and dilation");
  TORCH_CHECK(x_in.size(1) == in_idx.size(0), "conv_gather: x must hold the |I| live input channels");
  const int64_t n = x_in.size(0), c = x_in.size(1), h = x_in.size(2), wd = x_in.size(3);
  const int64_t kh = kernel[0], kw = kernel[1], sh = stride[0], sw = stride[1];
  const int64_t ph = padding[0], pw = padding[1], dh = dilation[0], dw = dilation[1];
  const int64_t oh = (h + 2 * ph - dh * (kh - 1) - 1) / sh + 1, ow = (wd + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK(oh > 0 && ow > 0, "conv_gather: the kernel does not fit the input");
  if (kh == 1 && kw == 1 && ph == 0 && pw == 0 && (sh > 1 || sw > 1)) {
    // A strided 1x1 kernel reads every sh-th row and sw-th column only: take those first (a
    // quarter of the input at stride 2) and run it at stride 1, instead of padding every row
    // and column phase of the input for the strided direct convolution.
    const bool cl = !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor sub = x_in.slice(2, 0, h, sh).slice(3, 0, wd, sw).contiguous(
        cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
    const int64_t one[2] = {1, 1};
    return conv_gather(sub, weight, out_idx, in_idx, kernel, one, padding, dilation, bias);
  }
  const int64_t positions = n * oh * ow, plane = oh * ow;
  // conv_direct reads channels-last input in place; the other paths want NCHW.
  if (positions > ftwt_dot::kMaxPositions && ftwt_direct::lanes(ow) > 0 &&
      (x_in.is_contiguous() || x_in.is_contiguous(at::MemoryFormat::ChannelsLast)))
    return ftwt_direct::conv_direct(x_in, weight, out_idx, in_idx, kh, kw, sh, sw, ph, pw, dh, dw, bias);
  const at::Tensor x = x_in.contiguous();
  if (positions <= ftwt_dot::kMaxPositions)  // a few positions: vectors along the weight rows
    return ftwt_dot::conv_dot(x, weight, out_idx, in_idx, kh, kw, sh, sw, ph, pw, dh, dw, bias);
  at::Tensor cols = at::empty({c * kh * kw, positions}, x.options());
  const float* xp = x.data_ptr<float>();
  float* cp = cols.data_ptr<float>();
  // Rows of cols: (channel, tap). Split over threads only in chunks worth a thread's start.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(positions, 1));
  at::parallel_for(0, c * kh * kw, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t a = r / (kh * kw), i = (r / kw) % kh, j = r % kw;
      // Output columns whose input column ix = xx * sw - pw + j * dw lies inside the image.
      const int64_t shift = j * dw - pw;
      const int64_t lo = std::min<int64_t>(ow, shift >= 0 ? 0 : (-shift + sw - 1) / sw);
      const int64_t hi = std::max<int64_t>(lo, std::min<int64_t>(ow, wd - shift > 0 ? (wd - shift + sw - 1) / sw : 0));
      float* dst = cp + r * positions;
      for (int64_t b = 0; b < n; ++b) {
        const float* src = xp + (b * c + a) * h * wd;
        for (int64_t y = 0; y < oh; ++y) {
          float* d = dst + b * plane + y * ow;
          const int64_t iy = y * sh - ph + i * dh;
          if (iy < 0 || iy >= h) {
            std::fill(d, d + ow, 0.f);
            continue;
          }
          const float* srow = src + iy * wd + shift;
          std::fill(d, d + lo, 0.f);
          if (sw == 1) {
            std::memcpy(d + lo, srow + lo, (hi - lo) * sizeof(float));
          } else {
            for (int64_t xx = lo; xx < hi; ++xx) d[xx] = srow[xx * sw];
          }
          std::fill(d + hi, d + ow, 0.f);
        }
      }
    }
  });
  return gather_mm(weight, cols, out_idx, in_idx, kh * kw, bias);
}

// y (1, C_out) = w (C_out, c_in) z (1, c_in) + b. The gate's weight is read once per sample
// and used once, so this is bound by memory: split the rows over the intra-op threads
// (one-row products do not parallelize inside the BLAS).
at::Tensor gemv(const at::Tensor& w, const at::Tensor& z, const std::optional<at::Tensor>& b) {
  const int64_t n_out = w.size(0), n_in = w.size(1);
  at::Tensor y = at::empty({1, n_out}, z.options());
  at::Tensor bias;
  if (b.has_value() && b->defined()) bias = b->contiguous();
  const float* wp = w.data_ptr<float>();
  const float* zp = z.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n_out, 64, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const float* row = wp + o * n_in;
      v8 acc{};
      int64_t i = 0;
      for (; i + 8 <= n_in; i += 8) acc += load<v8>(row + i) * load<v8>(zp + i);
      float sum = 0.f;
      for (int k = 0; k < 8; ++k) sum += acc[k];
      for (; i < n_in; ++i) sum += row[i] * zp[i];
      yp[o] = bp ? sum + bp[o] : sum;
    }
  });
  return y;
}

// A gate with pool 1 on one sample's compact, non-negative input, and the input's live channels.
//
// data: (1, k, H, W), the stored channels idx (k,) of a c_in-wide input, every value >= 0.
// A channel's sum is 0 exactly when the channel is all zero, and sum / (H * W) is the mean
// that adaptive_avg_pool2d gives the gate, so one reduction serves both. Returns the gate's
// logits (1, C_out), the filters it keeps (sigmoid(logit) > decision, ascending) and the
// positions in data of the live channels (ascending); what the Python engine computes in
// ten small ops, in one call.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_live(const at::Tensor& data_in, const at::Tensor& idx, int64_t c_in,
                                                         const at::Tensor& gate_w, const std::optional<at::Tensor>& gate_b,
                                                         bool softmax, double decision) {
  TORCH_CHECK(data_in.dim() == 4 && data_in.size(0) == 1, "gate_live: one (1, k, H, W) sample");
  TORCH_CHECK(data_in.scalar_type() == at::kFloat && gate_w.scalar_type() == at::kFloat, "gate_live: float32 only");
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 1 && idx.size(0) == data_in.size(1),
              "gate_live: int64 idx of k channels");
  TORCH_CHECK(gate_w.dim() == 2 && gate_w.size(1) == c_in, "gate_live: gate weight must be (C_out, c_in)");
  // Channels-last input (from oneDNN's convolutions) is read in place: a copy to NCHW would
  // cost more than the gate.
  const bool channels_last = !data_in.is_contiguous() && data_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor data = channels_last ? data_in : data_in.contiguous();
  const at::Tensor ids = idx.contiguous();
  const int64_t k = data.size(1), area = data.size(2) * data.size(3);
  const float* d = data.data_ptr<float>();
  const int64_t* id = ids.data_ptr<int64_t>();
  std::vector<float> sums(k, 0.f);
  if (channels_last) {
    for (int64_t p = 0; p < area; ++p) {
      const float* row = d + p * k;
      for (int64_t a = 0; a < k; ++a) sums[a] += row[a];
    }
  } else {
    for (int64_t a = 0; a < k; ++a) {
      const float* ch = d + a * area;
      v8 acc{};
      int64_t i = 0;
      for (; i + 8 <= area; i += 8) acc += load<v8>(ch + i);
      float sum = 0.f;
      for (int q = 0; q < 8; ++q) sum += acc[q];
      for (; i < area; ++i) sum += ch[i];
      sums[a] = sum;
    }
  }
  at::Tensor pooled = at::zeros({1, c_in}, data.options());
  float* z = pooled.data_ptr<float>();
  std::vector<int64_t> live;
  live.reserve(k);
  for (int64_t a = 0; a < k; ++a) {
    TORCH_CHECK(id[a] >= 0 && id[a] < c_in, "gate_live: channel index out of range");
    z[id[a]] = sums[a] / static_cast<float>(area);  // the mean that adaptive_avg_pool2d gives the gate
    // For values >= 0 the sum is 0 exactly when every value is; NaN != 0, so a NaN channel stays.
    if (sums[a] != 0.0f) live.push_back(a);
  }
  if (softmax) pooled = pooled.softmax(1);
  const at::Tensor logits = gemv(gate_w.contiguous(), pooled, gate_b);
  const float* lg = logits.data_ptr<float>();
  const int64_t n_out = gate_w.size(0);
  std::vector<int64_t> keep;
  keep.reserve(n_out);
  const float threshold = static_cast<float>(decision);
  for (int64_t o = 0; o < n_out; ++o)
    if (1.0f / (1.0f + std::exp(-lg[o])) > threshold) keep.push_back(o);  // sigmoid(logit) > decision
  auto to_tensor = [&](const std::vector<int64_t>& v) {
    at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, ids.options());
    std::memcpy(t.data_ptr<int64_t>(), v.data(), v.size() * sizeof(int64_t));
    return t;
  };
  return {logits, to_tensor(keep), to_tensor(live)};
}

// ftwt::union_add: a + b for two compact activations holding channels a_idx and b_idx
// (ascending) of one tensor: the result holds the union of the channels, ascending. Each
// value is a + b, a or b, the same float32 sums as adding the full tensors.
std::tuple<at::Tensor, at::Tensor> union_add(const at::Tensor& a_in, const at::Tensor& a_idx, const at::Tensor& b_in,
                                             const at::Tensor& b_idx) {
  TORCH_CHECK(a_in.dim() >= 2 && b_in.dim() == a_in.dim() && a_in.scalar_type() == at::kFloat &&
                  b_in.scalar_type() == at::kFloat, "union_add: float32 (N, k, ...) values");
  TORCH_CHECK(a_in.size(0) == b_in.size(0) && a_in.size(1) == a_idx.size(0) && b_in.size(1) == b_idx.size(0),
              "union_add: each value needs one index per stored channel");
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const at::Tensor ai = a_idx.contiguous(), bi = b_idx.contiguous();
  const int64_t n = a.size(0), ka = a.size(1), kb = b.size(1);
  const int64_t plane = ka ? a.numel() / (n * ka) : (kb ? b.numel() / (n * kb) : 0);
  TORCH_CHECK(ka == 0 || kb == 0 || plane == b.numel() / (n * kb), "union_add: values of different shapes");
  const int64_t* ap = ai.data_ptr<int64_t>();
  const int64_t* bp = bi.data_ptr<int64_t>();
  // Merge the two ascending index lists: (channel, position in a or -1, position in b or -1).
  std::vector<int64_t> idx, from_a, from_b;
  idx.reserve(ka + kb);
  int64_t i = 0, j = 0;
  while (i < ka || j < kb) {
    if (j >= kb || (i < ka && ap[i] < bp[j])) {
      idx.push_back(ap[i]); from_a.push_back(i++); from_b.push_back(-1);
    } else if (i >= ka || bp[j] < ap[i]) {
      idx.push_back(bp[j]); from_a.push_back(-1); from_b.push_back(j++);
    } else {
      idx.push_back(ap[i]); from_a.push_back(i++); from_b.push_back(j++);
    }
  }
  const int64_t ku = static_cast<int64_t>(idx.size());
  std::vector<int64_t> shape = a.sizes().vec();
  shape[1] = ku;
  at::Tensor out = at::empty(shape, a.options());
  const float* ad = a.data_ptr<float>();
  const float* bd = b.data_ptr<float>();
  float* od = out.data_ptr<float>();
  at::parallel_for(0, n * ku, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t s = r / ku, c = r % ku;
      float* dst = od + r * plane;
      const float* x = from_a[c] >= 0 ? ad + (s * ka + from_a[c]) * plane : nullptr;
      const float* y = from_b[c] >= 0 ? bd + (s * kb + from_b[c]) * plane : nullptr;
      if (x && y) {
        for (int64_t q = 0; q < plane; ++q) dst[q] = x[q] + y[q];
      } else {
        std::memcpy(dst, x ? x : y, plane * sizeof(float));
      }
    }
  });
  at::Tensor idx_t = at::empty({ku}, ai.options());
  std::memcpy(idx_t.data_ptr<int64_t>(), idx.data(), ku * sizeof(int64_t));
  return {out, idx_t};
}

}  // namespace

TORCH_LIBRARY(ftwt, m) {
  m.def("gather_mm(Tensor weight, Tensor cols, Tensor out_idx, Tensor in_idx, int taps, Tensor? bias) -> Tensor");
  m.def("conv_gather(Tensor x, Tensor weight, Tensor out_idx, Tensor in_idx, int[] kernel, int[] stride,"
        " int[] padding, int[] dilation, Tensor? bias) -> Tensor");
  m.def("union_add(Tensor a, Tensor a_idx, Tensor b, Tensor b_idx) -> (Tensor, Tensor)");
  m.def("gate_live(Tensor data, Tensor idx, int c_in, Tensor gate_w, Tensor? gate_b, bool softmax, float decision)"
        " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ftwt, CPU, m) {
  m.impl("gather_mm", &gather_mm);
  m.impl("conv_gather", &conv_gather);
  m.impl("gate_live", &gate_live);
  m.impl("union_add", &union_add);
}
