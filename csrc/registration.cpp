// The op catalogue: every fusedopt schema, in one place. Device kernels are
// registered beside their code (cpu/ops.cpp, cuda/*.cu); fakes for
// torch.compile in fusedopt/ops.py.
#include <Python.h>
#include <torch/library.h>

// Options every optimizer op takes after its own (DESIGN.md §4).
#define FUSEDOPT_COMMON_ARGS                                                          \
  "float weight_decay=0., float l1_decay=0., bool decoupled_weight_decay=False, "     \
  "bool maximize=False, float grad_keep_prob=1., int grad_mask_seed=0, "              \
  "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()"

// The argument lists of the optimizer ops (the grid-emulation ops at the end
// of this file take the very same).
#define FUSEDOPT_SGD_ARGS                                                                    \
  "(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, "               \
  "Tensor(d!)[] steps, int[] indices, *, float lr, float momentum=0., float dampening=0., " \
  "bool nesterov=False, bool ema_momentum=False, " FUSEDOPT_COMMON_ARGS
#define FUSEDOPT_ADAGRAD_ARGS                                                                \
  "(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] state_sums, "                     \
  "Tensor(d!)[] steps, int[] indices, *, float lr, float lr_decay=0., float eps=1e-10, "    \
  FUSEDOPT_COMMON_ARGS
#define FUSEDOPT_RMSPROP_ARGS                                                                   \
  "(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] square_avgs, "                       \
  "Tensor(d!)[] grad_avgs, Tensor(e!)[] momentum_buffers, Tensor(f!)[] steps, int[] indices, *, " \
  "float lr, float alpha=0.99, float eps=1e-8, float momentum=0., bool centered=False, "       \
  FUSEDOPT_COMMON_ARGS
#define FUSEDOPT_ADAM_ARGS                                                                      \
  "(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "                          \
  "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] steps, int[] indices, *, " \
  "float lr, float beta1=0.9, float beta2=0.999, float eps=1e-8, bool amsgrad=False, "         \
  "bool eps_inside_sqrt=False, " FUSEDOPT_COMMON_ARGS

TORCH_LIBRARY(fusedopt, m) {
  m.def("sgd_" FUSEDOPT_SGD_ARGS);
  m.def("adagrad_" FUSEDOPT_ADAGRAD_ARGS);
  m.def("rmsprop_" FUSEDOPT_RMSPROP_ARGS);
  m.def("adam_" FUSEDOPT_ADAM_ARGS);
  // a += s·b over fp32: the benchmark's bandwidth yardstick.
  m.def("stream_(Tensor(a!) a, Tensor b, float s) -> ()");
}

// ---------------------------------------------------------------------------
// Grid emulation (tests only, CPU kernels in csrc/cpu/gridemu.cpp): the CUDA
// kernels' per-chunk bodies run on the host over the CUDA launch plan, with the
// optimizer ops' own schemas. Not part of the public API (no Python wrappers,
// no fakes); tests/test_gridemu.py compares them bitwise with the CPU ops.
TORCH_LIBRARY_FRAGMENT(fusedopt, m) {
  m.def("_gridemu_sgd_" FUSEDOPT_SGD_ARGS);
  m.def("_gridemu_adagrad_" FUSEDOPT_ADAGRAD_ARGS);
  m.def("_gridemu_rmsprop_" FUSEDOPT_RMSPROP_ARGS);
  m.def("_gridemu_adam_" FUSEDOPT_ADAM_ARGS);
}
// ---------------------------------------------------------------------------

// A Python module, so `import fusedopt._C` loads the library (and with it the
// registrations above); it defines no Python functions of its own.
extern "C" PyObject* PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
