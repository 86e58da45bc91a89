#pragma once
// The preamble every optimizer shares (DESIGN.md §4, steps 1-5), per element.
//
// Note [Rule bodies]
// Every rule is a template over V, the op-math value (at::vec::Vectorized<float>
// or <double> in the CPU vector body, float or double in the CPU scalar tail and
// on CUDA), and S, the matching scalar. Constants enter as V(c.x): a broadcast
// for vectors, a no-op for scalars. Only +, -, *, / and the fo:: helpers are
// used, so a TU that wants Vectorized must include csrc/cpu/vec.h (the fo::
// overloads for it) before this header: qualified calls bind at definition.
#include <cstdint>

#include "fusedopt/fo.h"

namespace fusedopt {
namespace math {

// Which decay terms the kernel is compiled with; the coefficients themselves
// are runtime values, and a zero coefficient skips its term (as torch does,
// so an infinite parameter stays infinite rather than turning NaN).
enum class Decay : int { none = 0, coupled = 1, decoupled = 2 };

// Host-side options shared by every optimizer op.
struct Common {
  double lr = 0;
  double weight_decay = 0;  // λ2
  double l1_decay = 0;      // λ1
  bool decoupled = false;
  bool maximize = false;
  double keep_prob = 1;     // grad_keep_prob r
  uint64_t seed = 0;        // grad_mask_seed
  uint64_t threshold = 0;   // philox::keep_threshold(r)
  bool stochastic_rounding = false;  // bf16 params (Note [Stochastic rounding])

  Decay decay() const {
    if (weight_decay == 0 && l1_decay == 0) return Decay::none;
    return decoupled ? Decay::decoupled : Decay::coupled;
  }
  bool masked() const { return keep_prob < 1; }
};

// The same in op-math precision, with the per-call grad scale (1 when absent;
// division by 1 is exact).
template <typename S>
struct Pre {
  S scale, unkeep, l2, l1, shrink, prox;  // unkeep = 1/r (Note [Mask scale])
  bool scaled, maximize, has_l2, has_l1;
};

template <typename S>
FUSEDOPT_HD inline Pre<S> make_pre(const Common& c, float grad_scale, bool scaled) {
  Pre<S> p;
  p.scale = static_cast<S>(grad_scale);
  p.unkeep = static_cast<S>(1.0 / c.keep_prob);
  p.l2 = static_cast<S>(c.weight_decay);
  p.l1 = static_cast<S>(c.l1_decay);
  p.shrink = static_cast<S>(1.0 - c.lr * c.weight_decay);  // θ ← θ·(1 − lr·λ2)
  p.prox = static_cast<S>(c.lr * c.l1_decay);              // threshold of the L1 prox
  p.scaled = scaled;
  p.maximize = c.maximize;
  p.has_l2 = c.weight_decay != 0;
  p.has_l1 = c.l1_decay != 0;
  return p;
}

// Steps 1-4 of §4 on the gradient, and the decoupled shrink of θ (step 5a).
// `grad` is unscaled in place (what AMP writes back to .grad); the gradient
// the rule uses is returned. `keep` is the Bernoulli draw m ∈ {0, 1} for
// these elements (MASK only).
//
// Note [Mask scale]
// The masked gradient m·g/r is computed as m·g·(1/r), with 1/r computed in
// double on the host and rounded once to op-math: dropout's inverted scaling
// (Note [Dropout formula] in math/dropout.h), and one multiply per element
// instead of a division, which costs masked steps most where the divider
// already bounds the rule (Adam on Zen 3). The result differs from a
// correctly rounded m·g/r by at most one ulp. 1/r is finite: the ops refuse
// an r whose keep threshold is 0.
template <Decay D, bool MASK, typename V, typename S>
FUSEDOPT_HD inline V prelude(V& grad, V& p, V keep, const Pre<S>& c) {
  if (c.scaled) grad = grad / V(c.scale);
  V g = grad;
  if (c.maximize) g = fo::neg(g);
  if (MASK) g = keep * g * V(c.unkeep);  // g ← m·g / r (Note [Mask scale])
  if (D == Decay::coupled) {
    if (c.has_l2) g = fo::fma(V(c.l2), p, g);            // g + λ2·θ
    if (c.has_l1) g = fo::fma(V(c.l1), fo::sign(p), g);  // g + λ1·sign(θ)
  }
  if (D == Decay::decoupled && c.has_l2) p = p * V(c.shrink);
  return g;
}

// Step 5b: the L1 proximal step after a decoupled update; exact zeros result.
template <Decay D, typename V, typename S>
FUSEDOPT_HD inline void epilogue(V& p, const Pre<S>& c) {
  if (D == Decay::decoupled && c.has_l1) p = fo::sign(p) * fo::relu(fo::abs(p) - V(c.prox));
}

}  // namespace math
}  // namespace fusedopt
