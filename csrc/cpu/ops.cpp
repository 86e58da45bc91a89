// CPU implementations of the optimizer ops: validate, read the AMP tensors
// and steps on the host, pick the ISA, run the kernel, advance the steps.
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "fusedopt/checks.h"
#include "kernels/kernels.h"

namespace fusedopt::cpu {
namespace {

enum class Isa { DEFAULT, AVX2, AVX512 };

// The widest ISA this CPU runs, or FUSEDOPT_CPU_ISA (DEFAULT, AVX2, AVX512)
// when set, so tests can run every build of the kernels.
Isa pick_isa() {
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return Isa::AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::AVX2;
    return Isa::DEFAULT;
  }();
  const char* env = std::getenv("FUSEDOPT_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  const std::string want(env);
  const Isa forced = want == "AVX512" ? Isa::AVX512 : want == "AVX2" ? Isa::AVX2 : Isa::DEFAULT;
  TORCH_CHECK(want == "AVX512" || want == "AVX2" || want == "DEFAULT",
              "FUSEDOPT_CPU_ISA must be DEFAULT, AVX2 or AVX512, got ", want);
  TORCH_CHECK(forced <= best, "FUSEDOPT_CPU_ISA=", want, " is not supported by this CPU");
  return forced;
}

#define FUSEDOPT_ISA_CALL(NAME, ...)                          \
  switch (pick_isa()) {                                       \
    case Isa::AVX512: AVX512::NAME(__VA_ARGS__); break;      \
    case Isa::AVX2: AVX2::NAME(__VA_ARGS__); break;          \
    default: DEFAULT::NAME(__VA_ARGS__); break;               \
  }

double read_scalar(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? *static_cast<const double*>(t.data_ptr())
                                        : *static_cast<const float*>(t.data_ptr());
}

// AMP and steps (DESIGN.md §4 step 1): a set found_inf changes nothing; else
// each tensor's step advances and the kernel sees the new 1-based value.
// Returns false when the step is skipped.
template <typename Hyper>
bool begin_step(OptimizerCall<Hyper>& call, at::TensorList steps, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf) {
  if (call.tensors.empty()) return false;  // nothing to do; gather() left grad_scale/found_inf unchecked
  if (found_inf.has_value() && read_scalar(*found_inf) != 0) return false;
  if (grad_scale.has_value()) {
    call.scaled = true;
    call.grad_scale = static_cast<float>(read_scalar(*grad_scale));
  }
  for (size_t j = 0; j < call.tensors.size(); ++j) {
    const double s = read_scalar(steps[j]);
    TORCH_CHECK(s >= 0 && s < 1e15 && s == std::floor(s), "fusedopt: steps[", j,
                "] must hold a non-negative whole number, got ", s);
    call.tensors[j].step = static_cast<int64_t>(s) + 1;
  }
  return true;
}

void end_step(at::TensorList steps) {
  for (const auto& st : steps) {
    if (st.scalar_type() == at::kDouble) *static_cast<double*>(st.data_ptr()) += 1;
    else *static_cast<float*>(st.data_ptr()) += 1;
  }
}

void sgd_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
          at::TensorList steps, at::IntArrayRef indices, double lr, double momentum, double dampening,
          bool nesterov, bool ema_momentum, double weight_decay, double l1_decay, bool decoupled,
          bool maximize, double grad_keep_prob, int64_t grad_mask_seed,
          const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  OptimizerCall<math::SgdHyper> call;
  call.common = make_common(lr, weight_decay, l1_decay, decoupled, maximize, grad_keep_prob, grad_mask_seed);
  check_hyper(std::isfinite(momentum) && momentum >= 0, "momentum", momentum);
  check_hyper(std::isfinite(dampening), "dampening", dampening);
  TORCH_CHECK(!nesterov || (momentum > 0 && dampening == 0),
              "fusedopt: nesterov momentum requires a momentum and zero dampening");
  TORCH_CHECK(!ema_momentum || dampening == 0, "fusedopt: ema_momentum requires dampening=0");
  TORCH_CHECK(!(nesterov && ema_momentum), "fusedopt: nesterov and ema_momentum are exclusive");
  call.hyper = {momentum, dampening, nesterov, ema_momentum};
  call.tensors = gather("sgd_", params, grads, {{"momentum_buffers", momentum_buffers, momentum != 0}},
                        steps, indices, grad_scale, found_inf, c10::DeviceType::CPU, call.lists, call.dtype);
  if (!begin_step(call, steps, grad_scale, found_inf)) return;
  FUSEDOPT_ISA_CALL(sgd, call);
  end_step(steps);
}

void adagrad_(at::TensorList params, at::TensorList grads, at::TensorList state_sums, at::TensorList steps,
              at::IntArrayRef indices, double lr, double lr_decay, double eps, double weight_decay,
              double l1_decay, bool decoupled, bool maximize, double grad_keep_prob, int64_t grad_mask_seed,
              const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  OptimizerCall<math::AdagradHyper> call;
  call.common = make_common(lr, weight_decay, l1_decay, decoupled, maximize, grad_keep_prob, grad_mask_seed);
  check_hyper(std::isfinite(lr_decay) && lr_decay >= 0, "lr_decay", lr_decay);
  check_hyper(std::isfinite(eps) && eps >= 0, "eps", eps);
  call.hyper = {lr_decay, eps};
  call.tensors = gather("adagrad_", params, grads, {{"state_sums", state_sums, true}}, steps, indices,
                        grad_scale, found_inf, c10::DeviceType::CPU, call.lists, call.dtype);
  if (!begin_step(call, steps, grad_scale, found_inf)) return;
  FUSEDOPT_ISA_CALL(adagrad, call);
  end_step(steps);
}

void rmsprop_(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
              at::TensorList grad_avgs, at::TensorList momentum_buffers, at::TensorList steps,
              at::IntArrayRef indices, double lr, double alpha, double eps, double momentum, bool centered,
              double weight_decay, double l1_decay, bool decoupled, bool maximize, double grad_keep_prob,
              int64_t grad_mask_seed, const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf) {
  OptimizerCall<math::RmspropHyper> call;
  call.common = make_common(lr, weight_decay, l1_decay, decoupled, maximize, grad_keep_prob, grad_mask_seed);
  check_hyper(std::isfinite(alpha) && alpha >= 0, "alpha", alpha);
  check_hyper(std::isfinite(eps) && eps >= 0, "eps", eps);
  check_hyper(std::isfinite(momentum) && momentum >= 0, "momentum", momentum);
  call.hyper = {alpha, eps, momentum, centered};
  call.tensors = gather("rmsprop_", params, grads,
                        {{"square_avgs", square_avgs, true},
                         {"grad_avgs", grad_avgs, centered},
                         {"momentum_buffers", momentum_buffers, momentum > 0}},
                        steps, indices, grad_scale, found_inf, c10::DeviceType::CPU, call.lists, call.dtype);
  if (!begin_step(call, steps, grad_scale, found_inf)) return;
  FUSEDOPT_ISA_CALL(rmsprop, call);
  end_step(steps);
}

void adam_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
           at::TensorList max_exp_avg_sqs, at::TensorList steps, at::IntArrayRef indices, double lr,
           double beta1, double beta2, double eps, bool amsgrad, bool eps_inside_sqrt, double weight_decay,
           double l1_decay, bool decoupled, bool maximize, double grad_keep_prob, int64_t grad_mask_seed,
           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  OptimizerCall<math::AdamHyper> call;
  call.common = make_common(lr, weight_decay, l1_decay, decoupled, maximize, grad_keep_prob, grad_mask_seed);
  check_hyper(beta1 >= 0 && beta1 < 1, "beta1", beta1);
  check_hyper(beta2 >= 0 && beta2 < 1, "beta2", beta2);
  check_hyper(std::isfinite(eps) && eps >= 0, "eps", eps);
  call.hyper = {beta1, beta2, eps, amsgrad, eps_inside_sqrt};
  call.tensors = gather("adam_", params, grads,
                        {{"exp_avgs", exp_avgs, true},
                         {"exp_avg_sqs", exp_avg_sqs, true},
                         {"max_exp_avg_sqs", max_exp_avg_sqs, amsgrad}},
                        steps, indices, grad_scale, found_inf, c10::DeviceType::CPU, call.lists, call.dtype);
  if (!begin_step(call, steps, grad_scale, found_inf)) return;
  FUSEDOPT_ISA_CALL(adam, call);
  end_step(steps);
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
  m.impl("sgd_", &sgd_);
  m.impl("adagrad_", &adagrad_);
  m.impl("rmsprop_", &rmsprop_);
  m.impl("adam_", &adam_);
  m.impl("stream_", &stream_);
}

// A sparse gradient dispatches here; gather() rejects it with a plain message
// instead of the dispatcher's "could not run with SparseCPU".
TORCH_LIBRARY_IMPL(fusedopt, SparseCPU, m) {
  m.impl("sgd_", &sgd_);
  m.impl("adagrad_", &adagrad_);
  m.impl("rmsprop_", &rmsprop_);
  m.impl("adam_", &adam_);
}

}  // namespace fusedopt::cpu
