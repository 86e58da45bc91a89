#include "../vec.h"  // first: Note [Rule bodies]
#include "../loop.h"
#include "kernels.h"

namespace fusedopt::cpu::CPU_CAPABILITY {

void update(const OptimizerCall<math::RmspropHyper>& call) {
  FUSEDOPT_BOOL_SWITCH(call.common.masked(), MASK, [&] {
    FUSEDOPT_DECAY_SWITCH(call.common.decay(), DECAY, [&] {
      FUSEDOPT_BOOL_SWITCH(call.hyper.centered, CENTERED, [&] {
        FUSEDOPT_BOOL_SWITCH(call.hyper.momentum > 0, MOMENTUM, [&] {
          constexpr int N = 3 + CENTERED + MOMENTUM;
          run_optimizer<N, MASK>(call, [&](int64_t step, auto s) {
            using S = decltype(s);
            const auto pre = math::make_pre<S>(call.common, call.grad_scale, call.scaled);
            const auto c = math::rmsprop_consts<S>(call.common, call.hyper, step);
            return [=](auto* x, auto keep) {
              math::rmsprop_step<DECAY, MASK, CENTERED, MOMENTUM>(x, keep, pre, c);
            };
          });
        });
      });
    });
  });
}

}  // namespace fusedopt::cpu::CPU_CAPABILITY
