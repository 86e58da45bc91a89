#pragma once
// Host+device scalar helpers shared by every kernel. The overloads for
// at::vec::Vectorized live in csrc/cpu/vec.h, so one templated rule body in
// math/*.h serves the CPU vector body, the CPU scalar tail and CUDA.
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FUSEDOPT_HD __host__ __device__
#define FUSEDOPT_UNROLL _Pragma("unroll")
#else
#define FUSEDOPT_HD
#define FUSEDOPT_UNROLL
#endif

namespace fusedopt {

// Op-math, the type every kernel computes in: float for fp32, fp16 and bf16,
// double for fp64 (DESIGN.md §4).
template <typename T>
struct OpMath {
  using type = float;
};
template <>
struct OpMath<double> {
  using type = double;
};

namespace fo {

// Note [Explicit FMA]
// Every build turns implicit contraction off (-ffp-contract=off, --fmad=false),
// so `a * b + c` is always two roundings and fo::fma is always one. The rules
// say which they mean; the CPU (scalar and vector) and CUDA then produce the
// same bits for fp32.
FUSEDOPT_HD inline float fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
FUSEDOPT_HD inline double fma(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
FUSEDOPT_HD inline float sqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
FUSEDOPT_HD inline double sqrt(double a) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
template <typename T>
FUSEDOPT_HD inline T neg(T a) {
  return -a;
}
// sign(0) = 0, sign(NaN) = 0 (the product with NaN elsewhere keeps NaN).
template <typename T>
FUSEDOPT_HD inline T sign(T a) {
  return static_cast<T>((a > T(0)) - (a < T(0)));
}
template <typename T>
FUSEDOPT_HD inline T abs(T a) {
  return a < T(0) ? -a : a;
}
// NaN-propagating maximum, as torch.maximum.
template <typename T>
FUSEDOPT_HD inline T maximum(T a, T b) {
  return (a != a || a > b) ? a : b;
}
// Clamp below at 0, NaN-propagating (used by the L1 proximal step).
template <typename T>
FUSEDOPT_HD inline T relu(T a) {
  return (a != a || a > T(0)) ? a : T(0);
}

// x^n by repeated squaring, in double. Only multiplications, so the host and
// the device compute the same bits (std::pow and CUDA's pow need not agree).
FUSEDOPT_HD inline double powi(double x, int64_t n) {
  double r = 1.0;
  while (n > 0) {
    if (n & 1) r *= x;
    x *= x;
    n >>= 1;
  }
  return r;
}

}  // namespace fo
}  // namespace fusedopt
