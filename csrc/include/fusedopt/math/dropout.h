#pragma once
// The per-element dropout rules (DESIGN.md §6), written once for the CPU
// vector body, the CPU scalar tail and the CUDA body (Note [Rule bodies]).
//
// Note [Dropout formula]
// m = keep ? scale : 0 with scale = 1/(1 - p) computed in double on the host
// and rounded once to the op-math type (0 when p = 1), and
//     dropout:          y = x · m
//     bias_dropout_add: y = residual + (x + bias) · m
// in op-math (float for fp32/fp16/bf16, double for fp64), each operation
// rounded, no contraction, and rounded once to the storage type at the end.
// For fp32 this is bit for bit torch's CPU native_dropout given the same mask
// ((x · mask) · scale, mask ∈ {0, 1}), and residual + F.dropout(x + bias).
// A dropped element is x · 0: -0 for negative x, NaN for an infinite x, as in
// torch. The backward of both is dx = dy · m (the same rule on dy).
#include "fusedopt/fo.h"

namespace fusedopt {
namespace math {

template <typename V>
FUSEDOPT_HD inline V dropout(V x, V m) {
  return x * m;
}

template <typename V>
FUSEDOPT_HD inline V bias_dropout_add(V x, V bias, V residual, V m) {
  return residual + (x + bias) * m;
}

}  // namespace math
}  // namespace fusedopt
