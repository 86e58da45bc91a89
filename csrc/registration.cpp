// The op catalogue: every fusedopt schema, in one place. Device kernels are
// registered beside their code (cpu/ops.cpp, cuda/*.cu); fakes for
// torch.compile in fusedopt/ops.py.
#include <torch/library.h>

// Options every optimizer op takes after its own (DESIGN.md §4).
// shard_offsets[j]: params[j]'s first element's index in its whole parameter
// when params[j] is a shard of it (Note [Shard offsets] in fusedopt/philox.h).
#define FUSEDOPT_COMMON_ARGS                                                                 \
  "float weight_decay=0., float l1_decay=0., bool decoupled_weight_decay=False, "            \
  "bool maximize=False, float grad_keep_prob=1., int grad_mask_seed=0, "                     \
  "bool stochastic_rounding=False, int[]? shard_offsets=None, Tensor? grad_scale=None, "     \
  "Tensor? found_inf=None) -> ()"

// The argument lists of the optimizer ops (the grid-emulation ops at the end
// of this file take the very same), with lr a float or, in each op's
// `.tensor_lr` overload, a one-element tensor (Note [Tensor lr] in
// fusedopt/calls.h), and adam_'s `.tensor_betas`, whose lr and betas are
// tensors (Note [Tensor betas]).
#define FUSEDOPT_SGD_ARGS(LR)                                                                \
  "(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, "               \
  "Tensor(d!)[] steps, int[] indices, *, " LR " lr, float momentum=0., float dampening=0., " \
  "bool nesterov=False, bool ema_momentum=False, " FUSEDOPT_COMMON_ARGS
#define FUSEDOPT_ADAGRAD_ARGS(LR)                                                            \
  "(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] state_sums, "                     \
  "Tensor(d!)[] steps, int[] indices, *, " LR " lr, float lr_decay=0., float eps=1e-10, "    \
  FUSEDOPT_COMMON_ARGS
#define FUSEDOPT_RMSPROP_ARGS(LR)                                                               \
  "(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] square_avgs, "                       \
  "Tensor(d!)[] grad_avgs, Tensor(e!)[] momentum_buffers, Tensor(f!)[] steps, int[] indices, *, " \
  LR " lr, float alpha=0.99, float eps=1e-8, float momentum=0., bool centered=False, "       \
  FUSEDOPT_COMMON_ARGS
// Adam's betas: floats, or tensors in `.tensor_betas` (Note [Tensor betas]).
#define FUSEDOPT_FLOAT_BETAS "float beta1=0.9, float beta2=0.999, "
#define FUSEDOPT_TENSOR_BETAS "Tensor beta1, Tensor beta2, "
#define FUSEDOPT_ADAM_ARGS(LR, BETAS)                                                           \
  "(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "                          \
  "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] steps, int[] indices, *, " \
  LR " lr, " BETAS "float eps=1e-8, bool amsgrad=False, "                                     \
  "bool eps_inside_sqrt=False, " FUSEDOPT_COMMON_ARGS

TORCH_LIBRARY(fusedopt, m) {
  m.def("sgd_" FUSEDOPT_SGD_ARGS("float"));
  m.def("sgd_.tensor_lr" FUSEDOPT_SGD_ARGS("Tensor"));
  m.def("adagrad_" FUSEDOPT_ADAGRAD_ARGS("float"));
  m.def("adagrad_.tensor_lr" FUSEDOPT_ADAGRAD_ARGS("Tensor"));
  m.def("rmsprop_" FUSEDOPT_RMSPROP_ARGS("float"));
  m.def("rmsprop_.tensor_lr" FUSEDOPT_RMSPROP_ARGS("Tensor"));
  m.def("adam_" FUSEDOPT_ADAM_ARGS("float", FUSEDOPT_FLOAT_BETAS));
  m.def("adam_.tensor_lr" FUSEDOPT_ADAM_ARGS("Tensor", FUSEDOPT_FLOAT_BETAS));
  m.def("adam_.tensor_betas" FUSEDOPT_ADAM_ARGS("Tensor", FUSEDOPT_TENSOR_BETAS));
  // a += s·b over fp32: the benchmark's bandwidth yardstick.
  m.def("stream_(Tensor(a!) a, Tensor b, float s) -> ()");
}

// ---------------------------------------------------------------------------
// Grid emulation (tests only, CPU kernels in csrc/cpu/gridemu.cpp): the CUDA
// kernels' per-chunk bodies run on the host over the CUDA launch plan, with the
// optimizer ops' own schemas. Not part of the public API (no Python wrappers,
// no fakes); tests/test_gridemu.py compares them bitwise with the CPU ops.
TORCH_LIBRARY_FRAGMENT(fusedopt, m) {
  m.def("_gridemu_sgd_" FUSEDOPT_SGD_ARGS("float"));
  m.def("_gridemu_sgd_.tensor_lr" FUSEDOPT_SGD_ARGS("Tensor"));
  m.def("_gridemu_adagrad_" FUSEDOPT_ADAGRAD_ARGS("float"));
  m.def("_gridemu_adagrad_.tensor_lr" FUSEDOPT_ADAGRAD_ARGS("Tensor"));
  m.def("_gridemu_rmsprop_" FUSEDOPT_RMSPROP_ARGS("float"));
  m.def("_gridemu_rmsprop_.tensor_lr" FUSEDOPT_RMSPROP_ARGS("Tensor"));
  m.def("_gridemu_adam_" FUSEDOPT_ADAM_ARGS("float", FUSEDOPT_FLOAT_BETAS));
  m.def("_gridemu_adam_.tensor_lr" FUSEDOPT_ADAM_ARGS("Tensor", FUSEDOPT_FLOAT_BETAS));
  m.def("_gridemu_adam_.tensor_betas" FUSEDOPT_ADAM_ARGS("Tensor", FUSEDOPT_TENSOR_BETAS));
}
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// Dropout (DESIGN.md §6; CPU kernels in csrc/cpu/dropout_ops.cpp, CUDA in
// csrc/cuda/dropout.cu, fakes and autograd in fusedopt/nn/_ops.py). Element i
// (row-major logical index) of a draw is kept with probability 1 - p; outputs
// are contiguous. A draw is an int64 CPU tensor (seed, offset) (Note [Dropout
// draw]); nothing but (p, draw) is needed to regenerate a mask.
TORCH_LIBRARY_FRAGMENT(fusedopt, m) {
  // A fresh draw from torch's default CPU generator; increments the int64 counter `draws`
  m.def("dropout_seed(Tensor(a!) draws) -> Tensor", {at::Tag::nondeterministic_seeded});
  // y = x · keep / (1 - p)   (Note [Dropout formula])
  m.def("dropout(Tensor x, float p, Tensor draw) -> Tensor");
  // x ← x · keep / (1 - p), in place (Note [In-place dropout])
  m.def("dropout_(Tensor(a!) x, float p, Tensor draw) -> ()");
  // dx = dy · keep / (1 - p)
  m.def("dropout_backward(Tensor grad, float p, Tensor draw) -> Tensor");
  // y = residual + dropout(x + bias); bias: [x.size(-1)], residual: x's shape
  m.def("bias_dropout_add(Tensor x, Tensor bias, Tensor residual, float p, Tensor draw) -> Tensor");
  // (dx, dbias): dx = dropout(dy), dbias = dx summed over all but the last dimension
  m.def("bias_dropout_add_backward(Tensor grad, float p, Tensor draw) -> (Tensor, Tensor)");
  // uint8 [ceil(x.numel() / 8)], bit k of byte j = keep of element 8j + k, on x's device
  m.def("dropout_keep_bits(Tensor x, float p, Tensor draw) -> Tensor");
  // Tests only: Philox4x32-10 of int64 [n, 4] counter words under the key (seed lo, seed hi)
  m.def("_philox(Tensor counters, int seed) -> Tensor");
  // Tests only: the CUDA bodies run on the host over the CUDA launch plan, the grid capped at max_grid;
  // wide_index: the strided bodies' 64-bit index arithmetic, which the GPU takes from 2^31 elements
  m.def("_gridemu_dropout(Tensor x, float p, Tensor draw, int max_grid, bool wide_index=False) -> Tensor");
  m.def("_gridemu_bias_dropout_add(Tensor x, Tensor bias, Tensor residual, float p, Tensor draw, "
        "int max_grid) -> Tensor");
  m.def("_gridemu_bias_dropout_add_backward(Tensor grad, float p, Tensor draw, int max_grid) -> "
        "(Tensor, Tensor)");
  m.def("_gridemu_dropout_keep_bits(Tensor x, float p, Tensor draw, int max_grid) -> Tensor");
}
// ---------------------------------------------------------------------------
