#include "../vec.h"  // first: Note [Rule bodies]
#include "../loop.h"
#include "kernels.h"

namespace fusedopt::cpu::CPU_CAPABILITY {

// Lists: θ, g, v, then a (centered), then b (momentum); x[2 + CENTERED] is b.
void rmsprop(const OptimizerCall<math::RmspropHyper>& call) {
  FUSEDOPT_BOOL_SWITCH(call.common.masked(), MASK, [&] {
    FUSEDOPT_DECAY_SWITCH(call.common.decay(), DECAY, [&] {
      FUSEDOPT_BOOL_SWITCH(call.hyper.centered, CENTERED, [&] {
        FUSEDOPT_BOOL_SWITCH(call.hyper.momentum > 0, MOMENTUM, [&] {
          constexpr int N = 3 + CENTERED + MOMENTUM;
          run_optimizer<N, MASK>(call, [&](const TensorRef& t, auto s) {
            using S = decltype(s);
            const auto pre = math::make_pre<S>(call.common, call.grad_scale, call.scaled);
            const auto c = math::rmsprop_consts<S>(call.common, call.hyper, t.step);
            return [=](auto* x, auto keep) {
              x[1] = math::prelude<DECAY, MASK>(x[1], x[0], keep, pre);
              math::rmsprop_rule<CENTERED, MOMENTUM>(x[0], x[1], x[2], x[CENTERED ? 3 : 2],
                                                     x[N - 1], c);
              math::epilogue<DECAY>(x[0], pre);
            };
          });
        });
      });
    });
  });
}

}  // namespace fusedopt::cpu::CPU_CAPABILITY
