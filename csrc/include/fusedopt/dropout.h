#pragma once
// The dropout ops (DESIGN.md §6) up to the kernel launch, shared by the CPU
// ops, the CUDA ops and the grid-emulation ops: validation, output
// allocation and the validated call. Each device supplies a runner with
//   dropout(call)                    y = dropout(x)          (also dx = dropout(dy))
//   bias_dropout_add(call)           y = residual + dropout(x + bias)
//   bias_dropout_add_backward(call, dbias)   dx = dropout(dy), the partial sums, dbias
//   keep_bits(call, out)             packed keep bits
// called only after every check passed and only for non-empty inputs.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "fusedopt/dispatch.h"
#include "fusedopt/dropout_body.h"
#include "fusedopt/philox.h"

namespace fusedopt {

// Note [Strided dropout]
// A dense input that is not contiguous (channels_last, a transpose, heads
// transposed out of [batch, seq, heads, dim]) gets an output with its own
// strides (Note [Output layout]), and its mask still follows the logical
// index. Copying it to contiguous order and back costs two permuting copies
// more than the kernel (measured here: 16x64x128x128 fp32 channels_last took
// 27 ms against 2.4 ms contiguous). Runners with a strided kernel (the CPU's,
// Note [Strided walk]) instead walk x and y through their shared strides
// where the stride-1 dimension fills a cache line (strided_walk), described
// by a Strided: size-1 dimensions dropped, and dimensions merged
// where they are adjacent in the logical order and in memory. Its dimension
// `unit` has stride 1. If `unit` is the last dimension, the tensor is rows
// of sizes.back() elements, each contiguous in memory and in the logical
// order. Otherwise, element (o, j, r), with o the index over the dimensions
// before `unit`, j the index along it and r the index over those after it,
// has logical index (o·sizes[unit] + j)·P + r (P the product of the sizes
// after `unit`): the kernel draws the bits of a run of r for 64 j at a time
// and transposes them, so that the 64 j of one (o, r), which lie side by
// side in memory, are stored as one run. The CUDA runner (and its grid
// emulation) tiles the same way, with the bits in shared memory (Note
// [Strided CUDA dropout] in fusedopt/dropout_body.h), for up to
// dropout::kMaxDims merged dimensions (its kMaxStridedDims).
struct Strided {
  std::vector<int64_t> sizes, strides;  // strides in elements, the same for x and y
  int unit = 0;  // the dimension of stride 1
};

// x's Strided, x dense (non-overlapping) with at least one element.
inline Strided strided_of(const at::Tensor& x) {
  Strided s;
  for (int64_t d = x.dim() - 1; d >= 0; --d) {  // from the last dimension, merging into the one after
    if (x.size(d) == 1) continue;
    if (!s.sizes.empty() && x.stride(d) == s.strides.back() * s.sizes.back()) {
      s.sizes.back() *= x.size(d);  // d and d + 1 step through memory as one dimension of d + 1's stride
    } else {
      s.sizes.push_back(x.size(d));
      s.strides.push_back(x.stride(d));
    }
  }
  if (s.sizes.empty()) s.sizes = s.strides = {1};
  std::reverse(s.sizes.begin(), s.sizes.end());
  std::reverse(s.strides.begin(), s.strides.end());
  s.unit = static_cast<int>(std::find(s.strides.begin(), s.strides.end(), 1) - s.strides.begin());
  TORCH_INTERNAL_ASSERT(s.unit < static_cast<int>(s.sizes.size()), "a dense tensor has a dimension of stride 1");
  return s;
}

// A validated call: the draw and untyped pointers to the storage, contiguous
// unless `strided` describes it (Note [Strided dropout]).
struct DropoutCall {
  uint64_t seed = 0, offset = 0, threshold = 0;
  double scale = 0;  // Note [Dropout formula]
  at::ScalarType dtype = at::kFloat;
  int64_t n = 0;  // elements, in row-major logical order
  int64_t h = 1;  // row length = bias length (bias_dropout_add and its backward)
  bool row_wise = false;  // h matters (bias_dropout_add and its backward)
  const void* x = nullptr;  // x, or dy for the backward ops
  const void* bias = nullptr;
  const void* residual = nullptr;
  void* y = nullptr;  // y, or dx
  void* partial = nullptr;  // op-math [row blocks][h] (Note [dbias row blocks])
  const Strided* strided = nullptr;  // dropout_strided's layout of x and y
};

// Whether a runner has a strided dropout kernel (Note [Strided dropout]).
template <typename Run>
constexpr bool has_strided = requires(const Run& r, const DropoutCall& c) { r.dropout_strided(c); };

// Note [Dropout draw]
// A draw is an int64 CPU tensor of two elements, (seed, offset), read on the
// host whatever the input's device. fusedopt::dropout_seed(draws) takes a
// fresh one from torch's default CPU generator and increments `draws`, a
// global int64 counter (fusedopt/nn/functional.py). The mutation matters
// under torch.compile: the call stays in the graph (no graph break, no
// recompilation per value), and since every call reads the counter the
// previous one wrote, no two calls are ever merged (AOTAutograd's CSE ignores
// the nondeterministic_seeded tag) and they run in program order, so a
// compiled module draws the masks eager mode draws. The backward gets the
// same draw tensor: the mask is regenerated, never saved.
inline DropoutCall make_dropout_call(const char* op, double p, const at::Tensor& draw) {
  TORCH_CHECK(p >= 0 && p <= 1, op, ": dropout probability has to be between 0 and 1, but got ", p);
  TORCH_CHECK(draw.defined(), op, ": draw is undefined");
  TORCH_CHECK(draw.device().is_cpu() && draw.scalar_type() == at::kLong && draw.numel() == 2, op,
              ": draw must be an int64 CPU tensor of two elements (seed, offset), got ", draw.scalar_type(), " ",
              draw.sizes(), " on ", draw.device());
  const at::Tensor d = draw.contiguous();
  DropoutCall c;
  c.seed = static_cast<uint64_t>(d.data_ptr<int64_t>()[0]);
  c.offset = static_cast<uint64_t>(d.data_ptr<int64_t>()[1]);
  c.threshold = philox::keep_threshold(1.0 - p);
  c.scale = p < 1 ? 1.0 / (1.0 - p) : 0.0;
  return c;
}

// Checks a floating, strided tensor on `device`.
inline void check_input(const char* op, const char* name, const at::Tensor& t, c10::DeviceType device) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be dense (strided), got ", t.layout());
  TORCH_CHECK(t.device().type() == device, op, ": expected ", name, " on ", device, ", got ", t.device());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", dt);
}

// A checked input, made contiguous: the mask indexes the row-major logical
// index, whatever the strides.
inline at::Tensor dropout_input(const char* op, const char* name, const at::Tensor& t, c10::DeviceType device) {
  check_input(op, name, t, device);
  return t.contiguous();
}

// x's Strided where `Run` walks x through its strides (Note [Strided
// dropout]): x dense, not contiguous, and its stride-1 dimension at least a
// cache line long. Shorter memory runs (3 channels, channels_last) cost more
// per element in the walk than the two copies: measured here, 64x3x256x256
// fp32 channels_last 18 ms walked against 6.5-8 ms copied; 4 floats a run,
// 22 against 16-17 ms; 16 floats (a line) a run, 23 against 27 ms.
template <typename Run>
std::optional<Strided> strided_walk(const at::Tensor& x) {
  if (!has_strided<Run> || x.is_contiguous() || !x.is_non_overlapping_and_dense() || x.numel() == 0) return {};
  Strided s = strided_of(x);
  if (s.sizes[s.unit] * static_cast<int64_t>(x.element_size()) < 64) return {};
  if constexpr (requires { Run::kMaxStridedDims; })
    if (static_cast<int>(s.sizes.size()) > Run::kMaxStridedDims) return {};
  return s;
}

// Runs dropout_strided on x → y, which share x's strides, described by s.
template <typename Run>
void run_strided(const Run& run, DropoutCall c, const at::Tensor& x, const at::Tensor& y, const Strided& s) {
  if constexpr (has_strided<Run>) {
    c.dtype = x.scalar_type();
    c.n = x.numel();
    c.x = x.data_ptr();
    c.y = y.data_ptr();
    c.strided = &s;
    run.dropout_strided(c);
  }
}

// Note [Huge pages for outputs]
// A fresh large CPU output is faulted in 4 KiB page by page on first write,
// which costs more than the kernel (measured here: 28 ms of faults to fill
// 64 MB on one core, against ~7 ms for the dropout itself; 7 ms with huge
// pages). Where the kernel hands out transparent huge pages on request (THP
// "madvise" mode) the outputs ask for them, as torch's allocator does under
// THP_MEM_ALLOC_ENABLE=1. Only the 2 MiB-aligned interior is advised, so no
// memory beyond the tensor's own is touched; the advice may be ignored.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (t.device().is_cpu() && t.nbytes() >= 8 * kHuge) {
    const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + t.nbytes()) & ~(kHuge - 1);
    if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#endif
  return t;
}

// Note [Output layout]
// dropout's output has the strides torch's would have: empty_like(x), i.e.
// x's own where x is dense (channels_last, a transpose), else contiguous. The
// mask indexes the logical element (DESIGN.md §6). A dense x that is not
// contiguous is walked through its strides where the runner can
// (Note [Strided dropout]), else computed in its contiguous copy, in place,
// and copied out: one pass more than a contiguous x, which is read and
// written once.
template <typename Run>
at::Tensor dropout_op(const char* op, c10::DeviceType device, const Run& run, const at::Tensor& x, double p,
                      const at::Tensor& draw) {
  DropoutCall c = make_dropout_call(op, p, draw);
  check_input(op, "input", x, device);
  if (const auto s = strided_walk<Run>(x)) {
    at::Tensor y = at::empty_like(x);
    TORCH_INTERNAL_ASSERT(y.strides() == x.strides(), op, ": empty_like keeps a dense tensor's strides");
    run_strided(run, c, x, y, *s);
    return y;
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor y = x.is_contiguous() ? empty_output(xc.sizes(), xc.options()) : at::empty_like(x);
  const bool direct = y.is_contiguous();  // else xc is a copy of ours, computed in place
  c.dtype = xc.scalar_type();
  c.n = xc.numel();
  c.x = xc.data_ptr();
  c.y = direct ? y.data_ptr() : xc.data_ptr();
  if (c.n > 0) run.dropout(c);
  if (!direct) y.copy_(xc);
  return y;
}

// Note [In-place dropout]
// x ← dropout(x) with y = x: the kernels read each element before they write
// it, and the mask indexes the element, so the result is dropout(x) exactly.
// Nothing is allocated when x is contiguous, or dense where the runner walks
// strides (Note [Strided dropout]); another x is computed in a contiguous
// copy and written back. The backward needs only (p, draw), so
// torch.nn.Dropout(inplace=True)'s memory saving is real here: torch still
// keeps a mask of one byte per element.
template <typename Run>
void dropout_inplace_op(const char* op, c10::DeviceType device, const Run& run, const at::Tensor& x, double p,
                        const at::Tensor& draw) {
  DropoutCall c = make_dropout_call(op, p, draw);
  check_input(op, "input", x, device);
  TORCH_CHECK(at::has_internal_overlap(x) != at::MemOverlap::Yes, op,
              ": input has elements that share memory (e.g. an expanded tensor); it cannot be written in place");
  if (const auto s = strided_walk<Run>(x)) return run_strided(run, c, x, x, *s);
  const at::Tensor xc = x.contiguous();
  c.dtype = xc.scalar_type();
  c.n = xc.numel();
  c.x = xc.data_ptr();
  c.y = xc.data_ptr();
  if (c.n > 0) run.dropout(c);
  if (!xc.is_same(x)) x.copy_(xc);
}

template <typename Run>
at::Tensor bias_dropout_add_op(const char* op, c10::DeviceType device, const Run& run, const at::Tensor& x,
                               const at::Tensor& bias, const at::Tensor& residual, double p, const at::Tensor& draw) {
  DropoutCall c = make_dropout_call(op, p, draw);
  const at::Tensor xc = dropout_input(op, "input", x, device);
  const at::Tensor bc = dropout_input(op, "bias", bias, device);
  const at::Tensor rc = dropout_input(op, "residual", residual, device);
  TORCH_CHECK(xc.dim() >= 1, op, ": input must have at least one dimension");
  TORCH_CHECK(bc.dim() == 1 && bc.size(0) == xc.size(-1), op, ": bias must have shape [", xc.size(-1),
              "] (the input's last dimension), got ", bc.sizes());
  TORCH_CHECK(rc.sizes() == xc.sizes(), op, ": residual must have the input's shape ", xc.sizes(), ", got ",
              rc.sizes());
  TORCH_CHECK(bc.scalar_type() == xc.scalar_type() && rc.scalar_type() == xc.scalar_type(), op,
              ": input, bias and residual must share a dtype, got ", xc.scalar_type(), ", ", bc.scalar_type(),
              " and ", rc.scalar_type());
  TORCH_CHECK(bc.device() == xc.device() && rc.device() == xc.device(), op,
              ": input, bias and residual must be on one device, got ", xc.device(), ", ", bc.device(), " and ",
              rc.device());
  at::Tensor y = empty_output(xc.sizes(), xc.options());
  c.dtype = xc.scalar_type();
  c.n = xc.numel();
  c.h = xc.size(-1);
  c.row_wise = true;
  c.x = xc.data_ptr();
  c.bias = bc.data_ptr();
  c.residual = rc.data_ptr();
  c.y = y.data_ptr();
  if (c.n > 0) run.bias_dropout_add(c);
  return y;
}

// (dx, dbias): dx = dropout(dy), dbias = dx summed over every dimension but
// the last, in the fixed order of Note [dbias row blocks].
template <typename Run>
std::tuple<at::Tensor, at::Tensor> bias_dropout_add_backward_op(const char* op, c10::DeviceType device,
                                                                const Run& run, const at::Tensor& grad,
                                                                double p, const at::Tensor& draw) {
  DropoutCall c = make_dropout_call(op, p, draw);
  const at::Tensor gc = dropout_input(op, "grad", grad, device);
  TORCH_CHECK(gc.dim() >= 1, op, ": grad must have at least one dimension");
  at::Tensor dx = empty_output(gc.sizes(), gc.options());
  at::Tensor dbias = at::empty({gc.size(-1)}, gc.options());
  c.dtype = gc.scalar_type();
  c.n = gc.numel();
  c.h = gc.size(-1);
  c.row_wise = true;
  if (c.h == 0) return {dx, dbias};
  if (c.n == 0) return {dx, dbias.zero_()};
  const auto blocks = dropout::row_blocks(c.n / c.h);
  at::Tensor partial = at::zeros({blocks.count, c.h}, gc.options().dtype(
                                                          c.dtype == at::kDouble ? at::kDouble : at::kFloat));
  c.x = gc.data_ptr();
  c.y = dx.data_ptr();
  c.partial = partial.data_ptr();
  run.bias_dropout_add_backward(c, dbias.data_ptr());
  return {dx, dbias};
}

// uint8 [ceil(numel / 8)]: bit k of byte j is the keep bit of element 8j + k
// of the draw (seed, offset) at probability p, on x's device.
template <typename Run>
at::Tensor keep_bits_op(const char* op, c10::DeviceType device, const Run& run, const at::Tensor& x, double p,
                        const at::Tensor& draw) {
  DropoutCall c = make_dropout_call(op, p, draw);
  TORCH_CHECK(x.defined() && x.device().type() == device, op, ": expected a tensor on ", device);
  c.n = x.numel();
  at::Tensor bits = at::empty({(c.n + 7) / 8}, x.options().dtype(at::kByte));
  if (c.n > 0) run.keep_bits(c, bits.data_ptr<uint8_t>());
  return bits;
}

inline bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The typed arguments of the per-thread bodies (dropout_body.h) for a call.
template <typename T>
dropout::Args<T> typed_args(const DropoutCall& c) {
  using S = typename OpMath<T>::type;
  dropout::Args<T> a;
  a.x = static_cast<const T*>(c.x);
  a.bias = static_cast<const T*>(c.bias);
  a.residual = static_cast<const T*>(c.residual);
  a.y = static_cast<T*>(c.y);
  a.partial = static_cast<S*>(c.partial);
  a.seed = c.seed;
  a.offset = c.offset;
  a.threshold = c.threshold;
  a.scale = static_cast<S>(c.scale);
  a.n = c.n;
  a.h = c.h;
  a.vec = aligned16(c.x) && aligned16(c.bias) && aligned16(c.residual) && aligned16(c.y) &&
          (!c.row_wise || c.h % dropout::unit_elems<T>() == 0);
  return a;
}

// The typed arguments of the strided bodies (Note [Strided CUDA dropout]) for
// a call with c.strided set, of at most dropout::kMaxDims dimensions.
template <typename T>
dropout::StridedArgs<T> strided_args(const DropoutCall& c) {
  const Strided& s = *c.strided;
  dropout::StridedArgs<T> a;
  a.x = static_cast<const T*>(c.x);
  a.y = static_cast<T*>(c.y);
  a.seed = c.seed;
  a.offset = c.offset;
  a.threshold = c.threshold;
  a.scale = static_cast<typename dropout::StridedArgs<T>::S>(c.scale);
  a.dims = static_cast<int>(s.sizes.size());
  TORCH_INTERNAL_ASSERT(a.dims <= dropout::kMaxDims, "strided dropout: ", a.dims, " dimensions");
  a.unit = s.unit;
  for (int d = 0; d < a.dims; ++d) {
    a.sizes[d] = s.sizes[d];
    a.strides[d] = s.strides[d];
    if (d < a.unit) a.outer *= s.sizes[d];
    if (d > a.unit) a.inner *= s.sizes[d];
  }
  a.j_size = s.sizes[a.unit];
  const bool rows = a.unit == a.dims - 1;
  a.units = rows ? a.outer * dropout::ceil_div(a.j_size, dropout::unit_elems<T>())
                 : a.outer * dropout::ceil_div(a.j_size, dropout::kTileJ) * dropout::ceil_div(a.inner, dropout::kTileR);
  a.vec = rows && aligned16(a.x) && aligned16(a.y);
  for (int d = 0; d < a.unit; ++d) a.vec = a.vec && a.strides[d] * static_cast<int64_t>(sizeof(T)) % 16 == 0;
  return a;
}

// Runs a strided call's bodies (Note [Strided CUDA dropout]) through a
// runner's shells: rows(I{}), or tiles(I{}, std::bool_constant<kOneR>{}),
// with the index type I that covers the call (uint64_t if `wide`, which the
// grid emulation asks for to test that path on small tensors).
template <typename T, typename Rows, typename Tiles>
void strided_bodies(const dropout::StridedArgs<T>& a, bool wide, const Rows& rows, const Tiles& tiles) {
  FUSEDOPT_BOOL_SWITCH(!wide && dropout::narrow_index(a), NARROW, [&] {
    using I = std::conditional_t<NARROW, uint32_t, uint64_t>;
    if (a.unit == a.dims - 1) return rows(I{});
    FUSEDOPT_BOOL_SWITCH(a.unit + 2 == a.dims, ONE_R, [&] { tiles(I{}, std::bool_constant<ONE_R>{}); });
  });
}

inline dropout::BitsArgs bits_args(const DropoutCall& c, uint8_t* out) {
  dropout::BitsArgs a;
  a.bits = out;
  a.seed = c.seed;
  a.offset = c.offset;
  a.threshold = c.threshold;
  a.n = c.n;
  a.vec = reinterpret_cast<uintptr_t>(out) % 4 == 0;
  return a;
}

}  // namespace fusedopt

// Registers a device's dropout ops: functions named after them (dropout_ as
// dropout_inplace) in the current namespace, for CPU (csrc/cpu/dropout_ops.cpp)
// and CUDA (csrc/cuda/dropout.cu).
#define FUSEDOPT_IMPL_DROPOUT(m)                                 \
  m.impl("dropout", &dropout);                                   \
  m.impl("dropout_", &dropout_inplace);                          \
  m.impl("dropout_backward", &dropout_backward);                 \
  m.impl("bias_dropout_add", &bias_dropout_add);                 \
  m.impl("bias_dropout_add_backward", &bias_dropout_add_backward); \
  m.impl("dropout_keep_bits", &dropout_keep_bits)
