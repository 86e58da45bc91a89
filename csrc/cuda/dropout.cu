// CUDA implementations of the dropout ops (DESIGN.md §6, §7). Validation and
// allocation are the CPU ops' own (fusedopt/dropout.h); each kernel is a
// __global__ shell around a per-thread body of fusedopt/dropout_body.h, which
// the `_gridemu_*` ops run on the host over the same launch plan, so all but
// this file is tested without a GPU. Masks equal the CPU ops' bit for bit.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fusedopt/dispatch.h"
#include "fusedopt/dropout.h"

namespace fusedopt::cuda {
namespace {

template <typename A, void (*Body)(int64_t, int64_t, int64_t, int64_t, const A&)>
__global__ void __launch_bounds__(dropout::kThreads) dropout_kernel(A a) {
  Body(blockIdx.x, threadIdx.x, blockDim.x, gridDim.x, a);
}

// Note [Strided CUDA dropout]: one block a tile, grid-stride; the draw phase
// fills the tile's bits in shared memory, the apply phase reads them.
template <bool kOneR, typename I, typename T>
__global__ void __launch_bounds__(dropout::kThreads) strided_tiles_kernel(const dropout::StridedArgs<T> a) {
  __shared__ dropout::TileBits sh;
  for (int64_t tile = blockIdx.x; tile < a.units; tile += gridDim.x) {
    dropout::strided_tile_draw<I>(tile, threadIdx.x, a, sh);
    __syncthreads();
    dropout::strided_tile_apply<kOneR, I>(tile, threadIdx.x, a, sh);
    __syncthreads();  // before the next tile's draw overwrites the bits
  }
}

// Note [Dropout launch plan]: 8 blocks of kThreads per SM, grid-stride.
int64_t max_grid() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return int64_t(8) * sms;
}

template <typename A, void (*Body)(int64_t, int64_t, int64_t, int64_t, const A&)>
void launch(int64_t units, const A& a) {
  const int64_t grid = dropout::grid_size(units, max_grid());
  dropout_kernel<A, Body><<<static_cast<unsigned>(grid), dropout::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct CudaRun {
  static constexpr int kMaxStridedDims = dropout::kMaxDims;

  void dropout(const DropoutCall& c) const {
    FUSEDOPT_DISPATCH_FLOATING(c.dtype, "dropout", [&] {
      launch<dropout::Args<scalar_t>, dropout::dropout_thread<scalar_t>>(dropout::elementwise_units<scalar_t>(c.n),
                                                                          typed_args<scalar_t>(c));
    });
  }
  void dropout_strided(const DropoutCall& c) const {
    FUSEDOPT_DISPATCH_FLOATING(c.dtype, "dropout", [&] {
      using A = dropout::StridedArgs<scalar_t>;
      const A a = strided_args<scalar_t>(c);
      strided_bodies(
          a, false,
          [&](auto index) { launch<A, dropout::strided_rows_thread<decltype(index), scalar_t>>(a.units, a); },
          [&](auto index, auto one_r) {
            const int64_t grid = std::min(a.units, max_grid());
            strided_tiles_kernel<decltype(one_r)::value, decltype(index), scalar_t>
                <<<static_cast<unsigned>(grid), dropout::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
    });
  }
  void bias_dropout_add(const DropoutCall& c) const {
    FUSEDOPT_DISPATCH_FLOATING(c.dtype, "bias_dropout_add", [&] {
      launch<dropout::Args<scalar_t>, dropout::bias_dropout_add_thread<scalar_t>>(
          dropout::elementwise_units<scalar_t>(c.n), typed_args<scalar_t>(c));
    });
  }
  void bias_dropout_add_backward(const DropoutCall& c, void* dbias) const {
    FUSEDOPT_DISPATCH_FLOATING(c.dtype, "bias_dropout_add_backward", [&] {
      auto a = typed_args<scalar_t>(c);
      launch<dropout::Args<scalar_t>, dropout::dbias_partial_thread<scalar_t>>(
          dropout::partial_units<scalar_t>(c.n, c.h), a);
      a.y = static_cast<scalar_t*>(dbias);
      launch<dropout::Args<scalar_t>, dropout::dbias_reduce_thread<scalar_t>>(c.h, a);
    });
  }
  void keep_bits(const DropoutCall& c, uint8_t* out) const {
    launch<dropout::BitsArgs, dropout::keep_bits_thread>(dropout::bits_units(c.n), bits_args(c, out));
  }
};

constexpr auto kCUDA = c10::DeviceType::CUDA;

// The device of `t` when it is a CUDA tensor; a CPU tensor in a CUDA call is
// left to the op's own check, which names it.
std::optional<at::Device> cuda_device(const at::Tensor& t) {
  if (t.defined() && t.is_cuda()) return t.device();
  return std::nullopt;
}

at::Tensor dropout(const at::Tensor& x, double p, const at::Tensor& draw) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device(x));
  return dropout_op("dropout", kCUDA, CudaRun{}, x, p, draw);
}
void dropout_inplace(const at::Tensor& x, double p, const at::Tensor& draw) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device(x));
  dropout_inplace_op("dropout_", kCUDA, CudaRun{}, x, p, draw);
}
at::Tensor dropout_backward(const at::Tensor& grad, double p, const at::Tensor& draw) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device(grad));
  return dropout_op("dropout_backward", kCUDA, CudaRun{}, grad, p, draw);
}
at::Tensor bias_dropout_add(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& residual, double p,
                            const at::Tensor& draw) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device(x));
  return bias_dropout_add_op("bias_dropout_add", kCUDA, CudaRun{}, x, bias, residual, p, draw);
}
std::tuple<at::Tensor, at::Tensor> bias_dropout_add_backward(const at::Tensor& grad, double p,
                                                             const at::Tensor& draw) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device(grad));
  return bias_dropout_add_backward_op("bias_dropout_add_backward", kCUDA, CudaRun{}, grad, p, draw);
}
at::Tensor dropout_keep_bits(const at::Tensor& x, double p, const at::Tensor& draw) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device(x));
  return keep_bits_op("dropout_keep_bits", kCUDA, CudaRun{}, x, p, draw);
}

}  // namespace

// dropout_seed has only a CPU kernel: its counter and its draw live on the
// CPU whatever the device of the dropout it feeds (Note [Dropout draw]).
TORCH_LIBRARY_IMPL(fusedopt, CUDA, m) {
  FUSEDOPT_IMPL_DROPOUT(m);
}

}  // namespace fusedopt::cuda
