// CPU implementations of the dropout ops (DESIGN.md §6), their grid
// emulation (the CUDA bodies of dropout_body.h run on the host over the CUDA
// launch plan) and `_philox`, a test hook on the vector Philox rounds.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <mutex>

#include "fusedopt/dispatch.h"
#include "fusedopt/dropout.h"
#include "isa.h"
#include "kernels/kernels.h"

namespace fusedopt::cpu {
namespace {

// dbias[c] = Σ_b partial[b][c] in block order (Note [dbias row blocks]).
void reduce_dbias(const DropoutCall& c, void* dbias) {
  const int64_t count = dropout::row_blocks(c.n / c.h).count;
  FUSEDOPT_DISPATCH_FLOATING(c.dtype, "bias_dropout_add_backward", [&] {
    using S = typename OpMath<scalar_t>::type;
    const auto* partial = static_cast<const S*>(c.partial);
    auto* out = static_cast<scalar_t*>(dbias);
    at::parallel_for(0, c.h, 4096, [&](int64_t lo, int64_t hi) {
      for (int64_t col = lo; col < hi; ++col)
        out[col] = static_cast<scalar_t>(dropout::dbias_column<scalar_t>(partial, count, c.h, col));
    });
  });
}

// The CPU kernels of kernels/dropout.cpp, for the ISA in use.
struct CpuRun {
  void dropout(const DropoutCall& c) const { FUSEDOPT_ISA_CALL(dropout, c); }
  void dropout_strided(const DropoutCall& c) const { FUSEDOPT_ISA_CALL(dropout_strided, c); }
  void bias_dropout_add(const DropoutCall& c) const { FUSEDOPT_ISA_CALL(bias_dropout_add, c); }
  void bias_dropout_add_backward(const DropoutCall& c, void* dbias) const {
    FUSEDOPT_ISA_CALL(bias_dropout_add_backward, c);
    reduce_dbias(c, dbias);
  }
  void keep_bits(const DropoutCall& c, uint8_t* out) const { FUSEDOPT_ISA_CALL(keep_bits, c, out); }
};

constexpr auto kCPU = c10::DeviceType::CPU;

at::Tensor dropout(const at::Tensor& x, double p, const at::Tensor& draw) {
  return dropout_op("dropout", kCPU, CpuRun{}, x, p, draw);
}
void dropout_inplace(const at::Tensor& x, double p, const at::Tensor& draw) {
  dropout_inplace_op("dropout_", kCPU, CpuRun{}, x, p, draw);
}
at::Tensor dropout_backward(const at::Tensor& grad, double p, const at::Tensor& draw) {
  return dropout_op("dropout_backward", kCPU, CpuRun{}, grad, p, draw);
}
at::Tensor bias_dropout_add(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& residual, double p,
                            const at::Tensor& draw) {
  return bias_dropout_add_op("bias_dropout_add", kCPU, CpuRun{}, x, bias, residual, p, draw);
}
std::tuple<at::Tensor, at::Tensor> bias_dropout_add_backward(const at::Tensor& grad, double p,
                                                             const at::Tensor& draw) {
  return bias_dropout_add_backward_op("bias_dropout_add_backward", kCPU, CpuRun{}, grad, p, draw);
}
at::Tensor dropout_keep_bits(const at::Tensor& x, double p, const at::Tensor& draw) {
  return keep_bits_op("dropout_keep_bits", kCPU, CpuRun{}, x, p, draw);
}

// A fresh draw from torch's default CPU generator (Note [Dropout draw]): two
// 64-bit outputs, taken under the generator's lock together with the
// increment of `draws` (an int64 scalar counting the draws so far).
at::Tensor dropout_seed(const at::Tensor& draws) {
  TORCH_CHECK(draws.device().is_cpu() && draws.scalar_type() == at::kLong && draws.numel() == 1,
              "dropout_seed: draws must be an int64 CPU tensor of one element, got ", draws.scalar_type(), " ",
              draws.sizes(), " on ", draws.device());
  at::Tensor out = at::empty({2}, at::TensorOptions().dtype(at::kLong));
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  auto* impl = at::check_generator<at::CPUGeneratorImpl>(gen);
  out.data_ptr<int64_t>()[0] = static_cast<int64_t>(impl->random64());
  out.data_ptr<int64_t>()[1] = static_cast<int64_t>(impl->random64());
  *draws.data_ptr<int64_t>() += 1;
  return out;
}

// Philox4x32-10 of rows of counter words: int64 [n, 4] (values in [0, 2^32))
// -> int64 [n, 4], key (seed low, seed high), by the vector rounds in use.
at::Tensor philox(const at::Tensor& counters, int64_t seed) {
  TORCH_CHECK(counters.device().is_cpu() && counters.scalar_type() == at::kLong && counters.dim() == 2 &&
                  counters.size(1) == 4,
              "_philox: counters must be a CPU int64 tensor of shape [n, 4], got ", counters.scalar_type(), " ",
              counters.sizes());
  TORCH_CHECK(counters.numel() == 0 || (counters.min().item<int64_t>() >= 0 &&
                                        counters.max().item<int64_t>() <= int64_t(0xFFFFFFFF)),
              "_philox: counter words must lie in [0, 2^32)");
  const at::Tensor words = counters.to(at::kInt).contiguous();
  at::Tensor out = at::empty(words.sizes(), words.options());
  FUSEDOPT_ISA_CALL(philox_words, reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>()),
                            reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()), words.size(0),
                            static_cast<uint64_t>(seed));
  return out.to(at::kLong).bitwise_and(int64_t(0xFFFFFFFF));
}

