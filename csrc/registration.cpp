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

TORCH_LIBRARY(fusedopt, m) {
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, "
      "Tensor(d!)[] steps, int[] indices, *, float lr, float momentum=0., float dampening=0., "
      "bool nesterov=False, bool ema_momentum=False, " FUSEDOPT_COMMON_ARGS);
  m.def(
      "adagrad_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] state_sums, "
      "Tensor(d!)[] steps, int[] indices, *, float lr, float lr_decay=0., float eps=1e-10, "
      FUSEDOPT_COMMON_ARGS);
  m.def(
      "rmsprop_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] square_avgs, "
      "Tensor(d!)[] grad_avgs, Tensor(e!)[] momentum_buffers, Tensor(f!)[] steps, int[] indices, *, "
      "float lr, float alpha=0.99, float eps=1e-8, float momentum=0., bool centered=False, "
      FUSEDOPT_COMMON_ARGS);
  m.def(
      "adam_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] steps, int[] indices, *, "
      "float lr, float beta1=0.9, float beta2=0.999, float eps=1e-8, bool amsgrad=False, "
      "bool eps_inside_sqrt=False, " FUSEDOPT_COMMON_ARGS);
  // a += s·b over fp32: the benchmark's bandwidth yardstick.
  m.def("stream_(Tensor(a!) a, Tensor b, float s) -> ()");
}

// A Python module, so `import fusedopt._C` loads the library (and with it the
// registrations above); it defines no Python functions of its own.
extern "C" PyObject* PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
