#pragma once
// The host-side handle of an optimizer op, for the kernels that call one from
// C++ (the Autograd kernel, csrc/autograd.cpp; the direct calls,
// csrc/module.cpp), and the names FUSEDOPT_FOR_EACH_OPTIMIZER_OP's entries
// are known by.
#include <ATen/core/dispatch/Dispatcher.h>

#include "fusedopt/calls.h"

namespace fusedopt {

// The op `Name` ("fusedopt::sgd_"), overload `Overload` ("" or "tensor_lr"),
// typed with its C++ signature; looked up on first use.
template <typename Sig, const char* Name, const char* Overload>
const c10::TypedOperatorHandle<Sig>& optimizer_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(Name, Overload).template typed<Sig>();
  return op;
}

}  // namespace fusedopt

// In a block, for an entry (.., NAME, OVERLOAD) of
// FUSEDOPT_FOR_EACH_OPTIMIZER_OP: `name` and `overload`, the template
// arguments of optimizer_op, and `registered` (FUSEDOPT_REGISTERED_NAME).
#define FUSEDOPT_OPTIMIZER_OP_NAMES(NAME, OVERLOAD)                        \
  static constexpr char name[] = "fusedopt::" NAME, overload[] = OVERLOAD; \
  FUSEDOPT_REGISTERED_NAME(NAME, OVERLOAD)
