// Grid emulation (DESIGN.md §7): fusedopt::_gridemu_<op>_ runs the CUDA
// kernels' per-chunk bodies (fusedopt/mta.h) over the CUDA launch plan, on the
// host, for CPU tensors. Validation, the plan, the bodies and the step launches
// are the CUDA op's own code; only the __global__ shell and the <<<>>> launch
// are replaced by loops over blocks and threads. The bodies read the steps,
// grad_scale and found_inf through their pointers, as the kernels do on the
// device. Tests compare these ops bitwise with the CPU ops (tests/test_gridemu.py).
//
// FUSEDOPT_GRIDEMU_PLAN="tensors,blocks,chunk,threads" (read at every call)
// shrinks the launch limits, so small tests split tensors across launches and
// chunks; unset, the limits are the CUDA launcher's.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <sstream>
#include <string>

#include "fusedopt/calls.h"
#include "fusedopt/mta.h"

namespace fusedopt::gridemu {
namespace {

template <int N>
mta::Limits limits() {
  mta::Limits lim = mta::cuda_limits<N>();
  const char* env = std::getenv("FUSEDOPT_GRIDEMU_PLAN");
  if (env == nullptr || *env == '\0') return lim;
  std::istringstream in(env);
  char c1 = 0, c2 = 0, c3 = 0;
  in >> lim.tensors >> c1 >> lim.blocks >> c2 >> lim.chunk >> c3 >> lim.threads;
  TORCH_CHECK(in && c1 == ',' && c2 == ',' && c3 == ',' && (in >> std::ws).eof(),
              "FUSEDOPT_GRIDEMU_PLAN must read \"tensors,blocks,chunk,threads\", got \"", env, "\"");
  // Slots per launch beyond the device table's size cannot be emulated.
  lim.tensors = std::min(lim.tensors, mta::Table<N>::K);
  return lim;
}

const float* scalar_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

// Every block of a launch, every thread of a block. Blocks touch disjoint
// chunks, so they may run in parallel like on the device.
template <typename F>
void grid(int64_t blocks, int threads, const F& body) {
  at::parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b)
      for (int tid = 0; tid < threads; ++tid) body(b, tid);
  });
}

template <typename Hyper>
void run(const OptimizerCall<Hyper>& call, at::TensorList steps, const std::optional<at::Tensor>& grad_scale,
         const std::optional<at::Tensor>& found_inf) {
  if (call.tensors.empty()) return;
  const float* scale = scalar_ptr(grad_scale);
  const float* inf = scalar_ptr(found_inf);
  mta::with_body(call, [&](auto body) {
    using Body = decltype(body);
    const mta::Limits lim = limits<Body::N>();
    mta::for_each_launch<Body>(call, scale, inf, lim, [&](const typename Body::Args& args) {
      grid(args.tab.blocks, lim.threads, [&](int64_t b, int tid) { Body::run(args, b, tid, lim.threads); });
    });
  });
  mta::for_each_step_launch(steps, inf, mta::StepTable::K, mta::kStepThreads,
                            [&](const mta::StepArgs& args, int64_t blocks) {
                              grid(blocks, mta::kStepThreads, [&](int64_t b, int tid) {
                                mta::step_chunk(args, b, tid, mta::kStepThreads);
                              });
                            });
}

template <typename Lr>
void sgd_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, at::TensorList steps,
          at::IntArrayRef indices, Lr lr, double momentum, double dampening, bool nesterov, bool ema_momentum,
          double weight_decay, double l1_decay, bool decoupled, bool maximize, double grad_keep_prob,
          int64_t grad_mask_seed, bool stochastic_rounding, const std::optional<at::Tensor>& grad_scale,
          const std::optional<at::Tensor>& found_inf) {
  const KernelScalar klr = kernel_scalar("sgd_", "lr", lr, params, true);
  auto call = sgd_call(params, grads, momentum_buffers, steps, indices, klr.value, momentum, dampening, nesterov,
                       ema_momentum, weight_decay, l1_decay, decoupled, maximize, grad_keep_prob,
                       grad_mask_seed, stochastic_rounding, grad_scale, found_inf, c10::DeviceType::CPU);
  call.lr = klr.ptr();
  run(call, steps, grad_scale, found_inf);
}

template <typename Lr>
void adagrad_(at::TensorList params, at::TensorList grads, at::TensorList state_sums, at::TensorList steps,
              at::IntArrayRef indices, Lr lr, double lr_decay, double eps, double weight_decay,
              double l1_decay, bool decoupled, bool maximize, double grad_keep_prob, int64_t grad_mask_seed, bool stochastic_rounding,
              const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const KernelScalar klr = kernel_scalar("adagrad_", "lr", lr, params, true);
  auto call = adagrad_call(params, grads, state_sums, steps, indices, klr.value, lr_decay, eps, weight_decay,
                           l1_decay, decoupled, maximize, grad_keep_prob, grad_mask_seed, stochastic_rounding, grad_scale,
                           found_inf, c10::DeviceType::CPU);
  call.lr = klr.ptr();
  run(call, steps, grad_scale, found_inf);
}

template <typename Lr>
void rmsprop_(at::TensorList params, at::TensorList grads, at::TensorList square_avgs, at::TensorList grad_avgs,
              at::TensorList momentum_buffers, at::TensorList steps, at::IntArrayRef indices, Lr lr,
              double alpha, double eps, double momentum, bool centered, double weight_decay, double l1_decay,
              bool decoupled, bool maximize, double grad_keep_prob, int64_t grad_mask_seed, bool stochastic_rounding,
              const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const KernelScalar klr = kernel_scalar("rmsprop_", "lr", lr, params, true);
  auto call = rmsprop_call(params, grads, square_avgs, grad_avgs, momentum_buffers, steps, indices, klr.value,
                           alpha, eps, momentum, centered, weight_decay, l1_decay, decoupled, maximize,
                           grad_keep_prob, grad_mask_seed, stochastic_rounding, grad_scale, found_inf, c10::DeviceType::CPU);
  call.lr = klr.ptr();
  run(call, steps, grad_scale, found_inf);
}

template <typename Lr>
void adam_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
           at::TensorList max_exp_avg_sqs, at::TensorList steps, at::IntArrayRef indices, LrArg<Lr> lr, BetaArg<Lr> beta1,
           BetaArg<Lr> beta2, double eps, bool amsgrad, bool eps_inside_sqrt, double weight_decay, double l1_decay,
           bool decoupled, bool maximize, double grad_keep_prob, int64_t grad_mask_seed, bool stochastic_rounding,
           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const KernelScalar klr = kernel_scalar("adam_", "lr", lr, params, true);
  const KernelScalar kb1 = kernel_scalar("adam_", "beta1", beta1, params, true);
  const KernelScalar kb2 = kernel_scalar("adam_", "beta2", beta2, params, true);
  auto call = adam_call(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, indices, klr.value, kb1.value,
                        kb2.value, eps, amsgrad, eps_inside_sqrt, weight_decay, l1_decay, decoupled, maximize,
                        grad_keep_prob, grad_mask_seed, stochastic_rounding, grad_scale, found_inf, c10::DeviceType::CPU);
  call.lr = klr.ptr();
  call.beta1 = kb1.ptr();
  call.beta2 = kb2.ptr();
  run(call, steps, grad_scale, found_inf);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) {
  FUSEDOPT_IMPL_OPTIMIZERS(m, "_gridemu_");
}

}  // namespace fusedopt::gridemu
