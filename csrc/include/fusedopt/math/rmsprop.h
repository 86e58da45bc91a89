#pragma once
// RMSprop. Course: S_t = β S_{t-1} + (1 − β) g², θ ← θ − η g / (√S_t + ε).
#include "fusedopt/math/common.h"

namespace fusedopt {
namespace math {

struct RmspropHyper {
  double alpha = 0.99, eps = 1e-8, momentum = 0;
  bool centered = false;
};

template <typename S>
struct RmspropConsts {
  S neg_lr, alpha, one_minus_alpha, eps, mu;
};

template <typename S>
FUSEDOPT_HD inline RmspropConsts<S> rmsprop_consts(const Common& c, const RmspropHyper& h, int64_t) {
  return {static_cast<S>(-c.lr), static_cast<S>(h.alpha), static_cast<S>(1.0 - h.alpha),
          static_cast<S>(h.eps), static_cast<S>(h.momentum)};
}

// CENTERED: a running mean a of g; MOMENTUM: a momentum buffer b (μ > 0).
template <bool CENTERED, bool MOMENTUM, typename V, typename S>
FUSEDOPT_HD inline void rmsprop_rule(V& p, V g, V& v, V& a, V& b, const RmspropConsts<S>& c) {
  v = fo::fma(V(c.alpha), v, V(c.one_minus_alpha) * g * g);  // v ← α·v + (1 − α)·g²
  V d;
  if (CENTERED) {
    a = fo::fma(V(c.alpha), a, V(c.one_minus_alpha) * g);  // a ← α·a + (1 − α)·g
    d = fo::sqrt(v - a * a) + V(c.eps);                     // √(v − a²) + ε
  } else {
    d = fo::sqrt(v) + V(c.eps);
  }
  if (MOMENTUM) {
    b = fo::fma(V(c.mu), b, g / d);  // b ← μ·b + g/d
    p = fo::fma(V(c.neg_lr), b, p);
  } else {
    p = fo::fma(V(c.neg_lr), g / d, p);
  }
}

// The whole element step. x[0] = θ, x[1] = g (unscaled in place), x[2] = v,
// then a (CENTERED), then b (MOMENTUM).
template <Decay D, bool MASK, bool CENTERED, bool MOMENTUM, typename V, typename S>
FUSEDOPT_HD inline void rmsprop_step(V* x, V keep, const Pre<S>& pre, const RmspropConsts<S>& c) {
  const V g = prelude<D, MASK>(x[1], x[0], keep, pre);
  rmsprop_rule<CENTERED, MOMENTUM>(x[0], g, x[2], x[CENTERED ? 3 : 2], x[MOMENTUM ? 3 + CENTERED : 2], c);
  epilogue<D>(x[0], pre);
}

}  // namespace math
}  // namespace fusedopt
