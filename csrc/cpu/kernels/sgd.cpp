#include "../vec.h"  // first: Note [Rule bodies]
#include "../loop.h"
#include "kernels.h"

namespace fusedopt::cpu::CPU_CAPABILITY {

void update(const OptimizerCall<math::SgdHyper>& call) {
  const bool momentum = call.hyper.momentum != 0;
  FUSEDOPT_BOOL_SWITCH(call.common.masked(), MASK, [&] {
    FUSEDOPT_DECAY_SWITCH(call.common.decay(), DECAY, [&] {
      FUSEDOPT_BOOL_SWITCH(momentum, MOMENTUM, [&] {
        FUSEDOPT_BOOL_SWITCH(momentum && call.hyper.nesterov, NESTEROV, [&] {
          FUSEDOPT_BOOL_SWITCH(momentum && call.hyper.ema, EMA, [&] {
            if constexpr (!(NESTEROV && EMA)) {
              constexpr int N = MOMENTUM ? 3 : 2;
              run_optimizer<N, MASK>(call, [&](int64_t step, auto s) {
                using S = decltype(s);
                const auto pre = math::make_pre<S>(call.common, call.grad_scale, call.scaled);
                const auto c = math::sgd_consts<S>(call.common, call.hyper, step);
                return [=](auto* x, auto keep) {
                  math::sgd_step<DECAY, MASK, MOMENTUM, NESTEROV, EMA>(x, keep, pre, c);
                };
              });
            }
          });
        });
      });
    });
  });
}

}  // namespace fusedopt::cpu::CPU_CAPABILITY
