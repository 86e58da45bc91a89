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

// The CUDA ops' side (Note [Device ops]), with a tensor option read through
// its pointer like on the device, and the launches replaced by grid().
struct Device {
  static constexpr c10::DeviceType kType = c10::DeviceType::CPU;
  static constexpr bool kOneDevice = false;
  static constexpr Options kOptions = Options::kEmulated;
  template <typename Hyper>
  static void run(const OptimizerCall<Hyper>& call, at::TensorList, at::TensorList steps,
                  const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
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
};

}  // namespace

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) {
  FUSEDOPT_IMPL_OPTIMIZERS(m, "_gridemu_", Device);
}

}  // namespace fusedopt::gridemu
