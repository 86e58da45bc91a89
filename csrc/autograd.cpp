// The optimizer ops' Autograd kernel, for every device (Note [Optimizer ops
// under autograd]).
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <type_traits>

#include "fusedopt/calls.h"
#include "fusedopt/op_handle.h"

namespace fusedopt {
namespace {

// Note [Optimizer ops under autograd]
// The optimizer ops update their lists in place and have no derivative. An
// op without an Autograd kernel gets torch's fallback, which walks every
// argument on every call (~0.15 µs per tensor: 0.5 ms per step of 3000
// parameters) and leaves version counters alone, so autograd could not tell
// that a parameter it saved for backward was stepped before the backward ran.
// This kernel does what torch's own in-place ops do, and only that: under grad
// mode it refuses a mutated tensor that requires grad (the step cannot be
// differentiated; the optimizers call the ops under no_grad), it bumps the
// version counter of every tensor of a mutable list, and it redispatches to
// the device kernel. The bumps come first: one that fails (an inference
// tensor outside inference mode, as for torch's in-place ops) fails before
// any data changes. It is an unboxed kernel of the op's own signature, so a
// call from C++ (Note [Direct calls] in csrc/module.cpp) reaches the device
// kernel without boxing its lists into IValues.
template <typename Sig>
struct Autograd;

template <typename... Args>
struct Autograd<void(Args...)> {
  template <const char* Name, const char* Overload>
  static void kernel(c10::DispatchKeySet keys, Args... args) {
    const auto& op = optimizer_op<void(Args...), Name, Overload>();
    const auto& schema = op.schema().arguments();
    const bool grad_mode = at::GradMode::is_enabled();
    size_t i = 0;
    auto bump = [&](const auto& arg) {
      if constexpr (std::is_same_v<std::decay_t<decltype(arg)>, at::TensorList>) {
        const c10::AliasInfo* alias = schema[i].alias_info();
        if (alias != nullptr && alias->isWrite()) {
          for (const at::Tensor& t : arg) {
            if (!t.defined()) continue;  // the device kernel names it
            TORCH_CHECK(!(grad_mode && t.requires_grad()), op.schema().name(), ": ", schema[i].name(),
                        " holds a tensor that requires grad while grad mode is on; the optimizer step has no "
                        "derivative, call it under torch.no_grad()");
            torch::autograd::impl::bump_version(t);
          }
        }
      }
      ++i;
    };
    (bump(args), ...);
    op.redispatch(keys & c10::after_autograd_keyset, args...);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fusedopt, Autograd, m) {
#define FUSEDOPT_IMPL_AUTOGRAD(OP, FN, LR, NAME, OVERLOAD)                          \
  {                                                                              \
    FUSEDOPT_OPTIMIZER_OP_NAMES(NAME, OVERLOAD);                                 \
    m.impl(registered, TORCH_FN((Autograd<OP<LR>>::kernel<name, overload>)));    \
  }
  FUSEDOPT_FOR_EACH_OPTIMIZER_OP(FUSEDOPT_IMPL_AUTOGRAD)
#undef FUSEDOPT_IMPL_AUTOGRAD
}

}  // namespace fusedopt
