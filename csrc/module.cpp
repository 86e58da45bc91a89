// The Python module fusedopt._C: importing it loads the library (and with it
// every op registration), and it holds the optimizers' step helpers _hold,
// _grads and _contiguous.
#include <Python.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <memory>
#include <vector>

// Note [Held operands]
// A Python list handed to a torch.ops op becomes an IValue list that holds one
// more reference to every tensor; the op drops it with the GIL released. A
// tensor whose only other reference is its Python object (a parameter, a state
// buffer, a step) then goes back from two references to one there, and torch
// hands the Python object back (PyObject preservation) under a GIL it must
// take: for 3000 Adam parameters, 12000 takings of the GIL per step (~10% of
// a step of small tensors on an idle machine, far more on a busy one, where a
// taking can wait for the scheduler). _hold(lists) takes a reference to every
// tensor of the lists (its result keeps them) under the GIL, so the op's
// references are never the last; dropping the result, back in Python, returns
// them under the GIL already held. Non-tensors (the indices) are skipped.
namespace {

constexpr const char* kHeld = "fusedopt.held";

void release_held(PyObject* capsule) {
  delete static_cast<std::vector<at::Tensor>*>(PyCapsule_GetPointer(capsule, kHeld));
}

PyObject* hold(PyObject*, PyObject* lists) {
  HANDLE_TH_ERRORS
  auto held = std::make_unique<std::vector<at::Tensor>>();
  PyObject* outer = PySequence_Fast(lists, "_hold: expected a sequence of lists");
  if (outer == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(outer); ++i) {
    PyObject* inner = PySequence_Fast(PySequence_Fast_GET_ITEM(outer, i), "_hold: expected a sequence of lists");
    if (inner == nullptr) {
      Py_DECREF(outer);
      return nullptr;
    }
    for (Py_ssize_t j = 0; j < PySequence_Fast_GET_SIZE(inner); ++j) {
      PyObject* t = PySequence_Fast_GET_ITEM(inner, j);
      if (PyObject_TypeCheck(t, reinterpret_cast<PyTypeObject*>(THPVariableClass)))
        held->push_back(THPVariable_Unpack(t));
    }
    Py_DECREF(inner);
  }
  Py_DECREF(outer);
  PyObject* capsule = PyCapsule_New(held.get(), kHeld, release_held);
  if (capsule != nullptr) held.release();
  return capsule;
  END_HANDLE_TH_ERRORS
}

// Note [Gradients from C++]
// Reading p.grad and calling g.is_contiguous() from Python costs ~0.1 µs a
// tensor, ~0.5 ms a step of 3000 parameters. _grads(params) is
// [p.grad for p in params] and _contiguous(tensors) all(t.is_contiguous() for
// t in tensors), each through C++ for a plain tensor or Parameter while no
// torch function mode is on, and through Python otherwise (a subclass, a
// mode), so the result is Python's own.
bool plain(PyObject* t) { return THPVariable_CheckExact(t) && !at::impl::torch_function_mode_enabled(); }

PyObject* grads(PyObject*, PyObject* params) {
  HANDLE_TH_ERRORS
  PyObject* seq = PySequence_Fast(params, "_grads: expected a sequence of tensors");
  if (seq == nullptr) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject* out = PyList_New(n);
  for (Py_ssize_t i = 0; out != nullptr && i < n; ++i) {
    PyObject* p = PySequence_Fast_GET_ITEM(seq, i);
    PyObject* g = plain(p) ? THPVariable_Wrap(THPVariable_Unpack(p).grad()) : PyObject_GetAttrString(p, "grad");
    if (g == nullptr) Py_CLEAR(out);
    else PyList_SET_ITEM(out, i, g);
  }
  Py_DECREF(seq);
  return out;
  END_HANDLE_TH_ERRORS
}

PyObject* contiguous(PyObject*, PyObject* tensors) {
  HANDLE_TH_ERRORS
  PyObject* seq = PySequence_Fast(tensors, "_contiguous: expected a sequence of tensors");
  if (seq == nullptr) return nullptr;
  int all = 1;
  for (Py_ssize_t i = 0; all == 1 && i < PySequence_Fast_GET_SIZE(seq); ++i) {
    PyObject* t = PySequence_Fast_GET_ITEM(seq, i);
    if (plain(t)) {
      all = THPVariable_Unpack(t).is_contiguous();
      continue;
    }
    PyObject* r = PyObject_CallMethod(t, "is_contiguous", nullptr);
    all = r == nullptr ? -1 : PyObject_IsTrue(r);
    Py_XDECREF(r);
  }
  Py_DECREF(seq);
  if (all < 0) return nullptr;
  return PyBool_FromLong(all);
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"_hold", hold, METH_O, "Keeps a reference to every tensor of the lists (Note [Held operands])."},
    {"_grads", grads, METH_O, "[p.grad for p in params] (Note [Gradients from C++])."},
    {"_contiguous", contiguous, METH_O, "Whether every tensor is contiguous (Note [Gradients from C++])."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// `import fusedopt._C` loads the library, and with it every op registration.
extern "C" PyObject* PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module);
}
