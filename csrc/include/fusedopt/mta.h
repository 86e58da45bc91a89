#pragma once
// Multi-tensor apply (DESIGN.md §7): the launch plan of the CUDA optimizer
// kernels and their per-chunk bodies, written once for host and device. The
// CUDA ops (csrc/cuda/update.cuh) launch the bodies; the grid emulation
// (csrc/cpu/gridemu.cpp) runs the very same bodies over the very same plan on
// the host, so chunking, tails, alignment and index arithmetic are tested
// without a GPU. No CUDA header is included here: g++ compiles this file.
//
// Note [Launch plan]
// A launch covers up to Table<N>::K tensors ("slots"). Each slot is a run of
// consecutive chunks of one tensor (kChunk elements each, the last one
// shorter); one block processes one chunk. Slot s owns blocks
// [begin[s], begin[s+1]) of its launch, so a block finds its slot by a binary
// search over `begin` (uniform across the block), and a launch may hold any
// number of blocks: one 10^9-element tensor is one launch of 15259 blocks, with
// no wave tail every 320 blocks. A new launch starts when the tensor table is
// full or the launch's block budget is spent; in the second case the current
// tensor continues in the next launch from chunk `first[s] / chunk`. The table
// travels by value in the kernel arguments (Note [Kernel arguments]).
//
// Note [Kernel arguments]
// CUDA 12.1+ passes up to 32764 bytes of kernel arguments on sm_70+ (4096
// before). A larger table means fewer launches for many small tensors, which is
// where launch overhead dominates (10,000 tensors: 25 launches of AMSGrad Adam,
// 5 lists, instead of 200 with a 4 KB table; 23 before slots carried a shard
// offset). kArgBytes leaves room for the options beside the table;
// csrc/cuda/update.cuh checks sizeof(Args) and requires CUDA >= 12.1: of the
// toolkit when it builds, of the driver (check_driver) when a step launches.
//
// Note [Steps on the device]
// Every chunk reads its tensor's step, t = step + 1, and computes the rule's
// constants from it with the same math::*_consts the CPU uses (fo::powi: the
// same bits on host and device), and the gradient-mask offset from (t, index).
// No host synchronisation: grad_scale and found_inf are read the same way.
// After the update launches, one small kernel advances every step by one unless
// found_inf is set (a kernel cannot advance a step that later blocks of the
// same tensor still have to read). The CPU ops, which read the steps on the
// host, refuse one that is not a whole number >= 0; the device cannot raise
// without a host sync, and truncates it. What guards a checkpoint's steps on
// both is load_state_dict's check (Note [Checked state_dict], fusedopt/optim/_base.py).
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "fusedopt/dispatch.h"
#include "fusedopt/fo.h"
#include "fusedopt/launch.h"
#include "fusedopt/math/adagrad.h"
#include "fusedopt/math/adam.h"
#include "fusedopt/math/common.h"
#include "fusedopt/math/rmsprop.h"
#include "fusedopt/math/round.h"
#include "fusedopt/math/sgd.h"
#include "fusedopt/philox.h"

