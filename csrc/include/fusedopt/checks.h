#pragma once
// Input validation shared by the CPU and CUDA ops. Everything here runs before
// a single pointer is dereferenced: a malformed call is a RuntimeError.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "fusedopt/launch.h"
#include "fusedopt/philox.h"

namespace fusedopt {

// One tensor list of an optimizer op and whether this configuration uses it.
struct NamedList {
  const char* name;
  at::TensorList list;
  bool used;
};

inline bool is_param_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_scalar_tensor(const std::optional<at::Tensor>& t, const char* name,
                                const at::Device& device) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1, name, " must hold one element, got ", t->numel());
  TORCH_CHECK(t->scalar_type() == at::kFloat, name, " must be float32, got ", t->scalar_type());
  TORCH_CHECK(t->device() == device, name, " must be on ", device, ", got ", t->device());
}

// Note [Aliasing]
// Two mutated arguments that share memory would make the result depend on the
// order of loads and stores. Every mutated tensor's byte range is collected,
// sorted, and neighbours must not overlap.
inline void check_no_overlap(std::vector<std::pair<const at::Tensor*, const char*>> mutated) {
  struct Range {
    uintptr_t begin, end;
    const char* name;
  };
  std::vector<Range> ranges;
  ranges.reserve(mutated.size());
  for (auto& [t, name] : mutated) {
    if (t->numel() == 0) continue;
    const auto begin = reinterpret_cast<uintptr_t>(t->data_ptr());
    ranges.push_back({begin, begin + static_cast<uintptr_t>(t->numel()) * t->element_size(), name});
  }
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < ranges.size(); ++i)
    TORCH_CHECK(ranges[i].begin >= ranges[i - 1].end, "fusedopt: ", ranges[i - 1].name, " and ",
                ranges[i].name, " share memory; every mutated tensor must be distinct");
}

inline void check_hyper(bool ok, const char* what, double value) {
  TORCH_CHECK(ok, "fusedopt: invalid ", what, ": ", value);
}

inline math::Common make_common(double lr, double weight_decay, double l1_decay, bool decoupled,
                                bool maximize, double grad_keep_prob, int64_t grad_mask_seed) {
  check_hyper(std::isfinite(lr) && lr >= 0, "lr", lr);
  check_hyper(std::isfinite(weight_decay) && weight_decay >= 0, "weight_decay", weight_decay);
  check_hyper(std::isfinite(l1_decay) && l1_decay >= 0, "l1_decay", l1_decay);
  check_hyper(grad_keep_prob > 0 && grad_keep_prob <= 1, "grad_keep_prob", grad_keep_prob);
  TORCH_CHECK(philox::keep_threshold(grad_keep_prob) > 0, "fusedopt: grad_keep_prob=", grad_keep_prob,
              " keeps no element (P(keep) rounds to 0 at 2^-32 resolution)");
  math::Common c;
  c.lr = lr;
  c.weight_decay = weight_decay;
  c.l1_decay = l1_decay;
  c.decoupled = decoupled;
  c.maximize = maximize;
  c.keep_prob = grad_keep_prob;
  c.seed = static_cast<uint64_t>(grad_mask_seed);
  c.threshold = philox::keep_threshold(grad_keep_prob);
  return c;
}

// Validates an optimizer op's lists (params, grads, state lists, steps,
// indices, AMP tensors) for `device_type` and returns one TensorRef per
// parameter, with the pointers of the lists in use, in order.
inline std::vector<TensorRef> gather(const char* op, at::TensorList params, at::TensorList grads,
                                     std::initializer_list<NamedList> states, at::TensorList steps,
                                     at::IntArrayRef indices, const std::optional<at::Tensor>& grad_scale,
                                     const std::optional<at::Tensor>& found_inf,
                                     c10::DeviceType device_type, int& lists, at::ScalarType& dtype) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, op, ": got ", n, " params but ", grads.size(), " grads");
  TORCH_CHECK(steps.size() == n, op, ": got ", n, " params but ", steps.size(), " steps");
  TORCH_CHECK(indices.size() == n, op, ": got ", n, " params but ", indices.size(), " indices");
  lists = 2;
  for (const auto& s : states) {
    TORCH_CHECK(s.list.size() == (s.used ? n : 0), op, ": ", s.name, " must hold ",
                (s.used ? n : 0), " tensors in this configuration, got ", s.list.size());
    lists += s.used;
  }
  std::vector<TensorRef> refs(n);
  if (n == 0) return refs;
  const at::Device device = params[0].device();
  TORCH_CHECK(device.type() == device_type, op, ": expected ", device_type, " tensors, got ", device);
  dtype = params[0].scalar_type();
  TORCH_CHECK(is_param_dtype(dtype), op, ": parameters must be float32, float64, float16 or bfloat16, got ",
              dtype);
  check_scalar_tensor(grad_scale, "grad_scale", device);
  check_scalar_tensor(found_inf, "found_inf", device);
  std::vector<std::pair<const at::Tensor*, const char*>> mutated;
  for (size_t j = 0; j < n; ++j) {
    const at::Tensor& p = params[j];
    const int64_t numel = p.numel();
    auto check = [&](const at::Tensor& t, const char* name) {
      TORCH_CHECK(t.defined(), op, ": ", name, "[", j, "] is undefined");
      TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, "[", j, "] must be dense (strided), got ",
                  t.layout(), "; sparse gradients are not supported");
      TORCH_CHECK(t.device() == device, op, ": ", name, "[", j, "] is on ", t.device(),
                  " but params[0] is on ", device, "; all tensors must share one device");
      TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, "[", j, "] has dtype ", t.scalar_type(),
                  ", expected ", dtype, " (every tensor of a call shares the parameters' dtype)");
      TORCH_CHECK(t.numel() == numel, op, ": ", name, "[", j, "] has ", t.numel(),
                  " elements, params[", j, "] has ", numel);
      TORCH_CHECK(t.is_contiguous(), op, ": ", name, "[", j, "] must be contiguous");
      mutated.emplace_back(&t, name);
    };
    check(p, "params");
    check(grads[j], "grads");
    TensorRef& r = refs[j];
    r.ptr[0] = p.data_ptr();
    r.ptr[1] = grads[j].data_ptr();
    int k = 2;
    for (const auto& s : states) {
      if (!s.used) continue;
      check(s.list[j], s.name);
      r.ptr[k++] = s.list[j].data_ptr();
    }
    const at::Tensor& st = steps[j];
    TORCH_CHECK(st.defined() && st.numel() == 1, op, ": steps[", j, "] must hold one element");
    TORCH_CHECK(st.scalar_type() == at::kFloat || st.scalar_type() == at::kDouble, op, ": steps[", j,
                "] must be float32 or float64, got ", st.scalar_type());
    const bool step_on_host = device_type == c10::DeviceType::CPU;
    TORCH_CHECK(st.device() == (step_on_host ? at::Device(at::kCPU) : device), op, ": steps[", j,
                "] must be on ", (step_on_host ? at::Device(at::kCPU) : device), ", got ", st.device());
    mutated.emplace_back(&st, "steps");
    TORCH_CHECK(indices[j] >= 0 && indices[j] < (int64_t(1) << 24), op, ": indices[", j,
                "] must lie in [0, 2^24), got ", indices[j]);
    r.numel = numel;
    r.step_ptr = st.data_ptr();
    r.index = indices[j];
  }
  check_no_overlap(std::move(mutated));
  return refs;
}

}  // namespace fusedopt
