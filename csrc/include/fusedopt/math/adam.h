#pragma once
// Adam / AdamW (Kingma & Ba). Course: V_t = β1 V + (1 − β1) g, S_t = β2 S + (1 − β2) g²,
// corrected by 1 − β^t (the course's "V_t / β1^t" is a typo for V_t / (1 − β1^t)).
#include "fusedopt/math/common.h"

namespace fusedopt {
namespace math {

struct AdamHyper {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  bool amsgrad = false;
  bool eps_inside_sqrt = false;  // the course's θ ← θ − η V̂ / √(Ŝ + ε)
};

template <typename S>
struct AdamConsts {
  S beta1, one_minus_beta1, beta2, one_minus_beta2, neg_step_size, bc2, bc2_sqrt, eps;
  bool eps_inside;
};

// Bias corrections in double from the 1-based step t (fo::powi: same bits on
// host and device), then rounded once to op-math.
template <typename S>
FUSEDOPT_HD inline AdamConsts<S> adam_consts(const Common& c, const AdamHyper& h, int64_t t) {
  const double bc1 = 1.0 - fo::powi(h.beta1, t);
  const double bc2 = 1.0 - fo::powi(h.beta2, t);
  return {static_cast<S>(h.beta1), static_cast<S>(1.0 - h.beta1),
          static_cast<S>(h.beta2), static_cast<S>(1.0 - h.beta2),
          static_cast<S>(-c.lr / bc1), static_cast<S>(bc2),
          static_cast<S>(fo::sqrt(bc2)), static_cast<S>(h.eps), h.eps_inside_sqrt};
}

template <bool AMSGRAD, typename V, typename S>
FUSEDOPT_HD inline void adam_rule(V& p, V g, V& m, V& v, V& vmax, const AdamConsts<S>& c) {
  m = fo::fma(V(c.beta1), m, V(c.one_minus_beta1) * g);      // m ← β1·m + (1 − β1)·g
  v = fo::fma(V(c.beta2), v, V(c.one_minus_beta2) * g * g);  // v ← β2·v + (1 − β2)·g²
  V s = v;
  if (AMSGRAD) {
    vmax = fo::maximum(vmax, v);  // v̂ ← max(v̂, v)
    s = vmax;
  }
  const V d = c.eps_inside ? fo::sqrt(s / V(c.bc2) + V(c.eps))     // √(v/bc2 + ε)
                           : fo::sqrt(s) / V(c.bc2_sqrt) + V(c.eps);  // √v/√bc2 + ε
  p = fo::fma(V(c.neg_step_size), m / d, p);  // θ ← θ − (lr/bc1)·m/d
}

// The whole element step. x[0] = θ, x[1] = g (unscaled in place), x[2] = m,
// x[3] = v, x[4] = v̂ (AMSGRAD).
template <Decay D, bool MASK, bool AMSGRAD, typename V, typename S>
FUSEDOPT_HD inline void adam_step(V* x, V keep, const Pre<S>& pre, const AdamConsts<S>& c) {
  const V g = prelude<D, MASK>(x[1], x[0], keep, pre);
  adam_rule<AMSGRAD>(x[0], g, x[2], x[3], x[AMSGRAD ? 4 : 3], c);
  epilogue<D>(x[0], pre);
}

}  // namespace math
}  // namespace fusedopt
