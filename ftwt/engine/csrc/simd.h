// Vector types of the engine's native kernels, by the build variant's vector ISA (-march).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ftwt_simd {

typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
typedef float v2 __attribute__((vector_size(8)));

// VF: the widest float vector; VH: half of it; kRegs: vector registers of the ISA, which the
// kernels' register tiles must fit or they spill to the stack.
#if defined(__AVX512F__)
typedef v16 VF;
typedef v8 VH;
constexpr int kRegs = 32;
#elif defined(__AVX__)
typedef v8 VF;
typedef v4 VH;
constexpr int kRegs = 16;
#elif defined(__aarch64__)
typedef v4 VF;  // NEON
typedef v2 VH;
constexpr int kRegs = 32;
#else
typedef v4 VF;  // SSE
typedef v2 VH;
constexpr int kRegs = 16;
#endif
constexpr int kVec = sizeof(VF) / sizeof(float);

// The register tile of the position-vector kernels (gather_mm, conv_direct): kJB filter rows
// times kNV vectors of positions accumulate in registers, plus kNV vectors of inputs and one
// broadcast weight, which must fit the register file or the tile spills to the stack.
#if defined(__AVX512F__) || defined(__aarch64__)
constexpr int kJB = 8, kNV = 2;  // 32 registers: 8 x 2 accumulators + 2 + 1
#else
constexpr int kJB = 6, kNV = 2;  // 16 registers: 6 x 2 accumulators + 2 + 1
#endif
static_assert(kJB * kNV + kNV + 1 <= kRegs, "the register tile must fit the register file");

template <typename V>
inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
inline void store(float* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// The first n (0 < n < lanes) floats at p in a vector of VF or VH, the other lanes zero, reading
// nothing past p + n (masked loads: a load across the end of the buffer could fault).
template <typename V>
inline V load_first(const float* p, int n) {
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64) return (V)_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), p);
  if constexpr (sizeof(V) == 32) return (V)_mm256_maskz_loadu_ps(static_cast<__mmask8>((1u << n) - 1u), p);
#elif defined(__AVX2__)
  static const int32_t lanes[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  if constexpr (sizeof(V) == 32)
    return (V)_mm256_maskload_ps(p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lanes + 8 - n)));
  if constexpr (sizeof(V) == 16)
    return (V)_mm_maskload_ps(p, _mm_loadu_si128(reinterpret_cast<const __m128i*>(lanes + 8 - n)));
#endif
  V v{};
  std::memcpy(&v, p, n * sizeof(float));
  return v;
}

inline float sum_lanes(VF v) {
  float s = 0.f;
  for (int i = 0; i < kVec; ++i) s += v[i];
  return s;
}

}  // namespace ftwt_simd