namespace fusedopt {
namespace mta {

constexpr int kThreads = 512;                     // threads per block of the update kernels
constexpr int64_t kChunk = 65536;                 // elements per block
constexpr int64_t kMaxBlocks = int64_t(1) << 30;  // per launch (grid.x allows 2^31 - 1)
constexpr int kStepThreads = 256;                 // threads per block of the step kernel
constexpr size_t kArgBytes = 32 * 1024 - 512;     // Note [Kernel arguments]

// Elements a thread handles per step: 16 bytes of fp32 (4), fp16/bf16 (8);
// 4 fp64 are two 16-byte accesses. Always a multiple of 4, so a group starts
// on a Philox block (4 elements per block) and needs G/4 draws.
template <typename T>
constexpr int kGroup = sizeof(T) >= 4 ? 4 : 8;

// Note [Register budget]
// Two blocks of kThreads fit an SM when a thread holds at most 64 registers
// (65536 a SM), one when it holds at most 128. What does not fit, ptxas
// spills to local memory: stores and loads on every group of a streaming
// kernel. Under 64 registers for every body, the sm_90 build (nvcc 13.0)
// spilled 12-200 bytes a thread in 271 of the 528 update kernels (Adam 70 of
// 96, RMSprop 119 of 192, SGD 63 of 192, Adagrad 19 of 48): fp64 ones, and
// fp16/bf16 ones whose 8-element group holds many arrays (AMSGrad, centered
// RMSprop with momentum) or draws bits (a mask, stochastic rounding); no
// fp32 kernel spilled. Each body takes two blocks where its live op-math
// values fit (G elements × N arrays, plus 16 registers for a mask's Philox
// draw and 8 for the rounding bits: at most 36, a bound the ptxas reports
// fit), else one block of up to 128 registers, with which none of them
// spills; fp64 always one. One block still keeps 512 threads' groups in
// flight (a bf16 Adam group with fp32 state loads 96 bytes).
// scripts/cuda_build_check.sh fails when any kernel spills (ptxas
// --warn-on-spills), so a body whose estimate goes wrong is caught. What
// each choice costs in time has not been measured on a GPU.
template <typename scalar_t, int N, bool MASK, bool SR>
constexpr int blocks_per_sm() {
  if constexpr (sizeof(scalar_t) == 8) return 1;
  return kGroup<scalar_t> * N + (MASK ? 16 : 0) + (SR ? 8 : 0) <= 36 ? 2 : 1;
}

// Slot info bits: the parameter's index (< 2^24, checked by gather), whether
// its step is float64, whether every pointer of the slot is 16-byte aligned.
constexpr uint32_t kIndexMask = (1u << 24) - 1;
constexpr uint32_t kDoubleStep = 1u << 24;
constexpr uint32_t kAligned = 1u << 25;

template <int N>
struct Table {
  static constexpr int K = static_cast<int>((kArgBytes - 24) / (8 * N + 40));
  void* ptr[K][N];   // the N lists' data of each slot's tensor
  void* step[K];     // its step (float32 or float64, on the device)
  int64_t first[K];  // first element of the slot (a multiple of chunk)
  int64_t numel[K];  // elements of the whole tensor
  int64_t base[K];   // element 0's index in its whole parameter (Note [Shard offsets])
  int32_t begin[K];  // first block of the slot
  uint32_t info[K];
  int64_t chunk;
  int32_t count;  // slots in use
  int32_t blocks;  // blocks of this launch

  // The slot that owns `block`: the last s with begin[s] <= block.
  FUSEDOPT_HD int slot(int64_t block) const {
    int lo = 0, hi = count - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (begin[mid] <= block) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }
};

// What may go into one launch. The CUDA ops always use cuda_limits<N>(); the
// grid emulation may shrink them so that small tests cross every boundary.
struct Limits {
  int tensors;     // slots per launch, <= Table<N>::K
  int64_t blocks;  // blocks per launch
  int64_t chunk;   // elements per block, a multiple of 8
  int threads;     // threads per block
};

template <int N>
constexpr Limits cuda_limits() {
  return {Table<N>::K, kMaxBlocks, kChunk, kThreads};
}

inline void check_limits(const Limits& lim, int max_tensors) {
  TORCH_CHECK(lim.tensors >= 1 && lim.tensors <= max_tensors, "launch plan: tensors per launch must lie in [1, ",
              max_tensors, "], got ", lim.tensors);
  TORCH_CHECK(lim.blocks >= 1 && lim.blocks <= kMaxBlocks, "launch plan: blocks per launch must lie in [1, ",
              kMaxBlocks, "], got ", lim.blocks);
  TORCH_CHECK(lim.chunk >= 8 && lim.chunk % 8 == 0, "launch plan: chunk must be a positive multiple of 8, got ",
              lim.chunk);
  TORCH_CHECK(lim.threads >= 1 && lim.threads <= 1024, "launch plan: threads must lie in [1, 1024], got ",
              lim.threads);
}

// Fills `tab` launch by launch and calls launch() after each (Note [Launch
// plan]). Tensors without elements get no slot (their step still advances).
template <int N, typename Launch>
void plan(const std::vector<TensorRef>& tensors, const Limits& lim, Table<N>& tab,
          const Launch& launch) {
  check_limits(lim, Table<N>::K);
  tab.chunk = lim.chunk;
  tab.count = 0;
  tab.blocks = 0;
  auto flush = [&] {
    if (tab.count == 0) return;
    launch();
    tab.count = 0;
    tab.blocks = 0;
  };
  for (size_t j = 0; j < tensors.size(); ++j) {
    const TensorRef& t = tensors[j];
    if (t.numel == 0) continue;
    uint32_t info = static_cast<uint32_t>(t.index);
    if (t.step_double) info |= kDoubleStep;
    bool aligned = true;
    for (int k = 0; k < N; ++k) aligned = aligned && reinterpret_cast<uintptr_t>(t.ptr[k]) % 16 == 0;
    if (aligned) info |= kAligned;
    const int64_t chunks = (t.numel + lim.chunk - 1) / lim.chunk;
    for (int64_t c = 0; c < chunks;) {
      if (tab.count == lim.tensors || tab.blocks == lim.blocks) flush();
      const int64_t take = std::min(chunks - c, lim.blocks - tab.blocks);
      const int s = tab.count++;
      for (int k = 0; k < N; ++k) tab.ptr[s][k] = t.ptr[k];
      tab.step[s] = t.step_ptr;
      tab.first[s] = c * lim.chunk;
      tab.numel[s] = t.numel;
      tab.base[s] = t.base;
      tab.begin[s] = tab.blocks;
      tab.info[s] = info;
      tab.blocks += static_cast<int32_t>(take);
      c += take;
    }
  }
  flush();
}

// The arguments of one update launch.
template <int N, typename Hyper>
struct Args {
  Table<N> tab;
  math::Common common;
  Hyper hyper;
  const float* grad_scale;  // null: no AMP unscaling
  const float* found_inf;   // null: never skipped
  const double* lr;         // null: common.lr (Note [Tensor lr])
  const double* beta1;      // Adam, null: hyper.beta1 (Note [Tensor betas])
  const double* beta2;      // Adam, null: hyper.beta2
};

// Note [Vector accesses]
// A group of G elements of one list, 16-byte aligned. On the device it moves
// as one (fp32, fp16, bf16) or two (fp64) 16-byte accesses; on the host the
// same code path is a memcpy. Only used when every pointer of the slot is
// 16-byte aligned and the group lies inside the chunk.
template <typename T, int G>
struct alignas(16) Group {
  T v[G];
};

template <typename T, int G>
FUSEDOPT_HD inline Group<T, G> load_group(const T* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const Group<T, G>*>(p);
#else
  Group<T, G> g;
  std::memcpy(&g, p, sizeof g);
  return g;
#endif
}

template <typename T, int G>
FUSEDOPT_HD inline void store_group(T* p, const Group<T, G>& g) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<Group<T, G>*>(p) = g;
#else
  std::memcpy(p, &g, sizeof g);
#endif
}

// The rounding halves of Philox blocks g .. g + B - 1 of a rounding stream
// (Note [Rounding stream]): out[8b + h] for element 8(g + b) + h.
template <int B>
FUSEDOPT_HD inline void rounding_blocks(uint64_t seed, uint64_t offset, uint64_t g, uint16_t* out) {
  FUSEDOPT_UNROLL
  for (int b = 0; b < B; ++b) {
    const philox::Words w = philox::block(seed, offset, g + b);
    FUSEDOPT_UNROLL
    for (int k = 0; k < 4; ++k) {
      out[8 * b + 2 * k] = static_cast<uint16_t>(w.w[k]);
      out[8 * b + 2 * k + 1] = static_cast<uint16_t>(w.w[k] >> 16);
    }
  }
}

// The rounding bits of elements i .. i + G - 1 (i counted in the whole
// parameter, Note [Shard offsets]): out[e] for element i + e. A Philox block
// covers 8 elements; a group that does not start one reads G + 8 halves.
template <int G>
FUSEDOPT_HD inline void rounding_bits(uint64_t seed, uint64_t offset, uint64_t i, uint16_t (&out)[G]) {
  static_assert(G % 8 == 0, "a rounding group is whole Philox blocks");
  const int lag = static_cast<int>(i & 7);
  if (lag == 0) {
    rounding_blocks<G / 8>(seed, offset, i >> 3, out);
    return;
  }
  uint16_t halves[G + 8];
  rounding_blocks<G / 8 + 1>(seed, offset, i >> 3, halves);
  FUSEDOPT_UNROLL
  for (int e = 0; e < G; ++e) out[e] = halves[lag + e];
}

// Note [Chunk body]
// Thread `tid` of `threads` in block `block` of a launch: finds its slot and
// chunk, reads the step, grad_scale, found_inf and a tensor lr, builds the
// element body make_body(t, pre, common) and runs it over elements
// begin + (tid + k·threads)·G of the chunk, G at a time, one element at a
// time: x[0] = θ, x[1] = g, x[2..] = state, as op-math values, exactly as the
// CPU kernels' bodies see them. The results never depend on the path (16-byte
// or scalar), the block size or the plan: every element goes through the same
// scalar operations. The gradient is stored only when AMP unscaled it
// (x[1] = g / grad_scale after the body).
template <typename scalar_t, typename state_t, bool SR, int N, bool MASK, typename A, typename MakeBody>
FUSEDOPT_HD inline void optimizer_chunk(const A& a, int64_t block, int64_t tid, int64_t threads,
                                        const MakeBody& make_body) {
  using S = typename OpMath<scalar_t>::type;
  constexpr int G = kGroup<scalar_t>;
  constexpr int M = N - 2;  // state lists, in state_t (Note [State dtype])
  if (a.found_inf != nullptr && *a.found_inf != 0) return;
  const auto& tab = a.tab;
  const int s = tab.slot(block);
  const uint32_t info = tab.info[s];
  const int64_t begin = tab.first[s] + (block - tab.begin[s]) * tab.chunk;
  const int64_t end = begin + tab.chunk < tab.numel[s] ? begin + tab.chunk : tab.numel[s];
  const int64_t t = static_cast<int64_t>(scalar_value(tab.step[s], info & kDoubleStep)) + 1;
  const bool scaled = a.grad_scale != nullptr;
  math::Common common = a.common;
  if (a.lr != nullptr) common.lr = *a.lr;
  const math::Pre<S> pre = math::make_pre<S>(common, scaled ? *a.grad_scale : 1.0f, scaled);
  const auto body = make_body(t, pre, common);
  const int64_t index = static_cast<int64_t>(info & kIndexMask);
  const int64_t base = tab.base[s];
  const uint64_t offset = philox::grad_mask_offset(t, index);
  const bool vec = (info & kAligned) != 0;
  scalar_t* ptr[2];
  state_t* sptr[M > 0 ? M : 1];
  FUSEDOPT_UNROLL
  for (int k = 0; k < 2; ++k) ptr[k] = static_cast<scalar_t*>(tab.ptr[s][k]);
  FUSEDOPT_UNROLL
  for (int k = 0; k < M; ++k) sptr[k] = static_cast<state_t*>(tab.ptr[s][2 + k]);
  for (int64_t i = begin + tid * G; i < end; i += threads * G) {
    const bool full = vec && i + G <= end;
    const int live = full ? G : static_cast<int>(end - i < G ? end - i : G);
    // The group stays in storage type until each element is computed: G·N
    // op-math values at once would not fit in registers for fp16/bf16/fp64.
    Group<scalar_t, G> v[2];
    Group<state_t, G> w[M > 0 ? M : 1];
    FUSEDOPT_UNROLL
    for (int k = 0; k < 2; ++k) {
      if (full) {
        v[k] = load_group<scalar_t, G>(ptr[k] + i);
      } else {
        FUSEDOPT_UNROLL
        for (int e = 0; e < G; ++e) v[k].v[e] = e < live ? ptr[k][i + e] : scalar_t(0);
      }
    }
    FUSEDOPT_UNROLL
    for (int k = 0; k < M; ++k) {
      if (full) {
        w[k] = load_group<state_t, G>(sptr[k] + i);
      } else {
        FUSEDOPT_UNROLL
        for (int e = 0; e < G; ++e) w[k].v[e] = e < live ? sptr[k][i + e] : state_t(0);
      }
    }
    const auto at = static_cast<uint64_t>(base + i);  // in the whole parameter
    const uint32_t bits = MASK ? philox::keep_run<G>(a.common.seed, offset, a.common.threshold, at) : 0;
    uint16_t u[SR ? G : 8];
    if constexpr (SR) rounding_bits<G>(a.common.seed, philox::rounding_offset(t, index), at, u);
    FUSEDOPT_UNROLL
    for (int e = 0; e < G; ++e) {
      S x[N];
      x[0] = static_cast<S>(v[0].v[e]);
      x[1] = static_cast<S>(v[1].v[e]);
      FUSEDOPT_UNROLL
      for (int k = 0; k < M; ++k) x[2 + k] = static_cast<S>(w[k].v[e]);
      body(x, MASK ? S((bits >> e) & 1u) : S(1));
      if constexpr (SR)
        v[0].v[e] = scalar_t(math::bf16_bits_stochastic(x[0], u[e]), scalar_t::from_bits());
      else
        v[0].v[e] = static_cast<scalar_t>(x[0]);
      v[1].v[e] = static_cast<scalar_t>(x[1]);
      FUSEDOPT_UNROLL
      for (int k = 0; k < M; ++k) w[k].v[e] = static_cast<state_t>(x[2 + k]);
    }
    FUSEDOPT_UNROLL
    for (int k = 0; k < 2; ++k) {
      if (k == 1 && !scaled) continue;
      if (full) {
        store_group<scalar_t, G>(ptr[k] + i, v[k]);
      } else {
        FUSEDOPT_UNROLL
        for (int e = 0; e < G; ++e)
          if (e < live) ptr[k][i + e] = v[k].v[e];
      }
    }
    FUSEDOPT_UNROLL
    for (int k = 0; k < M; ++k) {
      if (full) {
        store_group<state_t, G>(sptr[k] + i, w[k]);
      } else {
        FUSEDOPT_UNROLL
        for (int e = 0; e < G; ++e)
          if (e < live) sptr[k][i + e] = w[k].v[e];
      }
    }
  }
}

// The per-chunk bodies, one per optimizer and compile-time variant: the
// element step is math::<opt>_step, exactly what the CPU kernels call.

template <typename scalar_t, typename state_t, bool SR, bool MASK, math::Decay D, bool MOMENTUM, bool NESTEROV,
          bool EMA>
struct SgdChunk {
  static constexpr int N = MOMENTUM ? 3 : 2;
  using Args = mta::Args<N, math::SgdHyper>;
  static constexpr int kBlocksPerSM = blocks_per_sm<scalar_t, N, MASK, SR>();  // Note [Register budget]
  using S = typename OpMath<scalar_t>::type;
  FUSEDOPT_HD static void run(const Args& a, int64_t block, int64_t tid, int64_t threads) {
    optimizer_chunk<scalar_t, state_t, SR, N, MASK>(a, block, tid, threads, [&](int64_t t, const auto& pre, const auto& common) {
      const auto c = math::sgd_consts<S>(common, a.hyper, t);
      return [=](S* x, S keep) { math::sgd_step<D, MASK, MOMENTUM, NESTEROV, EMA>(x, keep, pre, c); };
    });
  }
};

template <typename scalar_t, typename state_t, bool SR, bool MASK, math::Decay D>
struct AdagradChunk {
  static constexpr int N = 3;
  using Args = mta::Args<N, math::AdagradHyper>;
  static constexpr int kBlocksPerSM = blocks_per_sm<scalar_t, N, MASK, SR>();  // Note [Register budget]
  using S = typename OpMath<scalar_t>::type;
  FUSEDOPT_HD static void run(const Args& a, int64_t block, int64_t tid, int64_t threads) {
    optimizer_chunk<scalar_t, state_t, SR, N, MASK>(a, block, tid, threads, [&](int64_t t, const auto& pre, const auto& common) {
      const auto c = math::adagrad_consts<S>(common, a.hyper, t);
      return [=](S* x, S keep) { math::adagrad_step<D, MASK>(x, keep, pre, c); };
    });
  }
};

// Lists: θ, g, v, then a (centered), then b (momentum).
template <typename scalar_t, typename state_t, bool SR, bool MASK, math::Decay D, bool CENTERED, bool MOMENTUM>
struct RmspropChunk {
  static constexpr int N = 3 + CENTERED + MOMENTUM;
  using Args = mta::Args<N, math::RmspropHyper>;
  static constexpr int kBlocksPerSM = blocks_per_sm<scalar_t, N, MASK, SR>();  // Note [Register budget]
  using S = typename OpMath<scalar_t>::type;
  FUSEDOPT_HD static void run(const Args& a, int64_t block, int64_t tid, int64_t threads) {
    optimizer_chunk<scalar_t, state_t, SR, N, MASK>(a, block, tid, threads, [&](int64_t t, const auto& pre, const auto& common) {
      const auto c = math::rmsprop_consts<S>(common, a.hyper, t);
      return [=](S* x, S keep) { math::rmsprop_step<D, MASK, CENTERED, MOMENTUM>(x, keep, pre, c); };
    });
  }
};

template <typename scalar_t, typename state_t, bool SR, bool MASK, math::Decay D, bool AMSGRAD>
struct AdamChunk {
  static constexpr int N = AMSGRAD ? 5 : 4;
  using Args = mta::Args<N, math::AdamHyper>;
  static constexpr int kBlocksPerSM = blocks_per_sm<scalar_t, N, MASK, SR>();  // Note [Register budget]
  using S = typename OpMath<scalar_t>::type;
  FUSEDOPT_HD static void run(const Args& a, int64_t block, int64_t tid, int64_t threads) {
    optimizer_chunk<scalar_t, state_t, SR, N, MASK>(a, block, tid, threads, [&](int64_t t, const auto& pre, const auto& common) {
      math::AdamHyper h = a.hyper;
      if (a.beta1 != nullptr) h.beta1 = *a.beta1;
      if (a.beta2 != nullptr) h.beta2 = *a.beta2;
      const auto c = math::adam_consts<S>(common, h, t);
      return [=](S* x, S keep) { math::adam_step<D, MASK, AMSGRAD>(x, keep, pre, c); };
    });
  }
};

// Host: picks the chunk body of a validated call (the CPU kernels' switches)
// and hands a value of its type to f.
template <typename F>
void with_body(const OptimizerCall<math::SgdHyper>& call, const F& f) {
  const bool momentum = call.hyper.momentum != 0;
  FUSEDOPT_DISPATCH_STORAGE(call, "sgd_", [&] {
    FUSEDOPT_BOOL_SWITCH(call.common.masked(), MASK, [&] {
      FUSEDOPT_DECAY_SWITCH(call.common.decay(), DECAY, [&] {
        FUSEDOPT_BOOL_SWITCH(momentum, MOMENTUM, [&] {
          FUSEDOPT_BOOL_SWITCH(MOMENTUM && call.hyper.nesterov, NESTEROV, [&] {
            FUSEDOPT_BOOL_SWITCH(MOMENTUM && call.hyper.ema, EMA, [&] {
              // Without momentum NESTEROV and EMA are false; they exclude each other.
              if constexpr ((MOMENTUM || !(NESTEROV || EMA)) && !(NESTEROV && EMA))
                f(SgdChunk<scalar_t, state_t, SR, MASK, DECAY, MOMENTUM, NESTEROV, EMA>{});
            });
          });
        });
      });
    });
  });
}

template <typename F>
void with_body(const OptimizerCall<math::AdagradHyper>& call, const F& f) {
  FUSEDOPT_DISPATCH_STORAGE(call, "adagrad_", [&] {
    FUSEDOPT_BOOL_SWITCH(call.common.masked(), MASK, [&] {
      FUSEDOPT_DECAY_SWITCH(call.common.decay(), DECAY, [&] { f(AdagradChunk<scalar_t, state_t, SR, MASK, DECAY>{}); });
    });
  });
}

template <typename F>
void with_body(const OptimizerCall<math::RmspropHyper>& call, const F& f) {
  FUSEDOPT_DISPATCH_STORAGE(call, "rmsprop_", [&] {
    FUSEDOPT_BOOL_SWITCH(call.common.masked(), MASK, [&] {
      FUSEDOPT_DECAY_SWITCH(call.common.decay(), DECAY, [&] {
        FUSEDOPT_BOOL_SWITCH(call.hyper.centered, CENTERED, [&] {
          FUSEDOPT_BOOL_SWITCH(call.hyper.momentum > 0, MOMENTUM, [&] {
            f(RmspropChunk<scalar_t, state_t, SR, MASK, DECAY, CENTERED, MOMENTUM>{});
          });
        });
      });
    });
  });
}

template <typename F>
void with_body(const OptimizerCall<math::AdamHyper>& call, const F& f) {
  FUSEDOPT_DISPATCH_STORAGE(call, "adam_", [&] {
    FUSEDOPT_BOOL_SWITCH(call.common.masked(), MASK, [&] {
      FUSEDOPT_DECAY_SWITCH(call.common.decay(), DECAY, [&] {
        FUSEDOPT_BOOL_SWITCH(call.hyper.amsgrad, AMSGRAD, [&] { f(AdamChunk<scalar_t, state_t, SR, MASK, DECAY, AMSGRAD>{}); });
      });
    });
  });
}

// Host: the arguments of every update launch of `call` with chunk body Body,
// handed to launch(args) one launch at a time.
template <typename Body, typename Hyper, typename Launch>
void for_each_launch(const OptimizerCall<Hyper>& call, const float* grad_scale,
                     const float* found_inf, const Limits& lim, const Launch& launch) {
  TORCH_INTERNAL_ASSERT(call.lists == Body::N, "launch plan: ", call.lists, " lists for a body of ", Body::N);
  typename Body::Args args;
  args.common = call.common;
  args.hyper = call.hyper;
  args.grad_scale = grad_scale;
  args.found_inf = found_inf;
  args.lr = call.lr;
  args.beta1 = call.beta1;
  args.beta2 = call.beta2;
  plan(call.tensors, lim, args.tab, [&] { launch(static_cast<const typename Body::Args&>(args)); });
}

// The step kernel's arguments: every step of a call advances by one.
struct StepTable {
  static constexpr int K = static_cast<int>((kArgBytes - 8) / 9);
  void* ptr[K];
  uint8_t is_double[K];
  int32_t count;
};

struct StepArgs {
  StepTable tab;
  const float* found_inf;
};

// Thread `tid` of block `block`: advances step block·threads + tid.
FUSEDOPT_HD inline void step_chunk(const StepArgs& a, int64_t block, int64_t tid, int64_t threads) {
  if (a.found_inf != nullptr && *a.found_inf != 0) return;
  const int64_t i = block * threads + tid;
  if (i >= a.tab.count) return;
  if (a.tab.is_double[i]) *static_cast<double*>(a.tab.ptr[i]) += 1;
  else *static_cast<float*>(a.tab.ptr[i]) += 1;
}

// Host: the step launches of a call, handed to launch(args, blocks); at most
// `per_launch` steps each (StepTable::K on the device).
template <typename Launch>
void for_each_step_launch(at::TensorList steps, const float* found_inf, int per_launch, int threads,
                          const Launch& launch) {
  TORCH_CHECK(per_launch >= 1 && per_launch <= StepTable::K, "launch plan: steps per launch must lie in [1, ",
              StepTable::K, "], got ", per_launch);
  StepArgs args;
  args.found_inf = found_inf;
  const int64_t n = static_cast<int64_t>(steps.size());
  for (int64_t j0 = 0; j0 < n; j0 += per_launch) {
    const int count = static_cast<int>(std::min<int64_t>(per_launch, n - j0));
    for (int i = 0; i < count; ++i) {
      args.tab.ptr[i] = steps[j0 + i].data_ptr();
      args.tab.is_double[i] = steps[j0 + i].scalar_type() == at::kDouble;
    }
    args.tab.count = count;
    launch(static_cast<const StepArgs&>(args), (count + threads - 1) / threads);
  }
}

}  // namespace mta
}  // namespace fusedopt
