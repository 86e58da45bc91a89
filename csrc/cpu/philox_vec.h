#pragma once
// Philox4x32-10 on CPU vectors, and the keep bits of a Bernoulli draw
// (DESIGN.md §6) built from it. Compiled once per ISA (Note [Per-ISA CPU
// kernels]): AVX512 runs 16 counters at once, AVX2 8, DEFAULT the scalar
// philox::block. Every path yields the bits of the scalar definition in
// fusedopt/philox.h; tests/test_dropout.py checks each ISA against the
// known answers and the numpy reference.
#include <cstdint>
#include <cstring>

#include "fusedopt/philox.h"
#include "vec.h"

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace fusedopt {
namespace cpu {
namespace CPU_CAPABILITY {

// A Bernoulli draw: key, stream offset and keep threshold T ∈ [0, 2^32].
struct Draw {
  uint64_t seed = 0, offset = 0, threshold = 0;
};

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)

// Note [Vector Philox]
// One lane per counter. The 32x32 -> 64-bit products of a round come from
// mul_epu32, which multiplies the even 32-bit lanes only: the odd lanes are
// shifted down and multiplied separately, and blends put the high and low
// halves back into 32-bit lanes. The key is the same in every lane, so its
// ten round values are broadcasts.
//
// Element order. Output word w of counter g is element 4g + w. A 4x4
// transpose inside each 128-bit lane (unpack epi32, then epi64) turns the
// four word vectors into vectors of consecutive elements if lane 4L + q (L the
// 128-bit lane, q the position in it) carries counter g0 + q·nL + L, nL being
// the number of 128-bit lanes: vector q of the transpose then holds counters
// g0 + q·nL .. g0 + q·nL + nL - 1, i.e. elements 4·(g0 + q·nL) onwards.
#if defined(CPU_CAPABILITY_AVX512)
using VI = __m512i;
constexpr int kLanes = 16;
inline VI set1(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }
// Low counter words g0 + lane offset (Note [Vector Philox]); g0 % kLanes == 0.
inline VI counters(uint32_t g0) {
  return _mm512_or_si512(set1(g0), _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
}
inline void mulhilo(const VI& m, const VI& a, VI& hi, VI& lo) {
  const VI even = _mm512_mul_epu32(a, m);
  const VI odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}
inline VI xor3(const VI& a, const VI& b, const VI& c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
inline VI unpacklo32(const VI& a, const VI& b) { return _mm512_unpacklo_epi32(a, b); }
inline VI unpackhi32(const VI& a, const VI& b) { return _mm512_unpackhi_epi32(a, b); }
inline VI unpacklo64(const VI& a, const VI& b) { return _mm512_unpacklo_epi64(a, b); }
inline VI unpackhi64(const VI& a, const VI& b) { return _mm512_unpackhi_epi64(a, b); }
inline VI loadu(const uint32_t* p) { return _mm512_loadu_si512(p); }
inline void storeu(uint32_t* p, const VI& v) { _mm512_storeu_si512(p, v); }
// Bit k set iff lane k < T, for T = last + 1 (callers handle T = 0).
inline uint64_t below(const VI& w, const VI& last) {
  return static_cast<uint64_t>(_mm512_cmple_epu32_mask(w, last));
}
#else
using VI = __m256i;
constexpr int kLanes = 8;
inline VI set1(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }
inline VI counters(uint32_t g0) { return _mm256_or_si256(set1(g0), _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7)); }
inline void mulhilo(const VI& m, const VI& a, VI& hi, VI& lo) {
  const VI even = _mm256_mul_epu32(a, m);
  const VI odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}
inline VI xor3(const VI& a, const VI& b, const VI& c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
inline VI unpacklo32(const VI& a, const VI& b) { return _mm256_unpacklo_epi32(a, b); }
inline VI unpackhi32(const VI& a, const VI& b) { return _mm256_unpackhi_epi32(a, b); }
inline VI unpacklo64(const VI& a, const VI& b) { return _mm256_unpacklo_epi64(a, b); }
inline VI unpackhi64(const VI& a, const VI& b) { return _mm256_unpackhi_epi64(a, b); }
inline VI loadu(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline void storeu(uint32_t* p, const VI& v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
// AVX2 has no unsigned compare: w <= last iff min(w, last) == w.
inline uint64_t below(const VI& w, const VI& last) {
  const VI le = _mm256_cmpeq_epi32(_mm256_min_epu32(w, last), w);
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(le)));
}
#endif

// Ten Philox rounds on kLanes counters (c[0..3] = counter words) in place.
inline void philox_rounds(VI (&c)[4], uint64_t seed) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const VI m0 = set1(philox::kMul0), m1 = set1(philox::kMul1);
  for (int r = 0; r < 10; ++r) {
    VI hi0, lo0, hi1, lo1;
    mulhilo(m0, c[0], hi0, lo0);
    mulhilo(m1, c[2], hi1, lo1);
    c[0] = xor3(hi1, c[1], set1(k0));
    c[1] = lo1;
    c[2] = xor3(hi0, c[3], set1(k1));
    c[3] = lo0;
    k0 += philox::kKeyInc0;
    k1 += philox::kKeyInc1;
  }
}

// Keep bits of the 4·kLanes elements of counters [g0, g0 + kLanes), bit k =
// element 4·g0 + k; g0 is a multiple of kLanes, so the low counter word never
// carries inside the vector. T ≥ 1 (`last` = T - 1).
inline uint64_t keep_bits_lanes(const Draw& d, uint64_t g0, const VI& last) {
  VI c[4] = {counters(static_cast<uint32_t>(g0)), set1(static_cast<uint32_t>(g0 >> 32)), set1(static_cast<uint32_t>(d.offset)),
             set1(static_cast<uint32_t>(d.offset >> 32))};
  philox_rounds(c, d.seed);
  const VI t0 = unpacklo32(c[0], c[1]), t1 = unpacklo32(c[2], c[3]);
  const VI t2 = unpackhi32(c[0], c[1]), t3 = unpackhi32(c[2], c[3]);
  return below(unpacklo64(t0, t1), last) | below(unpackhi64(t0, t1), last) << kLanes |
         below(unpacklo64(t2, t3), last) << (2 * kLanes) | below(unpackhi64(t2, t3), last) << (3 * kLanes);
}

#endif

// Keep bits of elements [64q, 64q + 64) of the draw: bit k = element 64q + k.
inline uint64_t keep_bits64(const Draw& d, uint64_t q) {
  if (d.threshold == 0) return 0;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  const VI last = set1(static_cast<uint32_t>(d.threshold - 1));
  uint64_t bits = 0;
  for (int k = 0; k < 16 / kLanes; ++k) bits |= keep_bits_lanes(d, 16 * q + k * kLanes, last) << (4 * kLanes * k);
  return bits;
#else
  uint64_t bits = 0;
  for (int k = 0; k < 16; ++k) {
    const philox::Words w = philox::block(d.seed, d.offset, 16 * q + k);
    for (int j = 0; j < 4; ++j) bits |= uint64_t(philox::keep(w.w[j], d.threshold)) << (4 * k + j);
  }
  return bits;
#endif
}

// Philox4x32-10 of n arbitrary counters: out[4r + w] = word w for the counter
// words ctr[4r .. 4r + 3] and the key (seed low, seed high). A test hook for
// the vector rounds (known answers; counters that carry anywhere).
inline void philox_counters(const uint32_t* ctr, uint32_t* out, int64_t n, uint64_t seed) {
  int64_t r = 0;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  for (; r + kLanes <= n; r += kLanes) {
    uint32_t cols[4][kLanes];
    for (int l = 0; l < kLanes; ++l)
      for (int w = 0; w < 4; ++w) cols[w][l] = ctr[4 * (r + l) + w];
    VI c[4] = {loadu(cols[0]), loadu(cols[1]), loadu(cols[2]), loadu(cols[3])};
    philox_rounds(c, seed);
    for (int w = 0; w < 4; ++w) storeu(cols[w], c[w]);
    for (int l = 0; l < kLanes; ++l)
      for (int w = 0; w < 4; ++w) out[4 * (r + l) + w] = cols[w][l];
  }
#endif
  for (; r < n; ++r) {
    const philox::Words w = philox::philox4x32_10(
        philox::Words{{ctr[4 * r], ctr[4 * r + 1], ctr[4 * r + 2], ctr[4 * r + 3]}}, static_cast<uint32_t>(seed),
        static_cast<uint32_t>(seed >> 32));
    std::memcpy(out + 4 * r, w.w, sizeof(w.w));
  }
}

// The op-math vector whose lane k is `value` if bit k of `bits` is set, else 0.
template <typename S>
inline at::vec::Vectorized<S> keep_select(uint64_t bits, S value) {
  using V = at::vec::Vectorized<S>;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<S, float>)
    return V(_mm512_maskz_mov_ps(static_cast<__mmask16>(bits), _mm512_set1_ps(value)));
  else
    return V(_mm512_maskz_mov_pd(static_cast<__mmask8>(bits), _mm512_set1_pd(value)));
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<S, float>) {
    const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i on = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), sel), sel);
    return V(_mm256_and_ps(_mm256_castsi256_ps(on), _mm256_set1_ps(value)));
  } else {
    const __m256i sel = _mm256_setr_epi64x(1, 2, 4, 8);
    const __m256i on =
        _mm256_cmpeq_epi64(_mm256_and_si256(_mm256_set1_epi64x(static_cast<int64_t>(bits)), sel), sel);
    return V(_mm256_and_pd(_mm256_castsi256_pd(on), _mm256_set1_pd(value)));
  }
