// The eager call of a native rlhf_kernels op from Python without torch.ops'
// argument parser: rlhf_kernels._C.call_below_autograd(index, *args) converts
// the arguments by the op's schema (Tensor, Tensor?, float, float?, int, bool),
// calls the op through the dispatcher below the autograd keys (the dispatch
// keys of the tensors and of the thread, Python dispatch modes included) and
// returns its outputs as torch.ops does; call_op(index, *args) likewise from
// the autograd keys on (an op with its autograd kernel in C++,
// csrc/autograd.cpp). Anything it does not convert, a tensor subclass or an
// active torch-function mode (which torch.ops' parser would hand to
// __torch_function__) returns NotImplemented, and the caller calls the op
// through torch.ops instead (rlhf_kernels/ops/_op.py). Per-call host time
// against torch.ops: python -m benchmarks.bench_overhead.
#include <Python.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <vector>

namespace rlhf_kernels {
namespace {

std::vector<c10::OperatorHandle>& handles() {
  static std::vector<c10::OperatorHandle> ops;
  return ops;
}

// Releases the GIL for the op's work; a Python kernel or mode the dispatcher
// reaches takes it back.
struct GilRelease {
  PyThreadState* state = PyEval_SaveThread();
  ~GilRelease() { PyEval_RestoreThread(state); }
};

// The kind of an argument's value (an Optional's contained type), and the
// kinds to_ivalue converts.
c10::TypeKind value_kind(const c10::TypePtr& type) {
  return type->kind() == c10::TypeKind::OptionalType ? type->containedType(0)->kind() : type->kind();
}

bool converted(c10::TypeKind kind) {
  return kind == c10::TypeKind::TensorType || kind == c10::TypeKind::FloatType || kind == c10::TypeKind::IntType ||
         kind == c10::TypeKind::BoolType;
}

// One argument as the op's schema types it, or false (the caller falls back).
bool to_ivalue(PyObject* obj, const c10::TypePtr& type, torch::jit::Stack& stack) {
  if (type->kind() == c10::TypeKind::OptionalType && obj == Py_None) {
    stack.emplace_back();
    return true;
  }
  switch (value_kind(type)) {
    case c10::TypeKind::TensorType:
      if (!THPVariable_CheckExact(obj)) return false;
      stack.emplace_back(THPVariable_Unpack(obj));
      return true;
    case c10::TypeKind::FloatType:
      if (!PyFloat_CheckExact(obj) && !PyLong_CheckExact(obj)) return false;
      stack.emplace_back(PyFloat_AsDouble(obj));
      return !PyErr_Occurred();
    case c10::TypeKind::IntType:
      if (!PyLong_CheckExact(obj)) return false;
      stack.emplace_back(static_cast<int64_t>(PyLong_AsLongLong(obj)));
      return !PyErr_Occurred();
    case c10::TypeKind::BoolType:
      if (!PyBool_Check(obj)) return false;
      stack.emplace_back(obj == Py_True);
      return true;
    default:
      return false;
  }
}

PyObject* to_python(const c10::IValue& value) {
  if (value.isNone()) Py_RETURN_NONE;
  return THPVariable_Wrap(value.toTensor());
}

PyObject* not_implemented() {
  PyErr_Clear();
  Py_RETURN_NOTIMPLEMENTED;
}

// op_index(name, overload) -> the index call_below_autograd takes, or None when
// the schema has an argument type it does not convert.
PyObject* op_index(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_VALUE(nargs == 2, "op_index(name, overload_name)");
  const char* name = PyUnicode_AsUTF8(args[0]);
  const char* overload = PyUnicode_AsUTF8(args[1]);
  if (name == nullptr || overload == nullptr) return nullptr;
  auto& ops = handles();
  const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow(name, overload);
  for (size_t i = 0; i < ops.size(); ++i) {
    if (ops[i] == op) return PyLong_FromSize_t(i);
  }
  for (const auto& a : op.schema().arguments()) {
    if (!converted(value_kind(a.type()))) Py_RETURN_NONE;  // an argument type call_below_autograd does not convert
  }
  ops.push_back(op);
  return PyLong_FromSize_t(ops.size() - 1);
  END_HANDLE_TH_ERRORS
}

// The op's outputs for every argument of the schema, positional, called
// through the dispatcher from the autograd keys on (with_autograd) or below
// them; NotImplemented for what needs torch.ops' parser.
PyObject* call(PyObject* const* args, Py_ssize_t nargs, bool with_autograd) {
  if (nargs < 1 || at::impl::torch_function_mode_enabled()) return not_implemented();
  const size_t index = PyLong_AsSize_t(args[0]);
  auto& ops = handles();
  if (PyErr_Occurred() || index >= ops.size()) return not_implemented();
  const c10::OperatorHandle op = ops[index];  // a copy: op_index may grow the list
  const auto& arguments = op.schema().arguments();
  if (static_cast<size_t>(nargs - 1) != arguments.size()) return not_implemented();
  torch::jit::Stack stack;
  stack.reserve(arguments.size());
  for (size_t i = 0; i < arguments.size(); ++i) {
    if (!to_ivalue(args[i + 1], arguments[i].type(), stack)) return not_implemented();
  }
  {
    GilRelease no_gil;
    std::optional<at::AutoDispatchBelowAutograd> below_autograd;
    if (!with_autograd) below_autograd.emplace();
    op.callBoxed(stack);
  }
  if (stack.empty()) Py_RETURN_NONE;
  if (stack.size() == 1) return to_python(stack[0]);
  PyObject* out = PyTuple_New(static_cast<Py_ssize_t>(stack.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < stack.size(); ++i) {
    PyObject* item = to_python(stack[i]);
    if (item == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyTuple_SET_ITEM(out, static_cast<Py_ssize_t>(i), item);
  }
  return out;
}

// call_below_autograd(index, *args)
PyObject* call_below_autograd(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  return call(args, nargs, /*with_autograd=*/false);
  END_HANDLE_TH_ERRORS
}

// call_op(index, *args): as torch.ops calls it, autograd included.
PyObject* call_op(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  return call(args, nargs, /*with_autograd=*/true);
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"op_index", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(op_index)), METH_FASTCALL,
     "op_index(name, overload_name) -> int | None: the index of a registered op for call_below_autograd"},
    {"call_below_autograd", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(call_below_autograd)),
     METH_FASTCALL,
     "call_below_autograd(index, *args): the op's outputs, or NotImplemented when an argument needs torch.ops"},
    {"call_op", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(call_op)), METH_FASTCALL,
     "call_op(index, *args): the op's outputs with its autograd, or NotImplemented when an argument needs "
     "torch.ops"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* python_call_methods() { return methods; }

}  // namespace rlhf_kernels
