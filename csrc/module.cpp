// The Python module fusedopt._C: importing it loads the library (and with it
// every op registration), and it holds the optimizers' step helpers _call,
// _grads and _contiguous.
#include <Python.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "fusedopt/calls.h"
#include "fusedopt/op_handle.h"

namespace {

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

// Note [Direct calls]
// Calling an op through torch.ops converts every Python list into an IValue
// list (a reference taken on every tensor, the first one making torch tie the
// Python object to the tensor), the boxed call unboxes it into a vector of
// tensors (more references), and every reference is dropped again, the last
// re-taking the GIL to hand the Python object back (PyObject preservation):
// for 3000 Adam parameters, several passes over 15000 tensors, a quarter of a
// step of small tensors. _call(name, lists, options) calls the op from C++
// instead, unboxed, with its C++ signature (FUSEDOPT_FOR_EACH_OPTIMIZER_OP in
// fusedopt/calls.h): each tensor is borrowed from its Python object
// (MaybeOwned's borrow: no reference taken), and the call goes through the
// dispatcher as any other (the Autograd kernel bumps versions, the profiler
// records the op, dispatch modes see it). The lists are copied into tuples
// first, so their tensors live while the GIL is released for the call.
// `lists` are the op's leading positional arguments and `options` all the
// others by schema name. Anything but the plain case (a tensor subclass, a
// torch function mode, a value of another Python type, an argument missing
// or unknown) returns NotImplemented and nothing is called: the caller goes
// through torch.ops, which handles it as torch does.

// One argument of type T converted from Python; load() is false when the
// value is not the plain case.
template <typename T>
struct Arg;

at::Tensor borrow(PyObject* t) {
  return c10::MaybeOwnedTraits<at::Tensor>::createBorrow(THPVariable_Unpack(t));
}

void unborrow(at::Tensor& t) { c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t); }

bool is_sequence(PyObject* value) { return PyList_CheckExact(value) || PyTuple_CheckExact(value); }

template <>
struct Arg<at::TensorList> {
  PyObject* items = nullptr;  // a tuple: the list's tensors live while the call runs
  std::vector<at::Tensor> tensors;
  bool load(PyObject* value) {
    if (!is_sequence(value) || (items = PySequence_Tuple(value)) == nullptr) return false;
    const Py_ssize_t n = PyTuple_GET_SIZE(items);
    tensors.reserve(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* t = PyTuple_GET_ITEM(items, i);
      if (!plain(t)) return false;
      tensors.push_back(borrow(t));
    }
    return true;
  }
  at::TensorList get() const { return tensors; }
  ~Arg() {
    for (at::Tensor& t : tensors) unborrow(t);
    Py_XDECREF(items);
  }
};

template <>
struct Arg<std::optional<at::Tensor>> {
  std::optional<at::Tensor> tensor;
  bool load(PyObject* value) {
    if (value != Py_None) {
      if (!plain(value)) return false;
      tensor = borrow(value);
    }
    return true;
  }
  const std::optional<at::Tensor>& get() const { return tensor; }
  ~Arg() {
    if (tensor.has_value()) unborrow(*tensor);
  }
};

template <>
struct Arg<at::Tensor> {
  Arg<std::optional<at::Tensor>> tensor;
  bool load(PyObject* value) { return value != Py_None && tensor.load(value); }
  const at::Tensor& get() const { return *tensor.get(); }
};

bool load_int(PyObject* value, int64_t& out) {
  if (!PyLong_CheckExact(value)) return false;
  int overflow = 0;
  out = PyLong_AsLongLongAndOverflow(value, &overflow);
  return overflow == 0 && !(out == -1 && PyErr_Occurred());
}

template <>
struct Arg<at::IntArrayRef> {
  std::vector<int64_t> values;
  bool load(PyObject* value) {
    if (!is_sequence(value)) return false;
    values.resize(PySequence_Fast_GET_SIZE(value));
    for (size_t i = 0; i < values.size(); ++i)
      if (!load_int(PySequence_Fast_GET_ITEM(value, i), values[i])) return false;
    return true;
  }
  at::IntArrayRef get() const { return values; }
};

template <>
struct Arg<at::OptionalIntArrayRef> {
  std::optional<Arg<at::IntArrayRef>> list;
  bool load(PyObject* value) { return value == Py_None || list.emplace().load(value); }
  at::OptionalIntArrayRef get() const { return list ? at::OptionalIntArrayRef(list->get()) : std::nullopt; }
};

template <>
struct Arg<int64_t> {
  int64_t value = 0;
  bool load(PyObject* v) { return load_int(v, value); }
  int64_t get() const { return value; }
};

template <>
struct Arg<double> {
  double value = 0;
  bool load(PyObject* v) {
    if (!PyFloat_CheckExact(v) && !PyLong_CheckExact(v)) return false;
    value = PyFloat_AsDouble(v);
    return !(value == -1.0 && PyErr_Occurred());
  }
  double get() const { return value; }
};

template <>
struct Arg<bool> {
  bool value = false;
  bool load(PyObject* v) {
    value = v == Py_True;
    return PyBool_Check(v);
  }
  bool get() const { return value; }
};

// The GIL released for a scope and taken back on the way out, by an exception too.
struct WithoutGil {
  PyThreadState* state = PyEval_SaveThread();
  ~WithoutGil() { PyEval_RestoreThread(state); }
};

// Calls op with the arguments (lists, options); false, having called nothing,
// when they are not the plain case.
template <typename... Args>
bool call_direct(const c10::TypedOperatorHandle<void(Args...)>& op, PyObject* lists, PyObject* options) {
  const auto& schema = op.schema().arguments();
  const Py_ssize_t positional = PyTuple_GET_SIZE(lists);
  if (positional + PyDict_Size(options) != static_cast<Py_ssize_t>(sizeof...(Args))) return false;
  std::tuple<Arg<std::decay_t<Args>>...> args;
  size_t i = 0;
  auto load = [&](auto& arg) {
    PyObject* value = static_cast<Py_ssize_t>(i) < positional
                          ? PyTuple_GET_ITEM(lists, i)
                          : PyDict_GetItemString(options, schema[i].name().c_str());
    ++i;
    return value != nullptr && arg.load(value);
  };
  if (!std::apply([&](auto&... arg) { return (load(arg) && ...); }, args)) {
    PyErr_Clear();
    return false;
  }
  WithoutGil released;
  std::apply([&](const auto&... arg) { op.call(arg.get()...); }, args);
  return true;
}

using Direct = bool (*)(PyObject* lists, PyObject* options);

template <typename Sig, const char* Name, const char* Overload>
bool direct(PyObject* lists, PyObject* options) {
  return call_direct(fusedopt::optimizer_op<Sig, Name, Overload>(), lists, options);
}

PyObject* call(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  const char* name = nullptr;
  PyObject* lists = nullptr;
  PyObject* options = nullptr;
  if (!PyArg_ParseTuple(args, "sO!O!", &name, &PyTuple_Type, &lists, &PyDict_Type, &options)) return nullptr;
  static const std::unordered_map<std::string, Direct> ops = [] {
    std::unordered_map<std::string, Direct> m;
#define FUSEDOPT_DIRECT(OP, FN, LR, NAME, OVERLOAD)            \
  {                                                           \
    FUSEDOPT_OPTIMIZER_OP_NAMES(NAME, OVERLOAD);              \
    m[registered] = &direct<::fusedopt::OP<LR>, name, overload>; \
  }
    FUSEDOPT_FOR_EACH_OPTIMIZER_OP(FUSEDOPT_DIRECT)
#undef FUSEDOPT_DIRECT
    return m;
  }();
  const auto op = ops.find(name);
  if (op == ops.end()) {
    PyErr_Format(PyExc_ValueError, "_call: %s is not an optimizer op", name);
    return nullptr;
  }
  if (!op->second(lists, options)) Py_RETURN_NOTIMPLEMENTED;
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"_call", call, METH_VARARGS, "Calls an optimizer op unboxed, or returns NotImplemented (Note [Direct calls])."},
    {"_grads", grads, METH_O, "[p.grad for p in params] (Note [Gradients from C++])."},
    {"_contiguous", contiguous, METH_O, "Whether every tensor is contiguous (Note [Gradients from C++])."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// `import fusedopt._C` loads the library, and with it every op registration.
extern "C" PyObject* PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module);
}