#else
  S lanes[V::size()];
  for (int k = 0; k < V::size(); ++k) lanes[k] = (bits >> k & 1) ? value : S(0);
  return V::loadu(lanes);
#endif
}

// Keep bits of an arbitrary run of elements, for loops that walk a draw in
// order but not in 64-element steps (the optimizers' vector and scalar
// tails; bias_dropout_add's backward, row by row). Two 64-element groups are
// cached, so a run that straddles groups draws each group once.
class KeepCache {
 public:
  // Bits of elements [i, i + n), bit k = element i + k; n ≤ 64, so the run
  // touches two groups at most.
  uint64_t bits(const Draw& d, uint64_t i, int n) {
    const uint64_t q = i >> 6;
    const int s = static_cast<int>(i & 63);
    uint64_t b = group(d, q) >> s;
    if (s + n > 64) b |= group(d, q + 1) << (64 - s);
    return n == 64 ? b : b & ((uint64_t(1) << n) - 1);
  }

  // out[k] = 1 or 0: the keep bit of element i0 + k, for k < n.
  template <typename S>
  void fill(const Draw& d, S* out, int64_t i0, int64_t n) {
    constexpr int W = at::vec::Vectorized<S>::size();
    int64_t k = 0;
    for (; k + W <= n; k += W) keep_select<S>(bits(d, static_cast<uint64_t>(i0 + k), W), S(1)).store(out + k);
    for (; k < n; ++k) out[k] = S(bits(d, static_cast<uint64_t>(i0 + k), 1));
  }

 private:
  uint64_t group(const Draw& d, uint64_t q) {
    Slot& s = slot_[q & 1];
    if (!s.valid || s.q != q) s = {keep_bits64(d, q), q, true};
    return s.bits;
  }
  struct Slot {
    uint64_t bits = 0, q = 0;
    bool valid = false;
  };
  Slot slot_[2];
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedopt
