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
  static V load(const scalar_t* p) {
    if constexpr (std::is_same_v<scalar_t, S>) {
      return V::loadu(p);
    } else {
      V v;
      at::vec::load_to_float(p, v);
      return v;
    }
  }
  static void store(scalar_t* p, const V& v) {
    if constexpr (std::is_same_v<scalar_t, S>) {
      v.store(p);
    } else {
      at::vec::convert_from_float<scalar_t>(v, v).store(p, W);
    }
  }
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

// Stores the first n <= W lanes of an fp32 vector as bfloat16, lane k rounded
// stochastically with words[k] (Note [Stochastic rounding]).
inline void store_stochastic(at::BFloat16* p, const at::vec::Vectorized<float>& v, const uint32_t* words, int n) {
  constexpr int W = at::vec::Vectorized<float>::size();
  float x[W];
  v.store(x);
  uint16_t bits[W];
  for (int k = 0; k < W; ++k) bits[k] = math::bf16_bits_stochastic(x[k], words[k]);
  std::memcpy(p, bits, static_cast<size_t>(n) * sizeof(uint16_t));
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedopt
