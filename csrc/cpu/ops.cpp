// The CPU side of the optimizer ops (Note [Device ops] in fusedopt/calls.h):
// read the AMP tensors and steps on the host, pick the ISA, run the kernel,
// advance the steps. And stream_, the bench's bandwidth yardstick.
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

// Options are read on the host; the kernel is that of the ISA pick_isa() returns.
struct Device {
  static constexpr c10::DeviceType kType = c10::DeviceType::CPU;
  static constexpr bool kOneDevice = false;
  static constexpr Options kOptions = Options::kHost;
  template <typename Hyper>
  static void run(OptimizerCall<Hyper>& call, at::TensorList, at::TensorList,
                  const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
    if (!begin_step(call, grad_scale, found_inf)) return;
    FUSEDOPT_ISA_CALL(update, call);
    end_step(call);
  }
};

void stream_(const at::Tensor& a, const at::Tensor& b, double s) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "stream_: expected CPU tensors");
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat, "stream_: expected float32");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && a.numel() == b.numel(),
              "stream_: expected contiguous tensors of equal size");
  FUSEDOPT_ISA_CALL(stream, a.data_ptr<float>(), b.data_ptr<float>(), static_cast<float>(s), a.numel());
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) {
  FUSEDOPT_IMPL_OPTIMIZERS(m, "", Device);
  m.impl("stream_", &stream_);
}

// A sparse gradient dispatches here; gather() rejects it with a plain message
// instead of the dispatcher's "could not run with SparseCPU".
TORCH_LIBRARY_IMPL(fusedopt, SparseCPU, m) {
  FUSEDOPT_IMPL_OPTIMIZERS(m, "", Device);
}

}  // namespace fusedopt::cpu
