#pragma once
// The optimizer ops, written once for every device (Note [Device ops]):
// validate the options and the lists, build the call a kernel runs, and hand
// it to the device: the CPU ops (csrc/cpu/ops.cpp), the CUDA ops and their
// host emulation (csrc/cpu/gridemu.cpp).
#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string>
#include <type_traits>

#include "fusedopt/checks.h"
#include "fusedopt/math/adagrad.h"
#include "fusedopt/math/adam.h"
#include "fusedopt/math/rmsprop.h"
#include "fusedopt/math/sgd.h"

namespace fusedopt {

// Every tensor of a call on one device, named in the message; runs first, so a
// CPU gradient in a CUDA call reads as what it is (the dispatcher picks the
// CUDA kernel as soon as one argument is a CUDA tensor).
inline void check_one_device(const char* op, std::initializer_list<std::pair<const char*, at::TensorList>> lists,
                             const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& found_inf) {
  std::optional<at::Device> device;
  const char* first = nullptr;
  auto see = [&](const at::Tensor& t, const char* name, size_t j) {
    if (!t.defined()) return;
    if (!device) {
      device = t.device();
      first = name;
      return;
    }
    TORCH_CHECK(t.device() == *device, op, ": ", name, "[", j, "] is on ", t.device(), " but ", first,
                " is on ", *device, "; all tensors of one call must share one device");
  };
  for (const auto& [name, list] : lists)
    for (size_t j = 0; j < list.size(); ++j) see(list[j], name, j);
  if (grad_scale) see(*grad_scale, "grad_scale", 0);
  if (found_inf) see(*found_inf, "found_inf", 0);
}

// Note [Tensor lr]
// Each optimizer op has a `.tensor_lr` overload (as torch's fused optimizers
// do) whose lr is a one-element float32/float64 tensor. Under torch.compile a
// tensor lr is a graph input, so an LR scheduler that changes it recompiles
// nothing; on CUDA the kernels read it, so a step needs no host sync and a
// CUDA graph replays whatever lr the tensor holds. A CPU lr is read on the
// host and checked like a float lr: the result is the float op's, bit for bit.
// An lr on the params' CUDA device replaces Common::lr in every chunk body
// (mta.h), unchecked: a check would need a sync, which torch's fused
// optimizers do not make either. Grid emulation reads its CPU lr the device's
// way, through the pointer. Adam's betas may be tensors too (Note [Tensor
// betas]).

// A one-element float32/float64 tensor standing for the option `name`.
inline void check_scalar_tensor(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined() && t.layout() == at::kStrided && t.numel() == 1, op, ": a tensor ", name,
              " must be a dense tensor of one element");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": a tensor ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

// An option read on the host: a float as it is, a CPU tensor's value.
inline double host_scalar(const char*, const char*, double value) { return value; }
inline double host_scalar(const char* op, const char* name, const at::Tensor& t) {
  check_scalar_tensor(op, name, t);
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU for CPU params, got ", t.device());
  return t.scalar_type() == at::kDouble ? *t.const_data_ptr<double>() : *t.const_data_ptr<float>();
}

// Where a device's kernels take an option (lr, β1, β2): its value, read on
// the host (CPU); or, given as a tensor, through a pointer (CUDA, where a CPU
// tensor is read on the host; grid emulation, whose CPU tensors take the
// device path).
enum class Options { kHost, kDevice, kEmulated };

// An option as a device takes it: `value` for the checks and the host side,
// and `tensor` (float64, on the params' device) when the kernels read it.
struct KernelScalar {
  double value = 0;
  at::Tensor tensor;
  const double* ptr() const { return tensor.defined() ? tensor.const_data_ptr<double>() : nullptr; }
};

template <Options Where>
KernelScalar kernel_scalar(const char*, const char*, double value, at::TensorList) {
  return {value, {}};
}
template <Options Where>
KernelScalar kernel_scalar(const char* op, const char* name, const at::Tensor& t, at::TensorList params) {
  if (Where == Options::kHost || (Where == Options::kDevice && t.device().is_cpu()))
    return {host_scalar(op, name, t), {}};
  check_scalar_tensor(op, name, t);
  if (!params.empty() && params[0].defined())
    TORCH_CHECK(t.device() == params[0].device(), op, ": ", name, " is on ", t.device(), " but params[0] is on ",
                params[0].device(), "; a tensor ", name, " lies on the CPU or on the params' device");
  return {0, t.to(at::kDouble).reshape({1}).contiguous()};
}

// Note [Tensor betas]
// adam_ has a third overload, `.tensor_betas`, whose lr, beta1 and beta2 are
// all one-element float32/float64 tensors: fusedopt.Adam given tensor betas,
// as torch.optim.Adam takes them (`betas=(Tensor, Tensor)`, for a beta
// schedule under torch.compile or in a CUDA graph). They go where a tensor lr
// goes (Note [Tensor lr]). Under torch.compile they are graph inputs: a float
// read from a tensor there is a symbolic value that a `float` argument cannot
// take, so tracing the float op failed. A CPU tensor is read on the host and
// checked like a float. One on the params' CUDA device is read by the kernels,
// unchecked and with no host sync, so a captured step replays whatever the
// tensors hold; each chunk computes the bias corrections 1 − β^t from that
// double, as the host does, so the bits are the float op's for the same values
// (grid emulation reads its CPU betas the device's way, through the pointers).
// Only Adam has betas; the other ops keep two overloads. The Lr of
// FUSEDOPT_FOR_EACH_OPTIMIZER_OP names the overload: double, const Tensor&,
// or TensorBetas, whose lr and betas are tensors.
struct TensorBetas {};
template <typename Lr>
using LrArg = std::conditional_t<std::is_same_v<Lr, TensorBetas>, const at::Tensor&, Lr>;
template <typename Lr>
using BetaArg = std::conditional_t<std::is_same_v<Lr, TensorBetas>, const at::Tensor&, double>;

// The C++ signatures of the optimizer ops (the schemas of
// csrc/registration.cpp), with lr a double or, in the `.tensor_lr` overload,
// a tensor (and adam_'s betas, Note [Tensor betas]). The ops below implement
// them for every device (FUSEDOPT_IMPL_OPTIMIZERS checks that at compile
// time), the Autograd kernel (csrc/autograd.cpp) takes them unboxed, and
// csrc/module.cpp calls them from Python (Note [Direct calls]).
template <typename Lr>
using SgdOp = void(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   at::TensorList steps, at::IntArrayRef indices, Lr lr, double momentum, double dampening,
                   bool nesterov, bool ema_momentum, double weight_decay, double l1_decay, bool decoupled,
                   bool maximize, double grad_keep_prob, int64_t grad_mask_seed, bool stochastic_rounding,
                   at::OptionalIntArrayRef shard_offsets, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf);
template <typename Lr>
using AdagradOp = void(at::TensorList params, at::TensorList grads, at::TensorList state_sums, at::TensorList steps,
                       at::IntArrayRef indices, Lr lr, double lr_decay, double eps, double weight_decay,
                       double l1_decay, bool decoupled, bool maximize, double grad_keep_prob, int64_t grad_mask_seed,
                       bool stochastic_rounding, at::OptionalIntArrayRef shard_offsets,
                       const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf);
template <typename Lr>
using RmspropOp = void(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                       at::TensorList grad_avgs, at::TensorList momentum_buffers, at::TensorList steps,
                       at::IntArrayRef indices, Lr lr, double alpha, double eps, double momentum, bool centered,
                       double weight_decay, double l1_decay, bool decoupled, bool maximize, double grad_keep_prob,
                       int64_t grad_mask_seed, bool stochastic_rounding, at::OptionalIntArrayRef shard_offsets,
                       const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf);
template <typename Lr>
using AdamOp = void(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList steps, at::IntArrayRef indices, LrArg<Lr> lr,
                    BetaArg<Lr> beta1, BetaArg<Lr> beta2, double eps, bool amsgrad, bool eps_inside_sqrt, double weight_decay,
                    double l1_decay, bool decoupled, bool maximize, double grad_keep_prob, int64_t grad_mask_seed,
                    bool stochastic_rounding, at::OptionalIntArrayRef shard_offsets,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf);

// Note [Device ops]
// Each optimizer op is written once, here, for every device. A device
// (csrc/cpu/ops.cpp, csrc/cuda/optimizers.cu and its host emulation
// csrc/cpu/gridemu.cpp) supplies only what differs:
//   kType      the device type gather() expects of the tensors;
//   kOneDevice whether check_one_device() runs first (CUDA);
//   kOptions   where its kernels take lr (and Adam's betas) from;
//   run(call, params, steps, grad_scale, found_inf)
//              runs the validated call and advances the steps.
// So every device rejects exactly the same inputs with the same messages, and
// an option is added here and in the schema, nowhere else.
template <typename Device, typename Lr>
void sgd_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, at::TensorList steps,
          at::IntArrayRef indices, Lr lr, double momentum, double dampening, bool nesterov, bool ema_momentum,
          double weight_decay, double l1_decay, bool decoupled, bool maximize, double grad_keep_prob,
          int64_t grad_mask_seed, bool stochastic_rounding, at::OptionalIntArrayRef shard_offsets,
          const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  if constexpr (Device::kOneDevice)
    check_one_device("sgd_", {{"params", params}, {"grads", grads}, {"momentum_buffers", momentum_buffers},
                              {"steps", steps}}, grad_scale, found_inf);
  const KernelScalar klr = kernel_scalar<Device::kOptions>("sgd_", "lr", lr, params);
  OptimizerCall<math::SgdHyper> call;
  call.common = make_common(klr.value, weight_decay, l1_decay, decoupled, maximize, grad_keep_prob, grad_mask_seed,
                            stochastic_rounding);
  check_hyper(std::isfinite(momentum) && momentum >= 0, "momentum", momentum);
  check_hyper(std::isfinite(dampening), "dampening", dampening);
  TORCH_CHECK(!nesterov || (momentum > 0 && dampening == 0),
              "fusedopt: nesterov momentum requires a momentum and zero dampening");
  TORCH_CHECK(!ema_momentum || dampening == 0, "fusedopt: ema_momentum requires dampening=0");
  TORCH_CHECK(!(nesterov && ema_momentum), "fusedopt: nesterov and ema_momentum are exclusive");
  call.hyper = {momentum, dampening, nesterov, ema_momentum};
  gather("sgd_", call, params, grads, {{"momentum_buffers", momentum_buffers, momentum != 0}}, steps, indices,
         shard_offsets, grad_scale, found_inf, Device::kType);
  call.lr = klr.ptr();
  Device::run(call, params, steps, grad_scale, found_inf);
}

template <typename Device, typename Lr>
void adagrad_(at::TensorList params, at::TensorList grads, at::TensorList state_sums, at::TensorList steps,
              at::IntArrayRef indices, Lr lr, double lr_decay, double eps, double weight_decay, double l1_decay,
              bool decoupled, bool maximize, double grad_keep_prob, int64_t grad_mask_seed, bool stochastic_rounding,
              at::OptionalIntArrayRef shard_offsets, const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf) {
  if constexpr (Device::kOneDevice)
    check_one_device("adagrad_", {{"params", params}, {"grads", grads}, {"state_sums", state_sums},
                                  {"steps", steps}}, grad_scale, found_inf);
  const KernelScalar klr = kernel_scalar<Device::kOptions>("adagrad_", "lr", lr, params);
  OptimizerCall<math::AdagradHyper> call;
  call.common = make_common(klr.value, weight_decay, l1_decay, decoupled, maximize, grad_keep_prob, grad_mask_seed,
                            stochastic_rounding);
  check_hyper(std::isfinite(lr_decay) && lr_decay >= 0, "lr_decay", lr_decay);
  check_hyper(std::isfinite(eps) && eps >= 0, "eps", eps);
  call.hyper = {lr_decay, eps};
  gather("adagrad_", call, params, grads, {{"state_sums", state_sums, true}}, steps, indices, shard_offsets,
         grad_scale, found_inf, Device::kType);
  call.lr = klr.ptr();
  Device::run(call, params, steps, grad_scale, found_inf);
}

template <typename Device, typename Lr>
void rmsprop_(at::TensorList params, at::TensorList grads, at::TensorList square_avgs, at::TensorList grad_avgs,
              at::TensorList momentum_buffers, at::TensorList steps, at::IntArrayRef indices, Lr lr, double alpha,
              double eps, double momentum, bool centered, double weight_decay, double l1_decay, bool decoupled,
              bool maximize, double grad_keep_prob, int64_t grad_mask_seed, bool stochastic_rounding,
              at::OptionalIntArrayRef shard_offsets, const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf) {
  if constexpr (Device::kOneDevice)
    check_one_device("rmsprop_", {{"params", params}, {"grads", grads}, {"square_avgs", square_avgs},
                                  {"grad_avgs", grad_avgs}, {"momentum_buffers", momentum_buffers},
                                  {"steps", steps}}, grad_scale, found_inf);
  const KernelScalar klr = kernel_scalar<Device::kOptions>("rmsprop_", "lr", lr, params);
  OptimizerCall<math::RmspropHyper> call;
  call.common = make_common(klr.value, weight_decay, l1_decay, decoupled, maximize, grad_keep_prob, grad_mask_seed,
                            stochastic_rounding);
  check_hyper(std::isfinite(alpha) && alpha >= 0, "alpha", alpha);
  check_hyper(std::isfinite(eps) && eps >= 0, "eps", eps);
  check_hyper(std::isfinite(momentum) && momentum >= 0, "momentum", momentum);
  call.hyper = {alpha, eps, momentum, centered};
  gather("rmsprop_", call, params, grads,
         {{"square_avgs", square_avgs, true},
          {"grad_avgs", grad_avgs, centered},
          {"momentum_buffers", momentum_buffers, momentum > 0}},
         steps, indices, shard_offsets, grad_scale, found_inf, Device::kType);
  call.lr = klr.ptr();
  Device::run(call, params, steps, grad_scale, found_inf);
}

template <typename Device, typename Lr>
void adam_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
           at::TensorList max_exp_avg_sqs, at::TensorList steps, at::IntArrayRef indices, LrArg<Lr> lr,
           BetaArg<Lr> beta1, BetaArg<Lr> beta2, double eps, bool amsgrad, bool eps_inside_sqrt, double weight_decay,
           double l1_decay, bool decoupled, bool maximize, double grad_keep_prob, int64_t grad_mask_seed,
           bool stochastic_rounding, at::OptionalIntArrayRef shard_offsets,
           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  if constexpr (Device::kOneDevice)
    check_one_device("adam_", {{"params", params}, {"grads", grads}, {"exp_avgs", exp_avgs},
                               {"exp_avg_sqs", exp_avg_sqs}, {"max_exp_avg_sqs", max_exp_avg_sqs},
                               {"steps", steps}}, grad_scale, found_inf);
  const KernelScalar klr = kernel_scalar<Device::kOptions>("adam_", "lr", lr, params);
  const KernelScalar kb1 = kernel_scalar<Device::kOptions>("adam_", "beta1", beta1, params);
  const KernelScalar kb2 = kernel_scalar<Device::kOptions>("adam_", "beta2", beta2, params);
  OptimizerCall<math::AdamHyper> call;
  call.common = make_common(klr.value, weight_decay, l1_decay, decoupled, maximize, grad_keep_prob, grad_mask_seed,
                            stochastic_rounding);
  check_hyper(kb1.value >= 0 && kb1.value < 1, "beta1", kb1.value);
  check_hyper(kb2.value >= 0 && kb2.value < 1, "beta2", kb2.value);
  check_hyper(std::isfinite(eps) && eps >= 0, "eps", eps);
  call.hyper = {kb1.value, kb2.value, eps, amsgrad, eps_inside_sqrt};
  gather("adam_", call, params, grads,
         {{"exp_avgs", exp_avgs, true},
          {"exp_avg_sqs", exp_avg_sqs, true},
          {"max_exp_avg_sqs", max_exp_avg_sqs, amsgrad}},
         steps, indices, shard_offsets, grad_scale, found_inf, Device::kType);
  call.lr = klr.ptr();
  call.beta1 = kb1.ptr();
  call.beta2 = kb2.ptr();
  Device::run(call, params, steps, grad_scale, found_inf);
}

}  // namespace fusedopt

// X(OP, FN, LR, NAME, OVERLOAD) for every optimizer op overload: signature
// ::fusedopt::OP<LR>, implemented by ::fusedopt::FN<Device, LR> (Note [Device
// ops]), registered as NAME or, with an OVERLOAD, NAME.OVERLOAD.
#define FUSEDOPT_FOR_EACH_OPTIMIZER_OP(X)                                 \
  X(SgdOp, sgd_, double, "sgd_", "")                                      \
  X(SgdOp, sgd_, const at::Tensor&, "sgd_", "tensor_lr")                  \
  X(AdagradOp, adagrad_, double, "adagrad_", "")                          \
  X(AdagradOp, adagrad_, const at::Tensor&, "adagrad_", "tensor_lr")      \
  X(RmspropOp, rmsprop_, double, "rmsprop_", "")                          \
  X(RmspropOp, rmsprop_, const at::Tensor&, "rmsprop_", "tensor_lr")      \
  X(AdamOp, adam_, double, "adam_", "")                                   \
  X(AdamOp, adam_, const at::Tensor&, "adam_", "tensor_lr")              \
  X(AdamOp, adam_, ::fusedopt::TensorBetas, "adam_", "tensor_betas")

// In a block, for an entry of FUSEDOPT_FOR_EACH_OPTIMIZER_OP: `registered`,
// the name m.impl takes (NAME or NAME.OVERLOAD).
#define FUSEDOPT_REGISTERED_NAME(NAME, OVERLOAD) \
  constexpr const char* registered = sizeof(OVERLOAD) > 1 ? NAME "." OVERLOAD : NAME

// Registers the optimizer ops for a device (Note [Device ops]) under PREFIX +
// the registered name (Note [Tensor lr]); the casts check their signatures.
#define FUSEDOPT_IMPL_OPTIMIZER(OP, FN, LR, NAME, OVERLOAD)                            \
  {                                                                                    \
    FUSEDOPT_REGISTERED_NAME(NAME, OVERLOAD);                                          \
    impl(registered, static_cast<::fusedopt::OP<LR>*>(&::fusedopt::FN<Device, LR>));   \
  }
#define FUSEDOPT_IMPL_OPTIMIZERS(m, PREFIX, DEVICE)                                                       \
  {                                                                                                       \
    using Device = DEVICE;                                                                                \
    auto impl = [&m](const char* name, auto* fn) { m.impl((std::string(PREFIX) + name).c_str(), fn); }; \
    FUSEDOPT_FOR_EACH_OPTIMIZER_OP(FUSEDOPT_IMPL_OPTIMIZER)                                               \
  }
