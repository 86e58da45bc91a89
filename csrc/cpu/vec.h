#pragma once
// fo:: overloads for at::vec::Vectorized and the load/store of each storage
// type as op-math vectors. Compiled once per ISA (see setup.py): the types
// here live in ATen's per-ISA inline namespace, ours in fusedopt::cpu::ISA.
// Include this before any math/*.h (Note [Rule bodies]).
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstring>

#include "fusedopt/fo.h"
#include "fusedopt/math/round.h"

namespace fusedopt {
namespace fo {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Note [Vector FMA]
// ATen's generic (DEFAULT) fmadd is a * b + c with two roundings; AVX2 and
// AVX512 use the fused instruction. fo::fma must be one rounding everywhere,
// so the DEFAULT build fuses lane by lane with std::fma.
template <typename T>
inline Vec<T> fma(const Vec<T>& a, const Vec<T>& b, const Vec<T>& c) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  return at::vec::fmadd(a, b, c);
#else
  T x[Vec<T>::size()], y[Vec<T>::size()], z[Vec<T>::size()];
  a.store(x);
  b.store(y);
  c.store(z);
  for (int i = 0; i < Vec<T>::size(); ++i) x[i] = std::fma(x[i], y[i], z[i]);
  return Vec<T>::loadu(x);
#endif
}
template <typename T>
inline Vec<T> sqrt(const Vec<T>& a) { return a.sqrt(); }
template <typename T>
inline Vec<T> neg(const Vec<T>& a) { return a.neg(); }
template <typename T>
inline Vec<T> abs(const Vec<T>& a) { return a.abs(); }
template <typename T>
inline Vec<T> sign(const Vec<T>& a) {  // 1.0 / 0.0 lanes from gt/lt; NaN → 0
  const Vec<T> zero(T(0));
  return a.gt(zero) - a.lt(zero);
}
template <typename T>
inline Vec<T> maximum(const Vec<T>& a, const Vec<T>& b) { return at::vec::maximum(a, b); }
template <typename T>
inline Vec<T> relu(const Vec<T>& a) { return at::vec::maximum(a, Vec<T>(T(0))); }

}  // namespace fo

