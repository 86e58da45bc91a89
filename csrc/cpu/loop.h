#pragma once
// The CPU driver: one flat list of chunks over every tensor of a call, split
// across threads by at::parallel_for, and an element loop that runs a rule
// body on op-math vectors, the last one partial.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
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

struct Chunk {
  int64_t tensor, begin, end;
};

// Note [Prefetch ahead]
// The element loop prefetches every array it walks kPrefetchBytes ahead of
// the vector it computes (one prefetch per array and vector; as many
// elements ahead in every array, so an array narrower than the widest, bf16
// params beside fp32 state, is prefetched proportionally less far). The hardware
// prefetchers follow the loads, and on four or five arrays at once they do
// not run far enough ahead to keep the memory busy; a gradient mask or
// stochastic rounding is worse: its Philox words are drawn a batch at a time
// (philox_vec.h), a few hundred cycles of integer work without a load, which
// fill the reorder window so that the loads after the batch wait for it, and
// the draw and the memory traffic took turns. Measured here (2-core Xeon VM,
// 2 threads, 16.8M fp32, interleaved): Adam 11.3 -> 10.2 ms, SGD 8.5 ->
// 7.6-8.0 ms (the bench's single and 400-tensor rows, all five rules, 8-12%
// faster), Adam with grad_keep_prob=0.5 15.7 -> 12.0 ms (+39% -> +9% over
// unmasked). 0.5, 1, 1.5, 2, 4 and 16 KB ahead were tried on the masked step:
// 1-2 KB was best, 16 KB barely helped.
//
// The cursor runs ahead through a thread's whole run of chunks, into the
// tensors after the current one: a tensor of a few hundred elements is
// shorter than the distance, so a cursor that stopped at its end never
// prefetched it at all, and the hardware prefetchers barely start on a
// stream that short. Adam on 3000 tensors of 1-700 fp32 elements (1.04M),
// Zen 5, alternating builds: in cache, one thread 1.57-1.95 -> 1.19-1.32 ms a
// step, two threads 1.17-1.32 -> 1.01-1.10; the bench's many-small rows (the
// caches flushed between steps), two threads: Adam 3.31-3.33 -> 3.20 ms,
// SGD 2.85-2.88 -> 2.72-2.73, Adagrad 3.08-3.31 -> 2.81-2.83, RMSprop
// 3.13-3.19 -> 2.68-2.80; one 16.8M tensor unchanged.
constexpr int64_t kPrefetchBytes = 2048;

// Note [Prefetch instruction]
// GCC 12 dropped every __builtin_prefetch of the masked and stochastically
// rounded element loops (those that draw Philox words, Note [Draw spans]),
// inlined or not, while it kept those of the plain loops: no prefetch
// instruction was left in their object code, and a masked Adam over 3000
// tensors of 1024 elements took twice the unmasked time. An asm statement
// is never dropped.
__attribute__((always_inline)) inline void prefetch_line(const void* p) {
#if defined(__x86_64__)
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p);
#endif
}

// A thread's prefetch cursor over its run of chunks [c, last): `distance`
// elements ahead of its element loop at first, then moved on with it.
class Ahead {
 public:
  Ahead(const std::vector<TensorRef>& tensors, const Chunk* c, const Chunk* last, int64_t distance)
      : tensors_(tensors.data()), c_(c), last_(last), pos_(c->begin), end_(c->end), ptr_(tensors[c->tensor].ptr) {
    advance(distance);
  }

  // Prefetches element pos of the list-K array (of T), unless the run is over.
  template <int K, typename T>
  __attribute__((always_inline)) void prefetch() const {
    if (pos_ < end_) prefetch_line(static_cast<const T*>(ptr_[K]) + pos_);
  }

  __attribute__((always_inline)) void advance(int64_t n) {
    pos_ += n;
    while (pos_ >= end_ && c_ + 1 < last_) {
      pos_ += c_[1].begin - end_;
      ++c_;
      end_ = c_->end;
      ptr_ = tensors_[c_->tensor].ptr;
    }
  }

 private:
  const TensorRef* tensors_;
  const Chunk* c_;
  const Chunk* last_;
  int64_t pos_, end_;
  void* const* ptr_;
};

// Runs fn(tensor, begin, end, ahead) for every chunk of every tensor, with
// the cursor of Note [Prefetch ahead] `distance` elements ahead.
template <typename F>
void for_each_chunk(const std::vector<TensorRef>& tensors, int64_t distance, const F& fn) {
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
    Ahead ahead(tensors, chunks.data() + lo, chunks.data() + hi, distance);
    for (int64_t c = lo; c < hi; ++c) fn(tensors[chunks[c].tensor], chunks[c].begin, chunks[c].end, ahead);
  });
}

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

// f.template operator()<K>() for K = 0 .. N - 1, unrolled: list K's storage
// type is a compile-time choice.
template <int N, typename F>
__attribute__((always_inline)) inline void for_each_list(const F& f) {
  [&]<int... K>(std::integer_sequence<int, K...>) { (f.template operator()<K>(), ...); }(
      std::make_integer_sequence<int, N>{});
}

// Note [Draw spans]
// A masked step (its keep bits) and a stochastically rounded one (its 16-bit
// halves) draw their Philox words in the element loop itself, a span of
// elements at a time: one Keeper batch (kBatch 64-element groups; with SR
// two, as a batch of words rounds 128·kBatch elements), then the span's
// vectors read their bits from the arrays just drawn. The loop used to ask a
// per-ISA cache for each vector's bits and refill it out of line, and that
// call cost more than the draw: every vector register is the caller's to
// save, so the rule kept its constants on the stack and reloaded them (and
// its flags) each vector. In cache (256K fp32, one thread, Zen 5, alternating
// builds), Adam with grad_keep_prob=0.5 took 0.152-0.159 ms against 0.065
// unmasked, and 0.103-0.109 ms drawn by spans, which is the unmasked step
// plus the draw alone (dropout_keep_bits); AVX2 0.262-0.271 -> 0.190-0.207
// ms. Out of cache (16.8M, 2 threads) 4.86-5.49 -> 4.40-4.74 ms against
// 3.81-4.63 unmasked. Adam on 256K bf16 params with stochastic rounding:
// 0.149-0.156 -> 0.094-0.104 ms against 0.080-0.086 rounded to nearest
// (AVX2 0.224-0.251 -> 0.181-0.184, against 0.145-0.154). Drawing the next
// span before the rule runs on this one (pipelined) measured the same: the
// draw and the rule compete for the same vector pipes rather than wait on
// each other.
//
// Runs body(x, keep) over elements [begin, end): x[k] holds W elements (a
// partial vector last) of the k-th array as op-math; arrays whose bit is set
// in `stores` are written back. Lists 0 and 1 (θ, g) hold scalar_t, the
// others state_t (Note [State dtype]); with SR, θ is stored with stochastic
// rounding. When a list holds a half type, the main loop moves two vectors
// per array and step (Note [Half pairs]) and runs the body on each. `mask`
// and `round` are the draws of MASK and SR, element i drawing as element
// base + i of its parameter (Note [Shard offsets]); begin is a multiple of
// kChunk. Where base + begin does not start a word of keep bits (a batch of
// halves), a span's bits lie across one batch more: it shifts them down
// (reads its halves from further in), and its last batch, drawn once, is the
// next span's first.
template <typename scalar_t, typename state_t, bool SR, int N, bool MASK, typename Body>
inline void elementwise(void* const* ptr, int64_t begin, int64_t end, int64_t base, unsigned stores,
                        const Draw& mask, const Draw& round, Ahead& cursor, const Body& rule_body) {
  // Local copies whose addresses never escape: the rule's constants and the
  // cursor can live in registers (stores through the data pointers, or of the
  // keep bits, could alias the caller's copies).
  const Body body = rule_body;
  Ahead ahead = cursor;
  using V = typename VecIo<scalar_t>::V;
  using S = typename VecIo<scalar_t>::S;
  static_assert(std::is_same_v<V, typename VecIo<state_t>::V>, "one op-math type for every list");
  constexpr int W = VecIo<scalar_t>::W;
  constexpr int U = sizeof(scalar_t) < sizeof(S) || sizeof(state_t) < sizeof(S) ? 2 : 1;
  // Note [Draw spans]: elements per span, and the 64-bit words of keep bits and the halves drawn for one.
  constexpr int64_t kSpan = SR ? 128 * kBatch : MASK ? 64 * kBatch : kChunk;
  constexpr int kBits = MASK ? kSpan / 64 : 1;
  constexpr int kHalves = SR ? kSpan : 1;
  static_assert(kChunk % kSpan == 0 && 64 % (U * W) == 0);
  const std::optional<Keeper> keeper = MASK ? std::optional<Keeper>(mask) : std::nullopt;
  const std::optional<Keeper> rounder = SR ? std::optional<Keeper>(round) : std::nullopt;
  const int bit_lag = static_cast<int>(base & 63), half_lag = static_cast<int>(base & 127);
  uint64_t bits[MASK ? kBits + kBatch : 1];
  uint16_t halves[2 * kHalves];
  const uint16_t* span_halves = halves + (SR ? half_lag : 0);
  int64_t span = begin;
  // M vectors from element i, with n lanes in the last: whole vectors (FULL, n == W) or one partial
  // vector (M == 1). Always inlined, so the main loop keeps the rule's constants in registers.
  auto block = [&]<int M, bool FULL>(int64_t i, int n) __attribute__((always_inline)) {
    static_assert(FULL || M == 1);
    const int64_t j = i - span;  // a multiple of W: its vectors' bits lie in one word
    V x[M][N];
    for_each_list<N>([&]<int K>() __attribute__((always_inline)) {
      using T = std::conditional_t<(K < 2), scalar_t, state_t>;
      const T* p = static_cast<const T*>(ptr[K]) + i;
      if constexpr (M == 2) VecIo<T>::load2(p, x[0][K], x[1][K]);
      else x[0][K] = FULL ? VecIo<T>::load(p) : VecIo<T>::load(p, n);
    });
    for (int m = 0; m < M; ++m) {
      V keep(S(1));
      if constexpr (MASK) {
        const uint64_t b = bits[j >> 6] >> ((j & 63) + m * W);
        keep = keep_select<S>(FULL ? b : b & ((uint64_t(1) << n) - 1), S(1));
      }
      body(x[m], keep);
    }
    for_each_list<N>([&]<int K>() __attribute__((always_inline)) {
      using T = std::conditional_t<(K < 2), scalar_t, state_t>;
      if (!(stores >> K & 1u)) return;
      T* p = static_cast<T*>(ptr[K]) + i;
      if constexpr (K == 0 && SR) {
        static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "a word's low half is its first two bytes");
        for (int m = 0; m < M; ++m) store_stochastic(p + m * W, x[m][K], span_halves + j + m * W, FULL ? W : n);
      } else if constexpr (M == 2) {
        VecIo<T>::store2(p, x[0][K], x[1][K]);
      } else if constexpr (FULL) {
        VecIo<T>::store(p, x[0][K]);
      } else {
        VecIo<T>::store(p, x[0][K], n);
      }
    });
  };
  for (; span < end; span += kSpan) {
    const int64_t stop = std::min(end, span + kSpan);
    const auto q = static_cast<uint64_t>(base + span);
    // Off a word (Note [Shard offsets]), the previous span's extra batch is this span's first.
    const bool carried = span != begin;
    if constexpr (MASK) {
      if (bit_lag && carried) std::memcpy(bits, bits + kBits, sizeof(uint64_t) * kBatch);
      for (int k = bit_lag && carried ? kBatch : 0; k < kBits + (bit_lag ? kBatch : 0); k += kBatch)
        keeper->batch((q >> 6) + k, bits + k);
      if (bit_lag)
        for (int k = 0; k < kBits; ++k) bits[k] = bits[k] >> bit_lag | bits[k + 1] << (64 - bit_lag);
    }
    if constexpr (SR) {
      if (half_lag && carried) std::memcpy(halves, halves + kHalves, sizeof(uint16_t) * kHalves);
      else rounder->words(q >> 7, halves);
      if (half_lag) rounder->words((q >> 7) + kBatch, halves + kHalves);
    }
    int64_t i = span;
    for (; i + U * W <= stop; i += U * W) {
      for_each_list<N>([&]<int K>() __attribute__((always_inline)) {  // Note [Prefetch ahead]
        ahead.template prefetch<K, std::conditional_t<(K < 2), scalar_t, state_t>>();
      });
      ahead.advance(U * W);
      block.template operator()<U, true>(i, W);
    }
    ahead.advance(stop - i);
    if (U == 2 && i + W <= stop) {
      block.template operator()<1, true>(i, W);
      i += W;
    }
    if (i < stop) block.template operator()<1, false>(i, static_cast<int>(stop - i));  // Note [Partial vector tail]
  }
  cursor = ahead;
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
    constexpr int64_t distance = kPrefetchBytes / static_cast<int64_t>(std::max(sizeof(scalar_t), sizeof(state_t)));
    for_each_chunk(call.tensors, distance, [&](const TensorRef& t, int64_t begin, int64_t end, Ahead& ahead) {
      const Draw mask{call.common.seed, philox::grad_mask_offset(t.step, t.index), call.common.threshold};
      const Draw round{call.common.seed, philox::rounding_offset(t.step, t.index)};
      if (t.step == step)
        elementwise<scalar_t, state_t, SR, N, MASK>(t.ptr, begin, end, t.base, stores, mask, round, ahead, shared);
      else
        elementwise<scalar_t, state_t, SR, N, MASK>(t.ptr, begin, end, t.base, stores, mask, round, ahead,
                                                    rule(t.step, S{}));
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedopt
