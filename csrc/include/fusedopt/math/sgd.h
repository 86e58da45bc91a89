#pragma once
// SGD with momentum. Course: V_t = β V_{t-1} + (1 − β) g_t, θ ← θ − η V_t.
#include "fusedopt/math/common.h"

namespace fusedopt {
namespace math {

struct SgdHyper {
  double momentum = 0, dampening = 0;
  bool nesterov = false;
  bool ema = false;  // the course's exponential moving average form
};

template <typename S>
struct SgdConsts {
  S neg_lr, mu, one_minus_damp, one_minus_mu;
  bool first;  // torch seeds the buffer with g on a parameter's first step
};

template <typename S>
FUSEDOPT_HD inline SgdConsts<S> sgd_consts(const Common& c, const SgdHyper& h, int64_t t) {
  return {static_cast<S>(-c.lr), static_cast<S>(h.momentum), static_cast<S>(1.0 - h.dampening),
          static_cast<S>(1.0 - h.momentum), t == 1};
}

// MOMENTUM: a momentum buffer b exists (μ ≠ 0). NESTEROV/EMA refine it.
template <bool MOMENTUM, bool NESTEROV, bool EMA, typename V, typename S>
FUSEDOPT_HD inline void sgd_rule(V& p, V g, V& b, const SgdConsts<S>& c) {
  if (MOMENTUM) {
    if (EMA) {
      b = fo::fma(V(c.mu), b, V(c.one_minus_mu) * g);  // b ← β·b + (1 − β)·g, b₀ = 0
      g = b;
    } else {
      b = c.first ? g : fo::fma(V(c.one_minus_damp), g, V(c.mu) * b);  // b ← μ·b + (1 − d)·g
      g = NESTEROV ? fo::fma(V(c.mu), b, g) : b;
    }
  }
  p = fo::fma(V(c.neg_lr), g, p);  // θ ← θ − lr·g
}

// The whole element step. x[0] = θ, x[1] = g (unscaled in place), x[2] = b.
template <Decay D, bool MASK, bool MOMENTUM, bool NESTEROV, bool EMA, typename V, typename S>
FUSEDOPT_HD inline void sgd_step(V* x, V keep, const Pre<S>& pre, const SgdConsts<S>& c) {
  const V g = prelude<D, MASK>(x[1], x[0], keep, pre);
  sgd_rule<MOMENTUM, NESTEROV, EMA>(x[0], g, x[MOMENTUM ? 2 : 1], c);
  epilogue<D>(x[0], pre);
}

}  // namespace math
}  // namespace fusedopt