namespace cpu {
namespace CPU_CAPABILITY {

// Loads and stores one op-math vector's worth of a storage type: W elements,
// or the first n < W (a partial vector: the other lanes load as 0 and are
// never stored; the memory past p + n is not touched).
template <typename scalar_t>
struct VecIo {
  using S = typename OpMath<scalar_t>::type;
  using V = at::vec::Vectorized<S>;
  static constexpr int W = V::size();
  // Note [Half conversions]
  // fp16/bf16 move as one 16-byte (AVX2) or 32-byte (AVX512) access per
  // vector, converted by ATen's own per-ISA routines (so the bits are those of
  // at::vec's conversions, round to nearest even). Going through
  // Vectorized<BFloat16> instead converted two float vectors to store one and
  // stored half a vector with a masked store: bf16 Adam ran at half torch's
  // speed on Zen 4 (7.0 vs 3.5 ms, 4M elements, one thread).
  static V load(const scalar_t* p) {
    if constexpr (std::is_same_v<scalar_t, S>) {
      return V::loadu(p);
    } else {
#if defined(CPU_CAPABILITY_AVX512)
      __m512 o;
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      if constexpr (std::is_same_v<scalar_t, at::BFloat16>) at::vec::cvtbf16_fp32(raw, o);
      else at::vec::cvtfp16_fp32(raw, o);
      return V(o);
#elif defined(CPU_CAPABILITY_AVX2)
      __m256 o;
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      if constexpr (std::is_same_v<scalar_t, at::BFloat16>) at::vec::cvtbf16_fp32(raw, o);
      else at::vec::cvtfp16_fp32(raw, o);
      return V(o);
#else
      V v;
      at::vec::load_to_float(p, v);
      return v;
#endif
    }
  }
  static void store(scalar_t* p, const V& v) {
    if constexpr (std::is_same_v<scalar_t, S>) {
      v.store(p);
    } else {
#if defined(CPU_CAPABILITY_AVX512)
      const __m256i raw = std::is_same_v<scalar_t, at::BFloat16> ? at::vec::cvtfp32_bf16(__m512(v))
                                                                 : at::vec::cvtfp32_fp16(__m512(v));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), raw);
#elif defined(CPU_CAPABILITY_AVX2)
      const __m128i raw = std::is_same_v<scalar_t, at::BFloat16> ? at::vec::cvtfp32_bf16(__m256(v))
                                                                 : at::vec::cvtfp32_fp16(__m256(v));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), raw);
#else
      at::vec::convert_from_float<scalar_t>(v, v).store(p, W);
#endif
    }
  }
  // Note [Half pairs]
  // Two vectors, from p and p + W. For a half type this is one 32-byte (AVX2)
  // or 64-byte (AVX512) access and ATen's two-vector conversions, as torch's
  // fused steps do; the bits are those of load and store. The element loop
  // (loop.h) moves half-type lists so, two vectors per step, which also halves
  // its prefetches and flag tests per element. bf16 on 16.8M elements, 2-core
  // Zen 3 VM, 2 threads, five alternating processes each: Adam 17.5-18.4 ->
  // 11.4-14.0 ms, SGD 7.3-8.5 -> 5.8-7.4, Adagrad 8.8-11.5 -> 6.7-9.2. Which
  // part of the change buys it is not isolated: a standalone loop of the SGD
  // rule with 16-byte and with 32-byte stores ran at the same speed there.
  static void load2(const scalar_t* p, V& lo, V& hi) {
    if constexpr (std::is_same_v<scalar_t, S>) {
      lo = V::loadu(p);
      hi = V::loadu(p + W);
    } else {
#if defined(CPU_CAPABILITY_AVX512)
      __m512 a, b;
      const __m512i raw = _mm512_loadu_si512(p);
      if constexpr (std::is_same_v<scalar_t, at::BFloat16>) at::vec::cvtbf16_fp32(raw, a, b);
      else at::vec::cvtfp16_fp32(raw, a, b);
      lo = V(a);
      hi = V(b);
#elif defined(CPU_CAPABILITY_AVX2)
      __m256 a, b;
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      if constexpr (std::is_same_v<scalar_t, at::BFloat16>) at::vec::cvtbf16_fp32(raw, a, b);
      else at::vec::cvtfp16_fp32(raw, a, b);
      lo = V(a);
      hi = V(b);
#else
      lo = load(p);
      hi = load(p + W);
#endif
    }
  }
  static void store2(scalar_t* p, const V& lo, const V& hi) {
    if constexpr (std::is_same_v<scalar_t, S>) {
      lo.store(p);
      hi.store(p + W);
    } else {
#if defined(CPU_CAPABILITY_AVX512)
      _mm512_storeu_si512(p, pack2(lo, hi));
#elif defined(CPU_CAPABILITY_AVX2)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), pack2(lo, hi));
#else
      store(p, lo);
      store(p + W, hi);
#endif
    }
  }
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  // store2 with non-temporal stores (Note [Streaming stores] in
  // kernels/dropout.cpp): the same bits; p aligned to the 2W elements stored.
  static void stream2(scalar_t* p, const V& lo, const V& hi) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<scalar_t, float>) {
      _mm512_stream_ps(p, lo);
      _mm512_stream_ps(p + W, hi);
    } else if constexpr (std::is_same_v<scalar_t, double>) {
      _mm512_stream_pd(p, lo);
      _mm512_stream_pd(p + W, hi);
    } else {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(p), pack2(lo, hi));
    }
#else
    if constexpr (std::is_same_v<scalar_t, float>) {
      _mm256_stream_ps(p, lo);
      _mm256_stream_ps(p + W, hi);
    } else if constexpr (std::is_same_v<scalar_t, double>) {
      _mm256_stream_pd(p, lo);
      _mm256_stream_pd(p + W, hi);
    } else {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), pack2(lo, hi));
    }
#endif
  }

  // Two float vectors as the 2W half-type values store2 writes.
