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

// The bytes [begin, end) a mutated argument covers, and its list's name.
struct ByteRange {
  uintptr_t begin, end;
  const char* name;
};

// Note [Aliasing]
// Two mutated arguments that share memory would make the result depend on the
// order of loads and stores. Every mutated tensor's byte range is collected,
// sorted, and neighbours must not overlap. Sorting 15000 ranges on every step
// of a 3000-parameter Adam costs half as much as its kernel, and an optimizer hands
// the same tensors step after step, so each thread remembers the ranges (in
// call order) of the last few calls that passed: a call whose ranges equal one
// of them, begin and end, element by element, passes without sorting. That is
// exact: whether ranges overlap depends only on the ranges. A few entries, not
// one, so optimizers that step in turn (a GAN's two) each keep theirs.
inline void check_no_overlap(std::vector<ByteRange> ranges) {
  constexpr size_t kRemembered = 4;
  thread_local std::vector<ByteRange> passed[kRemembered];
  thread_local size_t next = 0;
  auto same = [](const ByteRange& a, const ByteRange& b) { return a.begin == b.begin && a.end == b.end; };
  for (const auto& p : passed)
    if (p.size() == ranges.size() && std::equal(p.begin(), p.end(), ranges.begin(), same)) return;
  std::vector<ByteRange> sorted = ranges;
  std::sort(sorted.begin(), sorted.end(), [](const ByteRange& a, const ByteRange& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < sorted.size(); ++i)
    TORCH_CHECK(sorted[i].begin >= sorted[i - 1].end, "fusedopt: ", sorted[i - 1].name, " and ",
                sorted[i].name, " share memory; every mutated tensor must be distinct");
  passed[next] = std::move(ranges);
  next = (next + 1) % kRemembered;
}

inline void check_hyper(bool ok, const char* what, double value) {
  TORCH_CHECK(ok, "fusedopt: invalid ", what, ": ", value);
}

inline math::Common make_common(double lr, double weight_decay, double l1_decay, bool decoupled,
                                bool maximize, double grad_keep_prob, int64_t grad_mask_seed,
                                bool stochastic_rounding) {
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
  c.stochastic_rounding = stochastic_rounding;
  return c;
}

// Note [State dtype]
// The state lists of a call share one dtype: the parameters' (torch's
// choice), or float32 for float16/bfloat16 parameters ("fp32 state", the
// optimizers' state_dtype=torch.float32). The rules compute in op-math
// (float32 for half parameters) either way; fp32 state only stops rounding
// the moments to 8 or 11 bits after every step. Params and grads keep the
// parameters' dtype, and stochastic rounding (Note [Stochastic rounding])
// applies to bfloat16 parameters only.
inline bool is_state_dtype(at::ScalarType param, at::ScalarType state) {
  return state == param || (state == at::kFloat && (param == at::kHalf || param == at::kBFloat16));
}

// Validates an optimizer op's lists (params, grads, state lists, steps,
// indices, shard offsets, AMP tensors) for `device_type` and fills `call`:
// one TensorRef per parameter with the pointers of the lists in use, in
// order, the number of lists and the dtypes.
template <typename Hyper>
inline void gather(const char* op, OptimizerCall<Hyper>& call, at::TensorList params, at::TensorList grads,
                   std::initializer_list<NamedList> states, at::TensorList steps, at::IntArrayRef indices,
                   at::OptionalIntArrayRef shard_offsets, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf, c10::DeviceType device_type) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, op, ": got ", n, " params but ", grads.size(), " grads");
  TORCH_CHECK(steps.size() == n, op, ": got ", n, " params but ", steps.size(), " steps");
  TORCH_CHECK(indices.size() == n, op, ": got ", n, " params but ", indices.size(), " indices");
  TORCH_CHECK(!shard_offsets || shard_offsets->size() == n, op, ": got ", n, " params but ",
              shard_offsets ? shard_offsets->size() : 0, " shard_offsets");
  int& lists = call.lists;
  lists = 2;
  const NamedList* first_state = nullptr;
  for (const auto& s : states) {
    TORCH_CHECK(s.list.size() == (s.used ? n : 0), op, ": ", s.name, " must hold ",
                (s.used ? n : 0), " tensors in this configuration, got ", s.list.size());
    lists += s.used;
    if (s.used && first_state == nullptr) first_state = &s;
  }
  std::vector<TensorRef>& refs = call.tensors;
  refs.assign(n, TensorRef{});
  if (n == 0) return;
  const at::Device device = params[0].device();
  TORCH_CHECK(device.type() == device_type, op, ": expected ", device_type, " tensors, got ", device);
  const at::ScalarType dtype = call.dtype = params[0].scalar_type();
  TORCH_CHECK(is_param_dtype(dtype), op, ": parameters must be float32, float64, float16 or bfloat16, got ",
              dtype);
  TORCH_CHECK(!call.common.stochastic_rounding || dtype == at::kBFloat16, op,
              ": stochastic_rounding applies to bfloat16 parameters, got ", dtype);
  at::ScalarType state_dtype = dtype;
  if (first_state != nullptr && first_state->list[0].defined()) state_dtype = first_state->list[0].scalar_type();
  TORCH_CHECK(is_state_dtype(dtype, state_dtype), op, ": ", first_state ? first_state->name : "state",
              "[0] has dtype ", state_dtype, "; the state of ", dtype,
              " parameters must be ", dtype,
              (dtype == at::kHalf || dtype == at::kBFloat16) ? " or float32" : "", " (Note [State dtype])");
  call.state_dtype = state_dtype;
  check_scalar_tensor(grad_scale, "grad_scale", device);
  check_scalar_tensor(found_inf, "found_inf", device);
  const bool step_on_host = device_type == c10::DeviceType::CPU;
  const at::Device step_device = step_on_host ? at::Device(at::kCPU) : device;
  const auto item = static_cast<uintptr_t>(c10::elementSize(dtype));
  const auto state_item = static_cast<uintptr_t>(c10::elementSize(state_dtype));
  std::vector<ByteRange> ranges;  // Note [Aliasing]
  ranges.reserve(n * (lists + 1));
  auto add = [&](void* ptr, int64_t numel, uintptr_t size, const char* name) {
    if (numel == 0) return;
    const auto begin = reinterpret_cast<uintptr_t>(ptr);
    ranges.push_back({begin, begin + static_cast<uintptr_t>(numel) * size, name});
  };
  for (size_t j = 0; j < n; ++j) {
    const at::Tensor& p = params[j];
    const int64_t numel = p.numel();
    TensorRef& r = refs[j];
    int k = 0;
    // Checks t (the j-th of list `name`) and takes its pointer as ptr[k].
    auto take = [&](const at::Tensor& t, const char* name) {
      const bool state = k >= 2;
      const at::ScalarType want = state ? state_dtype : dtype;
      TORCH_CHECK(t.defined(), op, ": ", name, "[", j, "] is undefined");
      TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, "[", j, "] must be dense (strided), got ",
                  t.layout(), "; sparse gradients are not supported");
      TORCH_CHECK(t.device() == device, op, ": ", name, "[", j, "] is on ", t.device(),
                  " but params[0] is on ", device, "; all tensors must share one device");
      TORCH_CHECK(t.scalar_type() == want, op, ": ", name, "[", j, "] has dtype ", t.scalar_type(),
                  ", expected ", want,
                  state ? " (every state tensor of a call shares one dtype)"
                        : " (params and grads share the parameters' dtype)");
      TORCH_CHECK(t.numel() == numel, op, ": ", name, "[", j, "] has ", t.numel(),
                  " elements, params[", j, "] has ", numel);
      TORCH_CHECK(t.is_contiguous(), op, ": ", name, "[", j, "] must be contiguous");
      r.ptr[k] = t.data_ptr();
      add(r.ptr[k++], numel, state ? state_item : item, name);
    };
    take(p, "params");
    take(grads[j], "grads");
    for (const auto& s : states)
      if (s.used) take(s.list[j], s.name);
    const at::Tensor& st = steps[j];
    TORCH_CHECK(st.defined() && st.numel() == 1, op, ": steps[", j, "] must hold one element");
    const at::ScalarType st_type = st.scalar_type();
    TORCH_CHECK(st_type == at::kFloat || st_type == at::kDouble, op, ": steps[", j,
                "] must be float32 or float64, got ", st_type);
    TORCH_CHECK(st.device() == step_device, op, ": steps[", j, "] must be on ", step_device, ", got ",
                st.device());
    TORCH_CHECK(indices[j] >= 0 && indices[j] < (int64_t(1) << 24), op, ": indices[", j,
                "] must lie in [0, 2^24), got ", indices[j]);
    r.numel = numel;
    r.step_ptr = st.data_ptr();
    r.step_double = st_type == at::kDouble;
    r.index = indices[j];
    if (shard_offsets) {
      r.base = (*shard_offsets)[j];
      TORCH_CHECK(r.base >= 0 && r.base <= (int64_t(1) << 62) - numel, op, ": shard_offsets[", j,
                  "] must lie in [0, 2^62 - numel], got ", r.base);
    }
    add(r.step_ptr, 1, st_type == at::kDouble ? 8 : 4, "steps");
  }
  check_no_overlap(std::move(ranges));
}

}  // namespace fusedopt
