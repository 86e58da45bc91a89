#include "../vec.h"  // first: Note [Rule bodies]
#include "../loop.h"
#include "kernels.h"

namespace fusedopt::cpu::CPU_CAPABILITY {

void update(const OptimizerCall<math::AdagradHyper>& call) {
  FUSEDOPT_BOOL_SWITCH(call.common.masked(), MASK, [&] {
    FUSEDOPT_DECAY_SWITCH(call.common.decay(), DECAY, [&] {
      run_optimizer<3, MASK>(call, [&](int64_t step, auto s) {
        using S = decltype(s);
        const auto pre = math::make_pre<S>(call.common, call.grad_scale, call.scaled);
        const auto c = math::adagrad_consts<S>(call.common, call.hyper, step);
        return [=](auto* x, auto keep) {
          math::adagrad_step<DECAY, MASK>(x, keep, pre, c);
        };
      });
    });
  });
}

}  // namespace fusedopt::cpu::CPU_CAPABILITY
