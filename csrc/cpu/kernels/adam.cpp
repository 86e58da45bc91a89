#include "../vec.h"  // first: Note [Rule bodies]
#include "../loop.h"
#include "kernels.h"

namespace fusedopt::cpu::CPU_CAPABILITY {

void update(const OptimizerCall<math::AdamHyper>& call) {
  FUSEDOPT_BOOL_SWITCH(call.common.masked(), MASK, [&] {
    FUSEDOPT_DECAY_SWITCH(call.common.decay(), DECAY, [&] {
      FUSEDOPT_BOOL_SWITCH(call.hyper.amsgrad, AMSGRAD, [&] {
        constexpr int N = AMSGRAD ? 5 : 4;
        run_optimizer<N, MASK>(call, [&](int64_t step, auto s) {
          using S = decltype(s);
          const auto pre = math::make_pre<S>(call.common, call.grad_scale, call.scaled);
          const auto c = math::adam_consts<S>(call.common, call.hyper, step);
          return [=](auto* x, auto keep) {
            math::adam_step<DECAY, MASK, AMSGRAD>(x, keep, pre, c);
          };
        });
      });
    });
  });
}

}  // namespace fusedopt::cpu::CPU_CAPABILITY
