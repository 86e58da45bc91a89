#pragma once
// What a validated optimizer op hands to a device kernel: raw pointers per
// tensor plus the host-side options. Built only after every check passed.
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "fusedopt/math/common.h"

namespace fusedopt {

// Slots of TensorRef::ptr: the parameter, its gradient, then up to three
// state buffers in the order the op's schema lists them.
constexpr int kMaxLists = 5;

struct TensorRef {
  void* ptr[kMaxLists] = {};
  int64_t numel = 0;
  int64_t step = 0;   // 1-based step of this update (CPU); unused on CUDA
  void* step_ptr = nullptr;  // the `step` tensor's storage (CUDA reads it)
  bool step_double = false;  // whether that step is float64 (else float32)
  int64_t index = 0;  // position in the optimizer's state numbering
  int64_t base = 0;   // element 0's index in its whole parameter (Note [Shard offsets])
};

// The value at p of a float64 (is_double) or float32 scalar: a step, an AMP tensor.
FUSEDOPT_HD inline double scalar_value(const void* p, bool is_double) {
  return is_double ? *static_cast<const double*>(p) : *static_cast<const float*>(p);
}

template <typename Hyper>
struct OptimizerCall {
  std::vector<TensorRef> tensors;
  int lists = 2;  // params, grads, then the state buffers in use
  at::ScalarType dtype = at::kFloat;        // params and grads
  at::ScalarType state_dtype = at::kFloat;  // the state lists (Note [State dtype])
  math::Common common;
  Hyper hyper;
  float grad_scale = 1;  // CPU: read on the host
  bool scaled = false;
  const double* lr = nullptr;  // CUDA, grid emulation: lr read by the kernel (Note [Tensor lr])
  const double* beta1 = nullptr;  // Adam, the same for its betas (Note [Tensor betas])
  const double* beta2 = nullptr;
};

}  // namespace fusedopt
