// CPU implementations of the optimizer ops: validate, read the AMP tensors
// and steps on the host, pick the ISA, run the kernel, advance the steps.
#include <torch/library.h>

#include <cmath>

#include "fusedopt/calls.h"
#include "isa.h"
#include "kernels/kernels.h"

namespace fusedopt::cpu {
namespace {

double read_scalar(const at::Tensor& t) { return scalar_value(t.data_ptr(), t.scalar_type() == at::kDouble); }

// AMP and steps (DESIGN.md §4 step 1): a set found_inf changes nothing; else
// each tensor's step advances and the kernel sees the new 1-based value.
// Returns false when the step is skipped. The steps are read and advanced
// through the pointers gather() took: on 3000 small parameters every pass
// over the tensors' storages is mostly cache misses.
template <typename Hyper>
bool begin_step(OptimizerCall<Hyper>& call, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf) {
  if (call.tensors.empty()) return false;  // nothing to do; gather() left grad_scale/found_inf unchecked
  if (found_inf.has_value() && read_scalar(*found_inf) != 0) return false;
  if (grad_scale.has_value()) {
    call.scaled = true;
    call.grad_scale = static_cast<float>(read_scalar(*grad_scale));
  }
  for (size_t j = 0; j < call.tensors.size(); ++j) {
    TensorRef& t = call.tensors[j];
    const double s = scalar_value(t.step_ptr, t.step_double);
    TORCH_CHECK(s >= 0 && s < 1e15 && s == std::floor(s), "fusedopt: steps[", j,
                "] must hold a non-negative whole number, got ", s);
    t.step = static_cast<int64_t>(s) + 1;
  }
  return true;
}

template <typename Hyper>
void end_step(const OptimizerCall<Hyper>& call) {
  for (const TensorRef& t : call.tensors) {
    if (t.step_double) *static_cast<double*>(t.step_ptr) += 1;
    else *static_cast<float*>(t.step_ptr) += 1;
  }
}

constexpr auto kCPU = c10::DeviceType::CPU;

template <typename Lr>
void sgd_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
          at::TensorList steps, at::IntArrayRef indices, Lr lr, double momentum, double dampening,
          bool nesterov, bool ema_momentum, double weight_decay, double l1_decay, bool decoupled,
          bool maximize, double grad_keep_prob, int64_t grad_mask_seed, bool stochastic_rounding,
          const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const double lr_host = host_scalar("sgd_", "lr", lr);
  auto call = sgd_call(params, grads, momentum_buffers, steps, indices, lr_host, momentum, dampening, nesterov,
                       ema_momentum, weight_decay, l1_decay, decoupled, maximize, grad_keep_prob, grad_mask_seed, stochastic_rounding,
                       grad_scale, found_inf, kCPU);
  if (!begin_step(call, grad_scale, found_inf)) return;
  FUSEDOPT_ISA_CALL(sgd, call);
  end_step(call);
}

template <typename Lr>
void adagrad_(at::TensorList params, at::TensorList grads, at::TensorList state_sums, at::TensorList steps,
              at::IntArrayRef indices, Lr lr, double lr_decay, double eps, double weight_decay,
              double l1_decay, bool decoupled, bool maximize, double grad_keep_prob, int64_t grad_mask_seed, bool stochastic_rounding,
              const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const double lr_host = host_scalar("adagrad_", "lr", lr);
  auto call = adagrad_call(params, grads, state_sums, steps, indices, lr_host, lr_decay, eps, weight_decay,
                           l1_decay, decoupled, maximize, grad_keep_prob, grad_mask_seed, stochastic_rounding, grad_scale, found_inf,
                           kCPU);
  if (!begin_step(call, grad_scale, found_inf)) return;
  FUSEDOPT_ISA_CALL(adagrad, call);
  end_step(call);
}

template <typename Lr>
void rmsprop_(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
              at::TensorList grad_avgs, at::TensorList momentum_buffers, at::TensorList steps,
              at::IntArrayRef indices, Lr lr, double alpha, double eps, double momentum, bool centered,
              double weight_decay, double l1_decay, bool decoupled, bool maximize, double grad_keep_prob,
              int64_t grad_mask_seed, bool stochastic_rounding, const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf) {
  const double lr_host = host_scalar("rmsprop_", "lr", lr);
  auto call = rmsprop_call(params, grads, square_avgs, grad_avgs, momentum_buffers, steps, indices, lr_host, alpha,
                           eps, momentum, centered, weight_decay, l1_decay, decoupled, maximize, grad_keep_prob,
                           grad_mask_seed, stochastic_rounding, grad_scale, found_inf, kCPU);
  if (!begin_step(call, grad_scale, found_inf)) return;
  FUSEDOPT_ISA_CALL(rmsprop, call);
  end_step(call);
}

template <typename Lr>
void adam_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
           at::TensorList max_exp_avg_sqs, at::TensorList steps, at::IntArrayRef indices, LrArg<Lr> lr,
           BetaArg<Lr> beta1, BetaArg<Lr> beta2, double eps, bool amsgrad, bool eps_inside_sqrt, double weight_decay,
           double l1_decay, bool decoupled, bool maximize, double grad_keep_prob, int64_t grad_mask_seed, bool stochastic_rounding,
           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const double lr_host = host_scalar("adam_", "lr", lr);
  const double beta1_host = host_scalar("adam_", "beta1", beta1);
  const double beta2_host = host_scalar("adam_", "beta2", beta2);
  auto call = adam_call(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, indices, lr_host, beta1_host,
                        beta2_host, eps, amsgrad, eps_inside_sqrt, weight_decay, l1_decay, decoupled, maximize,
                        grad_keep_prob, grad_mask_seed, stochastic_rounding, grad_scale, found_inf, kCPU);
  if (!begin_step(call, grad_scale, found_inf)) return;
  FUSEDOPT_ISA_CALL(adam, call);
  end_step(call);
}

void stream_(const at::Tensor& a, const at::Tensor& b, double s) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "stream_: expected CPU tensors");
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat, "stream_: expected float32");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && a.numel() == b.numel(),
              "stream_: expected contiguous tensors of equal size");
  FUSEDOPT_ISA_CALL(stream, a.data_ptr<float>(), b.data_ptr<float>(), static_cast<float>(s), a.numel());
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) {
  FUSEDOPT_IMPL_OPTIMIZERS(m, "");
  m.impl("stream_", &stream_);
}

// A sparse gradient dispatches here; gather() rejects it with a plain message
// instead of the dispatcher's "could not run with SparseCPU".
TORCH_LIBRARY_IMPL(fusedopt, SparseCPU, m) {
  FUSEDOPT_IMPL_OPTIMIZERS(m, "");
}

}  // namespace fusedopt::cpu
