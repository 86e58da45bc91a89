#pragma once
// The update launches of one optimizer: the __global__ shell around a chunk
// body of fusedopt/mta.h and the loop over the launch plan. Each optimizer's
// instantiations live in their own translation unit (update_<opt>.cu), so
// nvcc compiles them in parallel; optimizers.cu holds the ops.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "fusedopt/mta.h"

#if !defined(CUDART_VERSION) || CUDART_VERSION < 12010
#error "fusedopt's CUDA kernels need CUDA 12.1 or newer: their launch tables use 32 KB kernel arguments (Note [Kernel arguments] in fusedopt/mta.h)"
#endif

namespace fusedopt::cuda {

constexpr size_t kMaxArgBytes = 32764;  // CUDA 12.1+, sm_70+

// The 32 KB argument space needs a driver of CUDA 12.1 or newer too (Note
// [Kernel arguments]): a CUDA 12.x build may run on an older one (minor
// version compatibility), where every update launch would fail obscurely.
inline void check_driver() {
  static const int version = [] {
    int v = 0;
    C10_CUDA_CHECK(cudaDriverGetVersion(&v));
    return v;
  }();
  TORCH_CHECK(version >= 12010, "fusedopt: the optimizer kernels take 32 KB kernel arguments, which need a driver "
              "for CUDA 12.1 or newer (R530+); this driver supports CUDA ", version / 1000, ".", version % 1000 / 10);
}

// What every update launch of a call shares: the stream, AMP.
struct Launch {
  cudaStream_t stream;
  const float* grad_scale;  // null: no AMP unscaling
  const float* found_inf;   // null: never skipped
};

// Launches the updates of a validated call on the current device (the caller
// holds the CUDAGuard); defined per optimizer in update_<opt>.cu.
void update(const OptimizerCall<math::SgdHyper>& call, const Launch& l);
void update(const OptimizerCall<math::AdagradHyper>& call, const Launch& l);
void update(const OptimizerCall<math::RmspropHyper>& call, const Launch& l);
void update(const OptimizerCall<math::AdamHyper>& call, const Launch& l);

// One block per chunk of the launch plan, Body::kBlocksPerSM blocks an SM
// (Note [Register budget]). The arguments stay in the constant bank
// (__grid_constant__: a block's run-time slot index reads them in place,
// nothing is copied).
template <typename Body>
__global__ void __launch_bounds__(mta::kThreads, Body::kBlocksPerSM)
    update_kernel(const __grid_constant__ typename Body::Args args) {
  Body::run(args, blockIdx.x, threadIdx.x, blockDim.x);
}

template <typename Hyper>
void launch_updates(const OptimizerCall<Hyper>& call, const Launch& l) {
  mta::with_body(call, [&](auto body) {
    using Body = decltype(body);
    static_assert(sizeof(typename Body::Args) <= kMaxArgBytes, "launch table exceeds the kernel argument space");
    mta::for_each_launch<Body>(call, l.grad_scale, l.found_inf, mta::cuda_limits<Body::N>(),
                               [&](const typename Body::Args& args) {
                                 update_kernel<Body><<<args.tab.blocks, mta::kThreads, 0, l.stream>>>(args);
                                 C10_CUDA_KERNEL_LAUNCH_CHECK();
                               });
  });
}

}  // namespace fusedopt::cuda