// Grid emulation: the CUDA runner's launches (csrc/cuda/dropout.cu), with the
// grid capped at `max_grid` blocks instead of 8 per SM, each launch's blocks
// and threads walked on the host. `wide_index`: the strided bodies take
// 64-bit index arithmetic, which the GPU takes only for 2^31 elements or more.
struct EmuRun {
  static constexpr int kMaxStridedDims = dropout::kMaxDims;
  int64_t max_grid;
  bool wide_index = false;

  template <typename A, typename Body>
  void launch(int64_t units, const A& a, const Body& body) const {
    const int64_t grid = dropout::grid_size(units, max_grid);
    at::parallel_for(0, grid, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b)
        for (int64_t t = 0; t < dropout::kThreads; ++t) body(b, t, dropout::kThreads, grid, a);
    });
  }

  void dropout(const DropoutCall& c) const {
    FUSEDOPT_DISPATCH_FLOATING(c.dtype, "_gridemu_dropout", [&] {
      launch(dropout::elementwise_units<scalar_t>(c.n), typed_args<scalar_t>(c),
             dropout::dropout_thread<scalar_t>);
    });
  }
  // Rows: one thread a unit; tiles: one block a tile, grid-stride, its threads' draw phase, then their apply
  // phase (the __syncthreads between them on the GPU).
  void dropout_strided(const DropoutCall& c) const {
    FUSEDOPT_DISPATCH_FLOATING(c.dtype, "_gridemu_dropout", [&] {
      const auto a = strided_args<scalar_t>(c);
      strided_bodies(
          a, wide_index,
          [&](auto index) { launch(a.units, a, dropout::strided_rows_thread<decltype(index), scalar_t>); },
          [&](auto index, auto one_r) {
            using I = decltype(index);
            const int64_t grid = std::min(a.units, max_grid);
            at::parallel_for(0, grid, 1, [&](int64_t lo, int64_t hi) {
              dropout::TileBits sh;
              for (int64_t b = lo; b < hi; ++b)
                for (int64_t tile = b; tile < a.units; tile += grid) {
                  for (int64_t t = 0; t < dropout::kThreads; ++t) dropout::strided_tile_draw<I>(tile, t, a, sh);
                  for (int64_t t = 0; t < dropout::kThreads; ++t)
                    dropout::strided_tile_apply<decltype(one_r)::value, I>(tile, t, a, sh);
                }
            });
          });
    });
  }
  void bias_dropout_add(const DropoutCall& c) const {
    FUSEDOPT_DISPATCH_FLOATING(c.dtype, "_gridemu_bias_dropout_add", [&] {
      launch(dropout::elementwise_units<scalar_t>(c.n), typed_args<scalar_t>(c),
             dropout::bias_dropout_add_thread<scalar_t>);
    });
  }
  void bias_dropout_add_backward(const DropoutCall& c, void* dbias) const {
    FUSEDOPT_DISPATCH_FLOATING(c.dtype, "_gridemu_bias_dropout_add_backward", [&] {
      auto a = typed_args<scalar_t>(c);
      launch(dropout::partial_units<scalar_t>(c.n, c.h), a, dropout::dbias_partial_thread<scalar_t>);
      a.y = static_cast<scalar_t*>(dbias);
      launch(c.h, a, dropout::dbias_reduce_thread<scalar_t>);
    });
  }
  void keep_bits(const DropoutCall& c, uint8_t* out) const {
    launch(dropout::bits_units(c.n), bits_args(c, out), dropout::keep_bits_thread);
  }
};

void check_grid(int64_t max_grid) {
  TORCH_CHECK(max_grid >= 1, "_gridemu: max_grid must be at least 1, got ", max_grid);
}

at::Tensor emu_dropout(const at::Tensor& x, double p, const at::Tensor& draw, int64_t max_grid, bool wide_index) {
  check_grid(max_grid);
  return dropout_op("_gridemu_dropout", kCPU, EmuRun{max_grid, wide_index}, x, p, draw);
}
at::Tensor emu_bias_dropout_add(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& residual, double p,
                                const at::Tensor& draw, int64_t max_grid) {
  check_grid(max_grid);
  return bias_dropout_add_op("_gridemu_bias_dropout_add", kCPU, EmuRun{max_grid}, x, bias, residual, p, draw);
}
std::tuple<at::Tensor, at::Tensor> emu_bias_dropout_add_backward(const at::Tensor& grad, double p, const at::Tensor& draw,
                                                                 int64_t max_grid) {
  check_grid(max_grid);
  return bias_dropout_add_backward_op("_gridemu_bias_dropout_add_backward", kCPU, EmuRun{max_grid}, grad, p, draw);
}
at::Tensor emu_keep_bits(const at::Tensor& x, double p, const at::Tensor& draw, int64_t max_grid) {
  check_grid(max_grid);
  return keep_bits_op("_gridemu_dropout_keep_bits", kCPU, EmuRun{max_grid}, x, p, draw);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) {
  FUSEDOPT_IMPL_DROPOUT(m);
  m.impl("dropout_seed", &dropout_seed);
  m.impl("_philox", &philox);
  m.impl("_gridemu_dropout", &emu_dropout);
  m.impl("_gridemu_bias_dropout_add", &emu_bias_dropout_add);
  m.impl("_gridemu_bias_dropout_add_backward", &emu_bias_dropout_add_backward);
  m.impl("_gridemu_dropout_keep_bits", &emu_keep_bits);
}

}  // namespace fusedopt::cpu
