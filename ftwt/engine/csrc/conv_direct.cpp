// ftwt_direct::conv_direct: the kept filters O of a convolution over the live input channels I,
// read straight from a zero-padded copy of the input instead of an im2col matrix.
//
//   y[j, (n, oy, ox)] = bias[O[j]] + sum_a sum_(i, k) weight[O[j], (I[a], i, k)] * xpad[n, a, oy*sh + i*dh, ox*sw + k*dw]
//
// im2col writes every input value once per tap (9 times for 3x3) and the product reads it back;
// on ResNet-56's maps that traffic costs about as much as the multiply-adds. Here one vector
// holds consecutive output columns of one output row (a segment), and for each (input, tap) it
// is one unaligned load from the padded copy. Strided convolutions store each padded row split
// by column phase (column c at phase c % sw, index c / sw), so that the columns one output
// row reads at a tap are consecutive too.

#include "conv_direct.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "checks.h"
#include "simd.h"

namespace ftwt_direct {
namespace {

using namespace ftwt_simd;

// The register tile: kDJB filters times kDNV segments. With 32 registers a third segment fits
// (8 x 3 accumulators + 3 + 1) and each weight broadcast serves more positions; with 16 the
// shared gather_mm tile is the widest that fits.
#if defined(__AVX512F__) || defined(__aarch64__)
constexpr int kDJB = 8, kDNV = 3;
#else
constexpr int kDJB = kJB, kDNV = kNV;
#endif
static_assert(kDJB * kDNV + kDNV + 1 <= kRegs, "the register tile must fit the register file");

// A segment: output columns of one output row, or with PAIR of two rows, one in each half of the
// vector (rows shorter than half a vector).
struct Segment {
  int64_t in[2], out[2];  // offsets in a padded input channel and in an output row, per half
  int len;                // output columns per row, at most the lanes a row gets
};

template <typename V, bool PAIR>
inline V load_segment(const float* p, const Segment& s) {
  if constexpr (!PAIR) {
    return load<V>(p + s.in[0]);
  } else {
    // One register from two half loads (a copy through memory would stall on store forwarding).
    const VH lo = load<VH>(p + s.in[0]), hi = load<VH>(p + s.in[1]);
#if defined(__AVX512F__)
    return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#elif defined(__AVX__)
    return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7);
#else
    return __builtin_shufflevector(lo, hi, 0, 1, 2, 3);
#endif
  }
}

template <typename V, bool PAIR>
inline void store_segment(float* y, const Segment& s, const V& v) {
  constexpr int W = sizeof(V) / sizeof(float);
  if constexpr (!PAIR) {
    if (s.len == W)
      store<V>(y + s.out[0], v);
    else  // a row's last columns: a full store would overwrite the next row's first ones
      std::memcpy(y + s.out[0], &v, s.len * sizeof(float));
  } else {
    std::memcpy(y + s.out[0], &v, s.len * sizeof(float));
    if (s.out[1] >= 0) std::memcpy(y + s.out[1], reinterpret_cast<const float*>(&v) + W / 2, s.len * sizeof(float));
  }
}

// Where a tile reads its filters' weights: in place (rows[j], at the live inputs' offsets), or
// packed by pack_block, the tile's filters side by side for each (input, tap).
struct Weights {
  const float* const* rows;
  const int64_t* w_off;
  const float* packed;  // non-null: packed (kDJB floats per (input, tap))
};

// JB filters times NV segments, accumulated in registers over every (input, tap). K3 = 1 or 2:
// a 3x3 kernel at that stride and dilation 1, its taps unrolled at offsets fixed but for the
// row length and phase width, so that each load and weight read is one instruction with no
// offset looked up; K3 = 0: any kernel, offsets from tap_off.
template <int JB, typename V, int NV, bool PAIR, bool PACKED, int K3>
inline void tile(const Weights& wt, float* const* yrows, int64_t n_in, const int64_t* __restrict tap_off, int64_t taps,
                 int64_t row, int64_t pcols, const float* __restrict xpad, int64_t plane, const Segment* seg, const float* bias) {
  V acc[JB][NV];
  for (int j = 0; j < JB; ++j)
    for (int v = 0; v < NV; ++v) acc[j][v] = V{} + bias[j];
  Segment sg[NV];
  for (int v = 0; v < NV; ++v) sg[v] = seg[v];
  const float* __restrict wp = wt.packed;
  const auto step = [&](const float* xt, int64_t off, int64_t t) {
    V cv[NV];
    for (int v = 0; v < NV; ++v) cv[v] = load_segment<V, PAIR>(xt, sg[v]);
    for (int j = 0; j < JB; ++j) {
      const float w = PACKED ? wp[t * kDJB + j] : wt.rows[j][off + t];
      for (int v = 0; v < NV; ++v) acc[j][v] += w * cv[v];
    }
  };
  for (int64_t a = 0; a < n_in; ++a) {
    const int64_t off = PACKED ? 0 : wt.w_off[a];
    const float* xa = xpad + a * plane;
    if constexpr (K3) {
#pragma GCC unroll 9
      for (int t = 0; t < 9; ++t) {
        // stride 2: columns split by phase, tap column k at phase k % 2, index k / 2
        const int64_t col = K3 == 1 ? t % 3 : (t % 3 == 1 ? pcols : (t % 3) / 2);
        step(xa + (t / 3) * row + col, off, t);
      }
      if constexpr (PACKED) wp += 9 * kDJB;
    } else {
      for (int64_t t = 0; t < taps; ++t) step(xa + tap_off[t], off, t);
      if constexpr (PACKED) wp += taps * kDJB;
    }
  }
  for (int j = 0; j < JB; ++j)
    for (int v = 0; v < NV; ++v) store_segment<V, PAIR>(yrows[j], sg[v], acc[j][v]);
}

struct Geometry {
  int64_t n, c, h, w, oh, ow, sh, sw, ph, pw, kh, dh;
  int64_t pcols, row;  // padded columns per phase, floats per padded row
  bool channels_last;  // x in (N, H, W, C) order
};

// The padded rows that output rows [y0, y1) of one image read, for every channel (phase-split
// for sw > 1), plus a zeroed tail that a segment's unused lanes may read. Returns floats per channel.
int64_t pad_band(const float* x, const Geometry& g, int64_t y0, int64_t y1, std::unique_ptr<float[]>& buf,
                 int64_t& capacity) {
  const int64_t r0 = y0 * g.sh, rows = (y1 - 1) * g.sh + (g.kh - 1) * g.dh + 1 - r0, plane = rows * g.row;
  if (g.c * plane + kVec > capacity) {
    capacity = g.c * plane + kVec;
    buf.reset(new float[capacity]);  // uninitialized: every float is written below
  }
  float* bp = buf.get();
  std::fill(bp + g.c * plane, bp + g.c * plane + kVec, 0.f);
  if (g.channels_last) {
    // (H, W, C) input, as oneDNN's convolutions leave it: read each position's channels in order
    // and scatter them to the channels' padded rows (a copy to NCHW first would be one more pass).
    std::fill(bp, bp + g.c * plane, 0.f);
    for (int64_t r = std::max<int64_t>(r0, g.ph); r < std::min<int64_t>(r0 + rows, g.h + g.ph); ++r) {
      float* dst = bp + (r - r0) * g.row;
      const float* src = x + (r - g.ph) * g.w * g.c;
      for (int64_t ix = 0; ix < g.w; ++ix, src += g.c) {
        const int64_t col = ix + g.pw, off = (col % g.sw) * g.pcols + col / g.sw;
        for (int64_t a = 0; a < g.c; ++a) dst[a * plane + off] = src[a];
      }
    }
    return plane;
  }
  for (int64_t a = 0; a < g.c; ++a) {
    const float* src = x + a * g.h * g.w;
    float* dst = bp + a * plane;
    for (int64_t r = r0; r < r0 + rows; ++r, dst += g.row) {
      const int64_t iy = r - g.ph;
      if (iy < 0 || iy >= g.h) {
        std::fill(dst, dst + g.row, 0.f);
        continue;
      }
      const float* s = src + iy * g.w;
      if (g.sw == 1) {
        std::fill(dst, dst + g.pw, 0.f);
        std::memcpy(dst + g.pw, s, g.w * sizeof(float));
        std::fill(dst + g.pw + g.w, dst + g.row, 0.f);
        continue;
      }
      for (int64_t p = 0; p < g.sw; ++p) {
        // Phase p holds columns k * sw + p - pw; those inside the row in one loop without
        // branches (vectorized for stride 2), zeros on either side.
        float* d = dst + p * g.pcols;
        const int64_t k0 = std::min(g.pcols, std::max<int64_t>(0, (g.pw - p + g.sw - 1) / g.sw));
        const int64_t k1 = std::max(k0, std::min(g.pcols, (g.w - 1 + g.pw - p) / g.sw + 1));
        std::fill(d, d + k0, 0.f);
        std::fill(d + k1, d + g.pcols, 0.f);
        const float* sp = s + k0 * g.sw + p - g.pw;
        if (g.sw == 2)
          for (int64_t k = 0; k < k1 - k0; ++k) d[k0 + k] = sp[2 * k];
        else
          for (int64_t k = 0; k < k1 - k0; ++k) d[k0 + k] = sp[k * g.sw];
      }
    }
  }
  return plane;
}

// Segments of output rows [y0, y1) of image b; input offsets relative to the band's first row.
template <bool PAIR>
void band_segments(const Geometry& g, int64_t b, int64_t y0, int64_t y1, std::vector<Segment>& segs) {
  segs.clear();
  const int64_t out0 = b * g.oh * g.ow;
  if (!PAIR) {
    for (int64_t y = y0; y < y1; ++y)
      for (int64_t x0 = 0; x0 < g.ow; x0 += kVec) {
        const int64_t in = (y - y0) * g.sh * g.row + x0, out = out0 + y * g.ow + x0;
        segs.push_back({{in, in}, {out, -1}, static_cast<int>(std::min<int64_t>(kVec, g.ow - x0))});
      }
    return;
  }
  for (int64_t y = y0; y < y1; y += 2) {
    const bool odd = y + 1 == y1;  // the last row alone: its other half is not stored
    const int64_t in = (y - y0) * g.sh * g.row, in2 = odd ? in : in + g.sh * g.row;
    segs.push_back({{in, in2}, {out0 + y * g.ow, odd ? -1 : out0 + (y + 1) * g.ow}, static_cast<int>(g.ow)});
  }
}

struct Filters {
  const float* w;
  int64_t row_len;
  const int64_t* o;
  int64_t n_out;
  const float* bias;
  const std::vector<int64_t>& w_off;
  const std::vector<int64_t>& tap_off;
  int64_t row, pcols;  // floats per padded row, columns per phase
  int k3;              // 3x3 kernel, dilation 1, at this stride (1 or 2); else 0
};

template <int JB, int NV, bool PAIR, bool PACKED>
void tile_n(const Weights& wt, float* const* yrows, const Filters& f, int64_t n_in, const float* xpad, int64_t plane,
            const Segment* sg, int ns, const float* bj) {
  const int64_t taps = static_cast<int64_t>(f.tap_off.size());
  if constexpr (NV > 1) {
    if (ns < NV) return tile_n<JB, NV - 1, PAIR, PACKED>(wt, yrows, f, n_in, xpad, plane, sg, ns, bj);
  }
  const int64_t* to = f.tap_off.data();
  if (f.k3 == 1)
    tile<JB, VF, NV, PAIR, PACKED, 1>(wt, yrows, n_in, to, taps, f.row, f.pcols, xpad, plane, sg, bj);
  else if (f.k3 == 2)
    tile<JB, VF, NV, PAIR, PACKED, 2>(wt, yrows, n_in, to, taps, f.row, f.pcols, xpad, plane, sg, bj);
  else
    tile<JB, VF, NV, PAIR, PACKED, 0>(wt, yrows, n_in, to, taps, f.row, f.pcols, xpad, plane, sg, bj);
}

// The weights of filters rows[0..kDJB) at the live inputs, (input, tap) major, the filters side by side.
void pack_block(const float* const* rows, const std::vector<int64_t>& w_off, int64_t taps, float* dst) {
  const int64_t n_in = static_cast<int64_t>(w_off.size());
  for (int j = 0; j < kDJB; ++j)
    for (int64_t a = 0; a < n_in; ++a) {
      const float* src = rows[j] + w_off[a];
      float* d = dst + a * taps * kDJB + j;
      for (int64_t t = 0; t < taps; ++t) d[t * kDJB] = src[t];
    }
}

// Output positions per band from which a block's weights are packed first: the inner loop then
// reads one pointer in order instead of a row pointer per filter (fewer address registers, a
// stream the prefetcher follows), and each weight serves enough positions that the copy is
// small beside the multiply-adds. On fewer positions the copy costs more than it saves.
constexpr int64_t kPackPositions = 512;

// Filter blocks [jb0, jb1) on every segment of one band.
template <bool PAIR>
void band_filters(const Filters& f, int64_t n_in, const float* xpad, int64_t plane, const std::vector<Segment>& segs,
                  int64_t jb0, int64_t jb1, float* yp, int64_t positions, int64_t band_positions) {
  const float* rows[kDJB];
  float* yrows[kDJB];
  float bj[kDJB];
  const int64_t n_seg = static_cast<int64_t>(segs.size()), seg_tiles = (n_seg + kDNV - 1) / kDNV;
  const int64_t blocks = jb1 - jb0, taps = static_cast<int64_t>(f.tap_off.size());
  // The smaller operand is read again for each tile of the larger, so that it stays in cache:
  // segment tiles outer when the weight rows fit (ResNet-56, VGG), filter blocks outer when the
  // weights are the larger (ResNet-18's last stages: megabytes, read once from memory).
  const bool weights_outer = f.n_out * n_in * taps > n_in * plane;
  const bool pack = band_positions >= kPackPositions;
  static thread_local std::vector<float> packed;
  if (pack) packed.resize((weights_outer ? 1 : blocks) * n_in * taps * kDJB);
  int64_t packed_jb = -1;
  for (int64_t item = 0; item < seg_tiles * blocks; ++item) {
    const int64_t st = weights_outer ? item % seg_tiles : item / blocks;
    const int64_t jb = jb0 + (weights_outer ? item / seg_tiles : item % blocks);
    const int64_t s0 = st * kDNV;
    const int ns = static_cast<int>(std::min<int64_t>(kDNV, n_seg - s0));
    const int64_t j0 = jb * kDJB, nj = std::min<int64_t>(kDJB, f.n_out - j0);
    // A short last block repeats its last filter: the same values stored twice to one row.
    for (int j = 0; j < kDJB; ++j) {
      const int64_t jj = j0 + std::min<int64_t>(j, nj - 1);
      rows[j] = f.w + f.o[jj] * f.row_len;
      yrows[j] = yp + jj * positions;
      bj[j] = f.bias ? f.bias[f.o[jj]] : 0.f;
    }
    Weights wt{rows, f.w_off.data(), nullptr};
    if (pack) {
      float* dst = packed.data() + (weights_outer ? 0 : (jb - jb0) * n_in * taps * kDJB);
      if (weights_outer ? jb != packed_jb : st == 0) pack_block(rows, f.w_off, taps, dst);
      packed_jb = jb;
      wt.packed = dst;
    }
    const Segment* sg = segs.data() + s0;
    if (pack) {
      if (nj <= kDJB / 2)
        tile_n<kDJB / 2, kDNV, PAIR, true>(wt, yrows, f, n_in, xpad, plane, sg, ns, bj);
      else
        tile_n<kDJB, kDNV, PAIR, true>(wt, yrows, f, n_in, xpad, plane, sg, ns, bj);
    } else {
      if (nj <= kDJB / 2)
        tile_n<kDJB / 2, kDNV, PAIR, false>(wt, yrows, f, n_in, xpad, plane, sg, ns, bj);
      else
        tile_n<kDJB, kDNV, PAIR, false>(wt, yrows, f, n_in, xpad, plane, sg, ns, bj);
    }
  }
}

template <bool PAIR>
at::Tensor run(const at::Tensor& x, const Geometry& g, const Filters& f) {
  const int64_t positions = g.n * g.oh * g.ow, row_blocks = (f.n_out + kDJB - 1) / kDJB;
  // Work units: (image, band of output rows, group of filter blocks). Each pads its own band,
  // so a thread reads the input rows it computed in the layer before (same split). Bands while
  // each keeps two full segment tiles, else filter groups (small maps: the weights dominate).
  const int64_t threads = at::get_num_threads(), per_image = std::max<int64_t>(1, (threads + g.n - 1) / g.n);
  const int64_t seg_rows = PAIR ? 2 : 1, segs_per_row = PAIR ? 1 : (g.ow + kVec - 1) / kVec;
  const int64_t image_segs = ((g.oh + seg_rows - 1) / seg_rows) * segs_per_row;
  int64_t bands = 1, groups = 1;
  if (per_image > 1) {
    if (image_segs >= per_image * 2 * kDNV)
      bands = per_image;
    else
      groups = std::min(per_image, row_blocks);
  }
  const int64_t band_rows = ((g.oh + bands - 1) / bands + seg_rows - 1) / seg_rows * seg_rows;
  bands = (g.oh + band_rows - 1) / band_rows;
  const int64_t group_blocks = (row_blocks + groups - 1) / groups;
  at::Tensor out = at::empty({f.n_out, positions}, x.options());
  float* yp = out.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, g.n * bands * groups, 1, [&](int64_t begin, int64_t end) {
    // Each thread keeps its padded band between calls: a fresh buffer of this size comes from
    // mmap, and faulting its pages in on every call cost more than the convolution.
    static thread_local std::unique_ptr<float[]> buf;
    static thread_local int64_t capacity = 0;
    static thread_local std::vector<Segment> segs;
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / (bands * groups), band = (u / groups) % bands, group = u % groups;
      const int64_t y0 = band * band_rows, y1 = std::min(g.oh, y0 + band_rows);
      const int64_t jb0 = group * group_blocks, jb1 = std::min(row_blocks, jb0 + group_blocks);
      if (jb0 >= jb1) continue;
      const int64_t plane = pad_band(xp + b * g.c * g.h * g.w, g, y0, y1, buf, capacity);
      band_segments<PAIR>(g, b, y0, y1, segs);
      band_filters<PAIR>(f, g.c, buf.get(), plane, segs, jb0, jb1, yp, positions, (y1 - y0) * g.ow);
    }
  });
  return out;
}

}  // namespace

