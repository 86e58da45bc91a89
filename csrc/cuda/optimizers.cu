// CUDA implementations of the optimizer ops and stream_: validate (the same
// code as the CPU ops, fusedopt/calls.h), then launch the per-chunk bodies of
// fusedopt/mta.h (update_<opt>.cu) and the step kernel on the current stream
// of the params' device. Only the __global__ shells and the launches are
// CUDA-only; everything a kernel computes is host+device code that
// tests/test_gridemu.py runs on the CPU (Note [Launch plan], Note [Chunk body]).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fusedopt/calls.h"
#include "update.cuh"

namespace fusedopt::cuda {
namespace {

__global__ void __launch_bounds__(mta::kStepThreads) step_kernel(const __grid_constant__ mta::StepArgs args) {
  mta::step_chunk(args, blockIdx.x, threadIdx.x, blockDim.x);
}

const float* scalar_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

// The CUDA side of the optimizer ops (Note [Device ops]): a tensor option on
// the device is read by the kernels; the update launches, then the step
// launches (Note [Steps on the device]) on the current stream.
struct Device {
  static constexpr c10::DeviceType kType = c10::DeviceType::CUDA;
  static constexpr bool kOneDevice = true;
  static constexpr Options kOptions = Options::kDevice;
  template <typename Hyper>
  static void run(const OptimizerCall<Hyper>& call, at::TensorList params, at::TensorList steps,
                  const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
    if (call.tensors.empty()) return;
    check_driver();
    const c10::cuda::CUDAGuard guard(params[0].device());
    const Launch l{c10::cuda::getCurrentCUDAStream(params[0].device().index()), scalar_ptr(grad_scale),
                   scalar_ptr(found_inf)};
    update(call, l);
    static_assert(sizeof(mta::StepArgs) <= kMaxArgBytes, "step table exceeds the kernel argument space");
    mta::for_each_step_launch(steps, l.found_inf, mta::StepTable::K, mta::kStepThreads,
                              [&](const mta::StepArgs& args, int64_t blocks) {
                                step_kernel<<<blocks, mta::kStepThreads, 0, l.stream>>>(args);
                                C10_CUDA_KERNEL_LAUNCH_CHECK();
                              });
  }
};

// a += s·b, 4 elements (one 16-byte access per array) per thread when both are
// 16-byte aligned, else one; the first threads also take the < 4-element tail.
constexpr int kStreamThreads = 256;

__global__ void __launch_bounds__(kStreamThreads) stream_kernel(float* a, const float* b, float s, int64_t n,
                                                                 bool vec) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (!vec) {
    if (i < n) a[i] = fo::fma(s, b[i], a[i]);
    return;
  }
  const int64_t n4 = n / 4;
  if (i < n4) {
    float4 x = reinterpret_cast<const float4*>(a)[i];
    const float4 y = reinterpret_cast<const float4*>(b)[i];
    x.x = fo::fma(s, y.x, x.x);
    x.y = fo::fma(s, y.y, x.y);
    x.z = fo::fma(s, y.z, x.z);
    x.w = fo::fma(s, y.w, x.w);
    reinterpret_cast<float4*>(a)[i] = x;
  }
  if (i < n - 4 * n4) a[4 * n4 + i] = fo::fma(s, b[4 * n4 + i], a[4 * n4 + i]);
}

void stream_(const at::Tensor& a, const at::Tensor& b, double s) {
  TORCH_CHECK(a.is_cuda() && b.device() == a.device(), "stream_: expected two tensors on one CUDA device, got ",
              a.device(), " and ", b.device());
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat, "stream_: expected float32");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && a.numel() == b.numel(),
              "stream_: expected contiguous tensors of equal size");
  const int64_t n = a.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(a.device());
  const bool vec = reinterpret_cast<uintptr_t>(a.data_ptr()) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(b.data_ptr()) % 16 == 0;
  const int64_t threads = vec ? std::max<int64_t>(n / 4, n % 4) : n;
  const int64_t blocks = (threads + kStreamThreads - 1) / kStreamThreads;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "stream_: ", n, " elements are too many for one launch");
  stream_kernel<<<blocks, kStreamThreads, 0, c10::cuda::getCurrentCUDAStream(a.device().index())>>>(
      a.data_ptr<float>(), b.data_ptr<float>(), static_cast<float>(s), n, vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedopt, CUDA, m) {
  FUSEDOPT_IMPL_OPTIMIZERS(m, "", Device);
  m.impl("stream_", &stream_);
}

}  // namespace fusedopt::cuda
