#pragma once
// Adagrad. Course: s ← s + g², θ ← θ − η g / (√s + ε).
#include "fusedopt/math/common.h"

namespace fusedopt {
namespace math {

struct AdagradHyper {
  double lr_decay = 0, eps = 1e-10;
};

template <typename S>
struct AdagradConsts {
  S neg_clr, eps;
};

template <typename S>
FUSEDOPT_HD inline AdagradConsts<S> adagrad_consts(const Common& c, const AdagradHyper& h, int64_t t) {
  const double clr = c.lr / (1.0 + static_cast<double>(t - 1) * h.lr_decay);
  return {static_cast<S>(-clr), static_cast<S>(h.eps)};
}

template <typename V, typename S>
FUSEDOPT_HD inline void adagrad_rule(V& p, V g, V& sum, const AdagradConsts<S>& c) {
  sum = fo::fma(g, g, sum);                             // s ← s + g²
  p = fo::fma(V(c.neg_clr), g / (fo::sqrt(sum) + V(c.eps)), p);  // θ ← θ − clr·g / (√s + ε)
}

// The whole element step. x[0] = θ, x[1] = g (unscaled in place), x[2] = s.
template <Decay D, bool MASK, typename V, typename S>
FUSEDOPT_HD inline void adagrad_step(V* x, V keep, const Pre<S>& pre, const AdagradConsts<S>& c) {
  const V g = prelude<D, MASK>(x[1], x[0], keep, pre);
  adagrad_rule(x[0], g, x[2], c);
  epilogue<D>(x[0], pre);
}

}  // namespace math
}  // namespace fusedopt