int lanes(int64_t ow) {
  // Whole vectors along a row, or for rows of at most half a vector two rows per vector; 0 where
  // either wastes more than a quarter of the lanes (4-column rows in 16 lanes): im2col packs those.
  const double along = static_cast<double>(ow) / (((ow + kVec - 1) / kVec) * kVec);
  const double paired = 2.0 * ow / kVec;
  if (ow > kVec / 2) return along >= 0.75 ? kVec : 0;
  return paired >= 0.75 ? kVec / 2 : 0;
}

at::Tensor conv_direct(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out_idx,
                       const at::Tensor& in_idx, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                       int64_t pw, int64_t dh, int64_t dw, const std::optional<at::Tensor>& bias) {
  ftwt_checks::operands("conv_direct", weight, weight, out_idx, in_idx);
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat, "conv_direct: float32 (N, C, H, W) x");
  const bool channels_last = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(channels_last || x.is_contiguous(), "conv_direct: x must be contiguous, NCHW or channels-last");
  const int64_t taps = kh * kw, n_out = out_idx.size(0), row_len = weight.size(1);
  Geometry g{};
  g.n = x.size(0), g.c = x.size(1), g.h = x.size(2), g.w = x.size(3);
  g.oh = (g.h + 2 * ph - dh * (kh - 1) - 1) / sh + 1, g.ow = (g.w + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  g.sh = sh, g.sw = sw, g.ph = ph, g.pw = pw, g.kh = kh, g.dh = dh, g.channels_last = channels_last;
  g.pcols = (g.w + 2 * pw + sw - 1) / sw;
  g.row = g.pcols * sw;
  const at::Tensor ins = in_idx.contiguous(), outs = out_idx.contiguous();
  const int64_t* in_ch = ins.data_ptr<int64_t>();
  std::vector<int64_t> w_off(g.c);
  for (int64_t a = 0; a < g.c; ++a) {
    w_off[a] = in_ch[a] * taps;
    TORCH_CHECK(w_off[a] >= 0 && w_off[a] + taps <= row_len, "conv_direct: input index out of range");
  }
  const int64_t* o = outs.data_ptr<int64_t>();
  ftwt_checks::filters("conv_direct", o, n_out, weight.size(0));
  const at::Tensor b = ftwt_checks::bias("conv_direct", bias, weight.size(0));
  std::vector<int64_t> tap_off(taps);
  for (int64_t i = 0; i < kh; ++i)
    for (int64_t k = 0; k < kw; ++k) tap_off[i * kw + k] = i * dh * g.row + ((k * dw) % sw) * g.pcols + (k * dw) / sw;
  if (n_out == 0 || g.n * g.oh * g.ow == 0) return at::empty({n_out, g.n * g.oh * g.ow}, x.options());
  const int k3 = kh == 3 && kw == 3 && sh == sw && (sw == 1 || sw == 2) && dh == 1 && dw == 1 ? static_cast<int>(sw) : 0;
  const Filters f{weight.data_ptr<float>(), row_len, o, n_out, b.defined() ? b.data_ptr<float>() : nullptr, w_off,
                  tap_off, g.row, g.pcols, k3};
  const int l = lanes(g.ow);
  TORCH_CHECK(l > 0, "conv_direct: rows of ", g.ow, " output columns fit no vector layout (conv_gather runs them by im2col)");
  return l == kVec ? run<false>(x, g, f) : run<true>(x, g, f);
}

}  // namespace ftwt_direct