#if defined(CPU_CAPABILITY_AVX512)
  static __m512i pack2(const V& lo, const V& hi) {
    return std::is_same_v<scalar_t, at::BFloat16> ? at::vec::cvtfp32_bf16(__m512(lo), __m512(hi))
                                                  : at::vec::cvtfp32_fp16(__m512(lo), __m512(hi));
  }
#else
  static __m256i pack2(const V& lo, const V& hi) {
    return std::is_same_v<scalar_t, at::BFloat16> ? at::vec::cvtfp32_bf16(__m256(lo), __m256(hi))
                                                  : at::vec::cvtfp32_fp16(__m256(lo), __m256(hi));
  }
#endif
#endif
  static V load(const scalar_t* p, int n) {
    if constexpr (std::is_same_v<scalar_t, S>) {
      return V::loadu(p, n);
    } else {
      scalar_t buf[W] = {};
      std::memcpy(buf, p, n * sizeof(scalar_t));
      return load(buf);
    }
  }
  static void store(scalar_t* p, const V& v, int n) {
    if constexpr (std::is_same_v<scalar_t, S>) {
      v.store(p, n);
    } else {
      scalar_t buf[W];
      store(buf, v);
      std::memcpy(p, buf, n * sizeof(scalar_t));
    }
  }
};

#if defined(CPU_CAPABILITY_AVX512)
// The bf16 of each fp32 lane in the low half of its 32-bit lane, rounded to
// nearest even, a NaN as 0xFFFF: ATen's cvtfp32_bf16 before its pack, bit
// for bit (AVX512: with the NaN blend folded into the shift).
inline __m512i bf16_bits(const at::vec::Vectorized<float>& v) {
  const __m512i b = _mm512_castps_si512(__m512(v));
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i t = _mm512_add_epi32(_mm512_add_epi32(b, lsb), _mm512_set1_epi32(0x7fff));
  return _mm512_mask_srli_epi32(_mm512_set1_epi32(0xffff), _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), t, 16);
}
#elif defined(CPU_CAPABILITY_AVX2)
inline __m256i bf16_bits(const at::vec::Vectorized<float>& v) {
  const __m256i b = _mm256_castps_si256(__m256(v));
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i t = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, lsb), _mm256_set1_epi32(0x7fff)), 16);
  return _mm256_blendv_epi8(_mm256_set1_epi32(0xffff), t, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_ORD_Q)));
}
#endif

// Stores the first n <= W lanes of an fp32 vector as bfloat16, lane k rounded
// stochastically with u[k] (Note [Stochastic rounding]): the vector form of
// math::bf16_bits_stochastic for whole vectors, the scalar one for the
// partial last vector.
inline void store_stochastic(at::BFloat16* p, const at::vec::Vectorized<float>& v, const uint16_t* u, int n) {
  constexpr int W = at::vec::Vectorized<float>::size();
#if defined(CPU_CAPABILITY_AVX512)
  if (n == W) {
    const __m512i b = _mm512_castps_si512(__m512(v));
    const __m512i r = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(u)));
    const __m512i t = _mm512_srli_epi32(_mm512_add_epi32(b, r), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(__m512(v), __m512(v), _CMP_UNORD_Q);
    const __m512i bits = _mm512_mask_blend_epi32(nan, t, _mm512_set1_epi32(0x7fc0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bits));
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if (n == W) {
    const __m256i b = _mm256_castps_si256(__m256(v));
    const __m256i r = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u)));
    const __m256i t = _mm256_srli_epi32(_mm256_add_epi32(b, r), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(__m256(v), __m256(v), _CMP_UNORD_Q));
    const __m256i bits = _mm256_blendv_epi8(t, _mm256_set1_epi32(0x7fc0), nan);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
    return;
  }
#endif
  float x[W];
  v.store(x);
  uint16_t bits[W];
  for (int k = 0; k < n; ++k) bits[k] = math::bf16_bits_stochastic(x[k], u[k]);
  std::memcpy(p, bits, static_cast<size_t>(n) * sizeof(uint16_t));
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedopt
