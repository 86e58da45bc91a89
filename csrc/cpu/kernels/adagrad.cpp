#include "../vec.h"  // first: Note [Rule bodies]
#include "../loop.h"
#include "kernels.h"

namespace fusedopt::cpu::CPU_CAPABILITY {

void adagrad(const OptimizerCall<math::AdagradHyper>& call) {
  FUSEDOPT_BOOL_SWITCH(call.common.masked(), MASK, [&] {
    FUSEDOPT_DECAY_SWITCH(call.common.decay(), DECAY, [&] {
      run_optimizer<3, MASK>(call, [&](const TensorRef& t, auto s) {
        using S = decltype(s);
        const auto pre = math::make_pre<S>(call.common, call.grad_scale, call.scaled);
        const auto c = math::adagrad_consts<S>(call.common, call.hyper, t.step);
        return [=](auto* x, auto keep) {
          x[1] = math::prelude<DECAY, MASK>(x[1], x[0], keep, pre);
          math::adagrad_rule(x[0], x[1], x[2], c);
          math::epilogue<DECAY>(x[0], pre);
        };
      });
    });
  });
}

}  // namespace fusedopt::cpu::CPU_CAPABILITY
