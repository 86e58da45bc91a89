#pragma once
// The CPU driver: one flat list of chunks over every tensor of a call, split
// across threads by at::parallel_for, and an element loop that runs a rule
// body on op-math vectors, the last one partial.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "fusedopt/dispatch.h"
#include "fusedopt/launch.h"
#include "fusedopt/philox.h"
#include "philox_vec.h"
#include "vec.h"

namespace fusedopt {
namespace cpu {
namespace CPU_CAPABILITY {

// Note [CPU chunks]
// A call over 3000 small tensors must not pay a parallel region per tensor
// (torch's fused CPU optimizers do, ~10 µs each). We cut every tensor into
// chunks of at most kChunk elements, put all chunks of all tensors in one
// list, and hand contiguous runs of that list to threads. Elements are
// independent, so results never depend on the thread count.
constexpr int64_t kChunk = int64_t(1) << 15;

template <typename F>
void for_each_chunk(const std::vector<TensorRef>& tensors, const F& fn) {
  struct Chunk {
    int64_t tensor, begin, end;
  };
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (int64_t j = 0; j < static_cast<int64_t>(tensors.size()); ++j) {
    const int64_t n = tensors[j].numel;
    total += n;
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({j, b, std::min(n, b + kChunk)});
  }
  const int64_t count = static_cast<int64_t>(chunks.size());
  // Below a few chunks' worth of elements, waking threads costs more than it saves.
  const int64_t grain = total < 2 * kChunk ? std::max<int64_t>(count, 1) : 1;
  at::parallel_for(0, count, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) fn(tensors[chunks[c].tensor], chunks[c].begin, chunks[c].end);
  });
}

// Bernoulli draws of a gradient mask (Note [Gradient mask stream]).
struct KeepDraw {
  uint64_t seed = 0, offset = 0, threshold = 0;

  // Lane k = 1 if element i0 + k is kept, else 0, for k < n (KeepCache::select).
  // Drawn by the vector Philox a 64-element group at a time (philox_vec.h);
  // the element loop asks for one vector at a time, so the last groups are
  // cached.
  template <typename S>
  at::vec::Vectorized<S> select(int64_t i0, int n) const {
    return cache.template select<S>(Draw{seed, offset, threshold}, i0, n);
  }

  mutable KeepCache cache;
};

// Note [Partial vector tail]
// The elements after the last whole vector of a run (all of a tensor smaller
// than a vector: most of a 3000-small-tensor model) are one partial vector:
// the first n lanes are loaded, the others are 0, the rule runs on the whole
// vector and only the n lanes are stored. Every op of a rule is lane-wise and
// IEEE (fo::fma fused, sqrt and / correctly rounded, also in the DEFAULT
// build), so lane k holds the bits the scalar rule would give element k (but
// for a NaN's payload and sign: ATen's vector maximum returns all-ones NaNs,
// so every element now gets the whole vectors' NaN). The padding lanes may
// compute 0/0; floating-point exceptions are masked (the C and torch
// default), so that sets a flag at most and never traps, and those lanes are
// never stored. Their keep bits are 0, and lane k's bit is element i + k's,
// as in whole vectors.

// The random bits of stochastic rounding for a tensor at one step, 16 per
// element (Note [Rounding stream]).
struct RoundDraw {
  uint64_t seed = 0, offset = 0;

  // The bits of the vector of elements i onwards (i % W == 0).
  const uint16_t* at(int64_t i) const { return cache.at(Draw{seed, offset, 0}, i); }

  mutable HalfCache cache;
};

// f.template operator()<K>() for K = 0 .. N - 1, unrolled: list K's storage
// type is a compile-time choice.
template <int N, typename F>
__attribute__((always_inline)) inline void for_each_list(const F& f) {
  [&]<int... K>(std::integer_sequence<int, K...>) { (f.template operator()<K>(), ...); }(
      std::make_integer_sequence<int, N>{});
}

// Note [Prefetch ahead]
// The element loop prefetches every array it walks kPrefetchBytes ahead of
// the vector it computes (one prefetch per array and vector; none past the
// run). The hardware prefetchers follow the loads, and on four or five arrays
// at once they do not run far enough ahead to keep the memory busy; a
// gradient mask or stochastic rounding is worse: its Philox words are drawn
// a batch at a time (philox_vec.h), a few hundred cycles of integer work
// without a load, which fill the reorder window so that the loads after the
// batch wait for it, and the draw and the memory traffic took turns. Measured
// here (2-core Xeon VM, 2 threads, 16.8M fp32, interleaved): Adam 11.3 ->
// 10.2 ms, SGD 8.5 -> 7.6-8.0 ms (the bench's single and 400-tensor rows, all
// five rules, 8-12% faster), Adam with grad_keep_prob=0.5 15.7 -> 12.0 ms
// (+39% -> +9% over unmasked). 0.5, 1, 1.5, 2, 4 and 16 KB ahead were tried on
// the masked step: 1-2 KB was best, 16 KB barely helped.
constexpr int64_t kPrefetchBytes = 2048;

// Runs body(x, keep) over elements [begin, end): x[k] holds W elements (a
// partial vector last) of the k-th array as op-math; arrays whose bit is set
// in `stores` are written back. Lists 0 and 1 (θ, g) hold scalar_t, the
// others state_t (Note [State dtype]); with SR, θ is stored with stochastic
// rounding. When a list holds a half type, the main loop moves two vectors
// per array and step (Note [Half pairs]) and runs the body on each.
template <typename scalar_t, typename state_t, bool SR, int N, bool MASK, typename Body>
inline void elementwise(void* const* ptr, int64_t begin, int64_t end, unsigned stores, const KeepDraw& draw,
                        const RoundDraw& round, const Body& rule_body) {
  // A local copy whose address never escapes: its constants can live in
  // registers (stores through the data pointers could alias the caller's copy).
  const Body body = rule_body;
  using V = typename VecIo<scalar_t>::V;
  using S = typename VecIo<scalar_t>::S;
  static_assert(std::is_same_v<V, typename VecIo<state_t>::V>, "one op-math type for every list");
  constexpr int W = VecIo<scalar_t>::W;
  constexpr int U = sizeof(scalar_t) < sizeof(S) || sizeof(state_t) < sizeof(S) ? 2 : 1;
  // M vectors from element i, with n lanes in the last: whole vectors (FULL, n == W) or one partial
  // vector (M == 1). Always inlined, so the main loop keeps the rule's constants in registers and its
  // draw is the aligned whole-vector case.
  auto block = [&]<int M, bool FULL>(int64_t i, int n) __attribute__((always_inline)) {
    static_assert(FULL || M == 1);
    V x[M][N];
    for_each_list<N>([&]<int K>() {
      using T = std::conditional_t<(K < 2), scalar_t, state_t>;
      const T* p = static_cast<const T*>(ptr[K]) + i;
      if constexpr (M == 2) VecIo<T>::load2(p, x[0][K], x[1][K]);
      else x[0][K] = FULL ? VecIo<T>::load(p) : VecIo<T>::load(p, n);
    });
    for (int m = 0; m < M; ++m) {
      V keep(S(1));
      if constexpr (MASK) keep = draw.template select<S>(i + m * W, FULL ? W : n);
      body(x[m], keep);
    }
    for_each_list<N>([&]<int K>() {
      using T = std::conditional_t<(K < 2), scalar_t, state_t>;
      if (!(stores >> K & 1u)) return;
      T* p = static_cast<T*>(ptr[K]) + i;
      if constexpr (K == 0 && SR) {
        // Vectors start at multiples of W (chunks at multiples of kChunk), W divides a batch.
        static_assert(HalfCache::kHalves % W == 0 && kChunk % W == 0);
        for (int m = 0; m < M; ++m) store_stochastic(p + m * W, x[m][K], round.at(i + m * W), FULL ? W : n);
      } else if constexpr (M == 2) {
        VecIo<T>::store2(p, x[0][K], x[1][K]);
      } else if constexpr (FULL) {
        VecIo<T>::store(p, x[0][K]);
      } else {
        VecIo<T>::store(p, x[0][K], n);
      }
    });
  };
  int64_t i = begin;
  for (; i + U * W <= end; i += U * W) {
    for_each_list<N>([&]<int K>() {  // Note [Prefetch ahead]
      using T = std::conditional_t<(K < 2), scalar_t, state_t>;
      constexpr int64_t ahead = kPrefetchBytes / static_cast<int64_t>(sizeof(T));
      if (i + ahead < end) __builtin_prefetch(static_cast<const T*>(ptr[K]) + i + ahead, 1);
    });
    block.template operator()<U, true>(i, W);
  }
  if (U == 2 && i + W <= end) {
    block.template operator()<1, true>(i, W);
    i += W;
  }
  if (i < end) block.template operator()<1, false>(i, static_cast<int>(end - i));  // Note [Partial vector tail]
}

// Runs an optimizer over a validated call. `rule(step, S{})` returns the
// element body body(x, keep) for tensors at that 1-based step, with an op-math
// tag: x[0] = θ, x[1] = g, x[2..] = state, as op-math vectors. Its constants
// (bias corrections in double, ...) are made once per call for the step of the
// first tensor, which is every tensor's in the usual case, and per chunk for
// tensors at another step. The gradient is stored back only when it was
// unscaled (AMP).
template <int N, bool MASK, typename Call, typename Rule>
void run_optimizer(const Call& call, const Rule& rule) {
  if (call.tensors.empty()) return;
  const unsigned stores = ((1u << N) - 1u) & ~(call.scaled ? 0u : 2u);
  FUSEDOPT_DISPATCH_STORAGE(call, "fusedopt", [&] {
    using S = typename OpMath<scalar_t>::type;
    const int64_t step = call.tensors.front().step;
    const auto shared = rule(step, S{});
    for_each_chunk(call.tensors, [&](const TensorRef& t, int64_t begin, int64_t end) {
      KeepDraw draw;
      if constexpr (MASK)
        draw = {call.common.seed, philox::grad_mask_offset(t.step, t.index), call.common.threshold};
      RoundDraw round;
      if constexpr (SR) round = {call.common.seed, philox::rounding_offset(t.step, t.index)};
      if (t.step == step)
        elementwise<scalar_t, state_t, SR, N, MASK>(t.ptr, begin, end, stores, draw, round, shared);
      else
        elementwise<scalar_t, state_t, SR, N, MASK>(t.ptr, begin, end, stores, draw, round, rule(t.step, S{}));
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedopt
