#pragma once
// The CUDA dropout kernels' per-thread bodies, host+device: csrc/cuda/dropout.cu
// wraps each in a __global__ shell, and the CPU ops `_gridemu_*`
// (csrc/cpu/dropout_ops.cpp) run them over the same launch plan on the host,
// so the chunking, tails, alignment and index arithmetic of the CUDA code are
// tested bit for bit against the CPU kernels without a GPU (DESIGN.md §7).
#include <algorithm>
#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "fusedopt/fo.h"
#include "fusedopt/math/dropout.h"
#include "fusedopt/philox.h"

namespace fusedopt {
namespace dropout {

FUSEDOPT_HD inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Note [Dropout launch plan]
// Every kernel cuts its work into units and runs a grid-stride loop: thread t
// of block b (of `grid` blocks of kThreads) handles units b·kThreads + t,
// then every grid·kThreads further. The grid is capped (on CUDA at 8 blocks
// per SM, in grid emulation at whatever the test asks), so one launch covers
// any size with 64-bit indices.
constexpr int64_t kThreads = 256;

inline int64_t grid_size(int64_t units, int64_t max_grid) {
  return std::max<int64_t>(1, std::min(ceil_div(units, kThreads), max_grid));
}

// Elements of a unit: one Philox block (4 elements) or one 16-byte access,
// whichever is larger: fp32 4 (one access), fp16/bf16 8 (one access, two
// blocks), fp64 4 (two accesses). Units start at multiples of U, so each
// covers whole Philox blocks and, from a 16-byte aligned base, whole accesses.
template <typename T>
FUSEDOPT_HD constexpr int unit_elems() {
  return sizeof(T) >= 4 ? 4 : 16 / static_cast<int>(sizeof(T));
}

template <typename T>
struct alignas(16) Pack {
  T v[16 / sizeof(T)];
};

// 16-byte loads and stores of a unit; p must be 16-byte aligned.
template <typename T>
FUSEDOPT_HD inline void load_unit(const T* p, T (&v)[unit_elems<T>()]) {
  constexpr int P = 16 / sizeof(T);
  for (int k = 0; k < unit_elems<T>(); k += P) {
#if defined(__CUDA_ARCH__)
    const Pack<T> pk = *reinterpret_cast<const Pack<T>*>(p + k);
    for (int j = 0; j < P; ++j) v[k + j] = pk.v[j];
#else
    std::memcpy(v + k, p + k, 16);
#endif
  }
}

template <typename T>
FUSEDOPT_HD inline void store_unit(T* p, const T (&v)[unit_elems<T>()]) {
  constexpr int P = 16 / sizeof(T);
  for (int k = 0; k < unit_elems<T>(); k += P) {
#if defined(__CUDA_ARCH__)
    Pack<T> pk;
    for (int j = 0; j < P; ++j) pk.v[j] = v[k + j];
    *reinterpret_cast<Pack<T>*>(p + k) = pk;
#else
    std::memcpy(p + k, v + k, 16);
#endif
  }
}

// Note [dbias row blocks]
// bias_dropout_add's backward sums dx over rows for dbias. The sum has one
// fixed order on every device and thread count: rows are cut into blocks of
// `per_block` consecutive rows; partial[b][c] = 0 + dx[r0][c] + dx[r0+1][c] + ...
// over block b's rows in order, and dbias[c] = 0 + partial[0][c] + partial[1][c]
// + ..., all in op-math, rounded once to the bias dtype. At most ~1024 blocks,
// at least 32 rows each.
struct RowBlocks {
  int64_t per_block, count;
};

FUSEDOPT_HD inline RowBlocks row_blocks(int64_t rows) {
  const int64_t per = std::max<int64_t>(32, ceil_div(rows, 1024));
  return {per, ceil_div(rows, per)};
}

// Units of each kernel (Note [Dropout launch plan]).
template <typename T>
FUSEDOPT_HD inline int64_t elementwise_units(int64_t n) {
  return ceil_div(n, unit_elems<T>());
}
template <typename T>
FUSEDOPT_HD inline int64_t partial_units(int64_t n, int64_t h) {
  return row_blocks(n / h).count * ceil_div(h, unit_elems<T>());
}
FUSEDOPT_HD inline int64_t bits_units(int64_t n) { return ceil_div(ceil_div(n, 8), 4); }

// One call's arguments, typed; `vec` says the 16-byte path is allowed (every
// pointer 16-byte aligned, and for the row-wise ops h % U == 0).
template <typename T>
struct Args {
  using S = typename OpMath<T>::type;
  const T* x = nullptr;  // x, or dy for the backward ops
  const T* bias = nullptr;
  const T* residual = nullptr;
  T* y = nullptr;  // y, or dx
  S* partial = nullptr;
  uint64_t seed = 0, offset = 0, threshold = 0;
  S scale = 0;
  int64_t n = 0, h = 1;
  bool vec = false;
};

// m[k] for the U elements of the unit starting at i0 (a multiple of 4).
template <typename T>
FUSEDOPT_HD inline void unit_keep(const Args<T>& a, int64_t i0, typename Args<T>::S (&m)[unit_elems<T>()]) {
  for (int q = 0; q < unit_elems<T>() / 4; ++q) {
    const philox::Words w = philox::block(a.seed, a.offset, static_cast<uint64_t>(i0 >> 2) + q);
    for (int j = 0; j < 4; ++j) m[4 * q + j] = philox::keep(w.w[j], a.threshold) ? a.scale : 0;
  }
}

// fn(i0, m) for each unit of U elements over [0, n) that this thread takes
// (grid-stride): i0 its first element, m its multipliers.
template <typename T, typename F>
FUSEDOPT_HD inline void for_each_unit(int64_t block, int64_t thread, int64_t threads, int64_t grid,
                                      const Args<T>& a, const F& fn) {
  constexpr int U = unit_elems<T>();
  const int64_t units = elementwise_units<T>(a.n);
  for (int64_t u = block * threads + thread; u < units; u += grid * threads) {
    typename Args<T>::S m[U];
    unit_keep(a, u * U, m);
    fn(u * U, m);
  }
}

// y = dropout(x): units of U elements over [0, n). Also the backward (x = dy).
template <typename T>
FUSEDOPT_HD inline void dropout_thread(int64_t block, int64_t thread, int64_t threads, int64_t grid,
                                       const Args<T>& a) {
  using S = typename Args<T>::S;
  constexpr int U = unit_elems<T>();
  for_each_unit(block, thread, threads, grid, a, [&](int64_t i0, const S (&m)[U]) {
    if (a.vec && i0 + U <= a.n) {
      T v[U];
      load_unit(a.x + i0, v);
      for (int k = 0; k < U; ++k) v[k] = static_cast<T>(math::dropout(static_cast<S>(v[k]), m[k]));
      store_unit(a.y + i0, v);
    } else {
      for (int k = 0; k < U && i0 + k < a.n; ++k)
        a.y[i0 + k] = static_cast<T>(math::dropout(static_cast<S>(a.x[i0 + k]), m[k]));
    }
  });
}

// y = residual + dropout(x + bias), bias[c] for column c = i mod h.
template <typename T>
FUSEDOPT_HD inline void bias_dropout_add_thread(int64_t block, int64_t thread, int64_t threads, int64_t grid,
                                                const Args<T>& a) {
  using S = typename Args<T>::S;
  constexpr int U = unit_elems<T>();
  for_each_unit(block, thread, threads, grid, a, [&](int64_t i0, const S (&m)[U]) {
    int64_t c = i0 % a.h;
    if (a.vec && i0 + U <= a.n) {  // h % U == 0: the unit's columns c .. c + U - 1 lie in one row
      T x[U], b[U], r[U];
      load_unit(a.x + i0, x);
      load_unit(a.bias + c, b);
      load_unit(a.residual + i0, r);
      for (int k = 0; k < U; ++k)
        x[k] = static_cast<T>(math::bias_dropout_add(static_cast<S>(x[k]), static_cast<S>(b[k]),
                                                     static_cast<S>(r[k]), m[k]));
      store_unit(a.y + i0, x);
    } else {
      for (int k = 0; k < U && i0 + k < a.n; ++k) {
        const int64_t i = i0 + k;
        a.y[i] = static_cast<T>(math::bias_dropout_add(static_cast<S>(a.x[i]), static_cast<S>(a.bias[c]),
                                                       static_cast<S>(a.residual[i]), m[k]));
        if (++c == a.h) c = 0;
      }
    }
  });
}

// bias_dropout_add's backward, first pass: dx = dropout(dy) and the partial
// sums of Note [dbias row blocks]. A unit is U columns of one row block; a
// thread walks its rows in order. Units run over columns fastest, so the
// threads of a warp touch consecutive memory.
template <typename T>
FUSEDOPT_HD inline void dbias_partial_thread(int64_t block, int64_t thread, int64_t threads, int64_t grid,
                                             const Args<T>& a) {
  using S = typename Args<T>::S;
  constexpr int U = unit_elems<T>();
  const int64_t rows = a.n / a.h;
  const RowBlocks rb = row_blocks(rows);
  const int64_t col_units = ceil_div(a.h, U);
  const int64_t units = partial_units<T>(a.n, a.h);
  for (int64_t u = block * threads + thread; u < units; u += grid * threads) {
    const int64_t b = u / col_units;
    const int64_t c0 = (u - b * col_units) * U;
    const int cn = static_cast<int>(std::min<int64_t>(U, a.h - c0));
    // Loops over k run to U, with k < cn tested inside: with constant bounds they unroll and acc stays in
    // registers (a loop to cn put it in local memory, and the sm_80 build spilled).
    S acc[U];
    FUSEDOPT_UNROLL
    for (int k = 0; k < U; ++k) acc[k] = 0;
    const int64_t r_end = std::min(rows, (b + 1) * rb.per_block);
    for (int64_t r = b * rb.per_block; r < r_end; ++r) {
      const int64_t i0 = r * a.h + c0;
      S m[U];
      if (a.vec) {  // h % U == 0, so i0 is a multiple of U and the unit is whole
        unit_keep(a, i0, m);
        T v[U];
        load_unit(a.x + i0, v);
        for (int k = 0; k < U; ++k) {
          const S d = math::dropout(static_cast<S>(v[k]), m[k]);
          v[k] = static_cast<T>(d);
          acc[k] = acc[k] + d;
        }
        store_unit(a.y + i0, v);
      } else {
        const uint32_t keep = philox::keep_run<U>(a.seed, a.offset, a.threshold, static_cast<uint64_t>(i0));
        FUSEDOPT_UNROLL
        for (int k = 0; k < U; ++k) {
          if (k >= cn) continue;
          const int64_t i = i0 + k;
          const S d = math::dropout(static_cast<S>(a.x[i]), (keep >> k & 1u) ? a.scale : S(0));
          a.y[i] = static_cast<T>(d);
          acc[k] = acc[k] + d;
        }
      }
    }
    FUSEDOPT_UNROLL
    for (int k = 0; k < U; ++k)
      if (k < cn) a.partial[b * a.h + c0 + k] = acc[k];
  }
}

// dbias[c] from the partial sums (Note [dbias row blocks]), written to a.y.
template <typename T>
FUSEDOPT_HD inline typename Args<T>::S dbias_column(const typename Args<T>::S* partial, int64_t count, int64_t h,
                                                    int64_t c) {
  typename Args<T>::S s = 0;
  for (int64_t b = 0; b < count; ++b) s = s + partial[b * h + c];
  return s;
}

template <typename T>
FUSEDOPT_HD inline void dbias_reduce_thread(int64_t block, int64_t thread, int64_t threads, int64_t grid,
                                            const Args<T>& a) {
  const int64_t count = row_blocks(a.n / a.h).count;
  for (int64_t c = block * threads + thread; c < a.h; c += grid * threads)
    a.y[c] = static_cast<T>(dbias_column<T>(a.partial, count, a.h, c));
}

// Note [Strided CUDA dropout]
// A dense, non-contiguous x (Note [Strided dropout] in fusedopt/dropout.h) and
// its output y share strides; dims[unit] has stride 1. Element (o, j, r) (o
// over the dimensions before `unit`, j along it, r over those after it) has
// logical index (o·J + j)·P + r, J = sizes[unit], P the product after it.
// - Rows (unit last, P = 1): a unit of work is U = unit_elems<T>() consecutive
//   j of one row o, consecutive in memory and in the logical order, so the
//   threads of a warp touch consecutive memory and draw consecutive blocks.
//   Where every row starts 16-byte aligned (`vec`), a whole unit moves with
//   16-byte loads and stores, as the contiguous kernel's do.
// - Tiles: a block takes kTileJ j × kTileR r of one o. First each thread draws
//   the keep bits of kRunR consecutive r of one j (a run of the logical order,
//   philox::keep_run: each Philox block is drawn once, or twice where a run
//   starts inside one) into shared memory; then each warp takes one r at a
//   time, its lanes the 32 j, which lie side by side in memory, and reads its
//   bit there. So the loads and stores are coalesced and no block is drawn per
//   element.
// - Index arithmetic (a unit's row and place in it, a tile's o, j and r, the
//   memory offset of an index over several dimensions) is done in the
//   unsigned type I: uint32_t where the tensor has fewer than 2^31 elements
//   (narrow_index), which bounds every logical index and, the tensor being
//   dense, every memory offset; else uint64_t. The GPU has no integer
//   divider: nvcc's 64-bit division tests both operands' high words, divides
//   inline in 32 bits when they are zero and else calls a subroutine of ~80
//   instructions; the 32-bit type drops the test, the call and the 64-bit
//   multiply-adds around each division. In the sm_90 SASS of
//   csrc/cuda/dropout.cu (nvcc 13.0) the fp32 rows kernel has 584
//   instructions and no call site against 944 and 8 in the 64-bit one, the
//   tiles 952 and 760 (r over several dimensions, one) against 1536 and 1160.
// The grid emulation runs both phases of every thread of a block in turn, as
// __syncthreads orders them on the GPU, with either I.
constexpr int kMaxDims = 8;  // merged dimensions; more take the copies
constexpr int kTileJ = 32;   // a warp
constexpr int kTileR = 128;
constexpr int kRunR = kTileJ * kTileR / static_cast<int>(kThreads);  // r a thread draws: 16
static_assert(kRunR <= 32, "a thread's run of bits is one word");

template <typename T>
struct StridedArgs {
  using S = typename OpMath<T>::type;
  const T* x = nullptr;
  T* y = nullptr;
  uint64_t seed = 0, offset = 0, threshold = 0;
  S scale = 0;
  int dims = 0, unit = 0;
  int64_t sizes[kMaxDims] = {}, strides[kMaxDims] = {};
  int64_t outer = 1, j_size = 1, inner = 1;  // O, J, P
  int64_t units = 0;  // rows: O·ceil(J / U) units of U j; tiles: O·ceil(J / kTileJ)·ceil(P / kTileR) tiles
  bool vec = false;  // rows: x and y 16-byte aligned, and every row start a multiple of 16 bytes from them
};

// Whether 32-bit unsigned index arithmetic covers the call (Note [Strided CUDA dropout]).
template <typename T>
inline bool narrow_index(const StridedArgs<T>& a) {
  return a.outer * a.j_size * a.inner < (int64_t(1) << 31);
}

// The memory offset of index q over dimensions [lo, hi), row-major.
template <typename I, typename T>
FUSEDOPT_HD inline I strided_offset(const StridedArgs<T>& a, int lo, int hi, I q) {
  I off = 0;
  for (int d = hi - 1; d >= lo; --d) {
    off += (q % static_cast<I>(a.sizes[d])) * static_cast<I>(a.strides[d]);
    q /= static_cast<I>(a.sizes[d]);
  }
  return off;
}

template <typename T>
FUSEDOPT_HD inline T dropped(const StridedArgs<T>& a, T x, bool keep) {
  using S = typename StridedArgs<T>::S;
  return static_cast<T>(math::dropout(static_cast<S>(x), keep ? a.scale : S(0)));
}

template <typename I, typename T>
FUSEDOPT_HD inline void strided_rows_thread(int64_t block, int64_t thread, int64_t threads, int64_t grid,
                                            const StridedArgs<T>& a) {
  constexpr int U = unit_elems<T>();
  const auto j_size = static_cast<I>(a.j_size), per_row = static_cast<I>(ceil_div(a.j_size, U));
  for (int64_t u = block * threads + thread; u < a.units; u += grid * threads) {
    const auto q = static_cast<I>(u);
    const I o = q / per_row, j0 = (q - o * per_row) * U;
    const I m0 = strided_offset<I>(a, 0, a.unit, o) + j0;
    const uint32_t keep = philox::keep_run<U>(a.seed, a.offset, a.threshold, static_cast<uint64_t>(o * j_size + j0));
    if (a.vec && j0 + U <= j_size) {
      T v[U];
      load_unit(a.x + m0, v);
      FUSEDOPT_UNROLL
      for (int k = 0; k < U; ++k) v[k] = dropped(a, v[k], keep >> k & 1u);
      store_unit(a.y + m0, v);
    } else {
      FUSEDOPT_UNROLL
      for (int k = 0; k < U && j0 + k < j_size; ++k) a.y[m0 + k] = dropped(a, a.x[m0 + k], keep >> k & 1u);
    }
  }
}

// A tile's keep bits: bits[jl][q] bit k = r kRunR·q + k of j jl. A row of 9
// words, so that the 32 lanes of a warp, reading word q of rows 0..31, hit 32
// different banks (9 and 32 are coprime).
struct TileBits {
  uint32_t bits[kTileJ][kTileR / kRunR + 1];
};

template <typename I>
struct Tile {
  I o, j0, r0;
};

template <typename I, typename T>
FUSEDOPT_HD inline Tile<I> tile_at(const StridedArgs<T>& a, int64_t tile) {
  const auto rt = static_cast<I>(ceil_div(a.inner, kTileR)), jt = static_cast<I>(ceil_div(a.j_size, kTileJ));
  const auto q = static_cast<I>(tile);
  const I rest = q / rt, o = rest / jt;
  return {o, (rest - o * jt) * kTileJ, (q - rest * rt) * kTileR};
}

// Phase one: thread t draws the bits of r [r0 + kRunR·q, + kRunR) of j j0 + jl, t = jl·(kTileR / kRunR) + q.
template <typename I, typename T>
FUSEDOPT_HD inline void strided_tile_draw(int64_t tile, int64_t thread, const StridedArgs<T>& a, TileBits& sh) {
  const Tile<I> t = tile_at<I>(a, tile);
  const int jl = static_cast<int>(thread) / (kTileR / kRunR), q = static_cast<int>(thread) % (kTileR / kRunR);
  const I j = t.j0 + jl, r = t.r0 + I(kRunR) * q;
  uint32_t bits = 0;
  if (j < static_cast<I>(a.j_size) && r < static_cast<I>(a.inner)) {  // bits past the tile's last r are never read
    const I i0 = (t.o * static_cast<I>(a.j_size) + j) * static_cast<I>(a.inner) + r;
    bits = philox::keep_run<kRunR>(a.seed, a.offset, a.threshold, static_cast<uint64_t>(i0));
  }
  sh.bits[jl][q] = bits;
}

// Phase two: warp w takes r = r0 + w, r0 + w + warps, ...; lane l the element of j j0 + l. kOneR: r is one
// dimension (channels_last, a transpose), whose offset is r times its stride, without a division.
template <bool kOneR, typename I, typename T>
FUSEDOPT_HD inline void strided_tile_apply(int64_t tile, int64_t thread, const StridedArgs<T>& a,
                                           const TileBits& sh) {
  const Tile<I> t = tile_at<I>(a, tile);
  const int lane = static_cast<int>(thread) % kTileJ, warp = static_cast<int>(thread) / kTileJ;
  const I j = t.j0 + lane;
  if (j >= static_cast<I>(a.j_size)) return;
  const I m0 = strided_offset<I>(a, 0, a.unit, t.o) + j;
  for (int rr = warp; rr < kTileR && t.r0 + rr < static_cast<I>(a.inner); rr += static_cast<int>(kThreads) / kTileJ) {
    const I r = t.r0 + rr;
    const I m = m0 + (kOneR ? r * static_cast<I>(a.strides[a.unit + 1]) : strided_offset<I>(a, a.unit + 1, a.dims, r));
    a.y[m] = dropped(a, a.x[m], (sh.bits[lane][rr / kRunR] >> (rr % kRunR)) & 1u);
  }
}

// Packed keep bits: bit k of byte j = keep of element 8j + k. A unit is one
// 32-bit word of output (32 elements, 8 Philox blocks), stored whole when
// `vec` (the output is 4-byte aligned) and the word is complete.
struct BitsArgs {
  uint8_t* bits = nullptr;
  uint64_t seed = 0, offset = 0, threshold = 0;
  int64_t n = 0;
  bool vec = false;
};

FUSEDOPT_HD inline void keep_bits_thread(int64_t block, int64_t thread, int64_t threads, int64_t grid,
                                         const BitsArgs& a) {
  const int64_t bytes = ceil_div(a.n, 8);
  const int64_t units = bits_units(a.n);
  for (int64_t u = block * threads + thread; u < units; u += grid * threads) {
    uint32_t word = 0;
    for (int q = 0; q < 8 && 32 * u + 4 * q < a.n; ++q) {
      const philox::Words w = philox::block(a.seed, a.offset, static_cast<uint64_t>(8 * u + q));
      for (int j = 0; j < 4; ++j)
        if (32 * u + 4 * q + j < a.n && philox::keep(w.w[j], a.threshold)) word |= uint32_t(1) << (4 * q + j);
    }
    if (a.vec && 4 * u + 4 <= bytes) {
#if defined(__CUDA_ARCH__)
      *reinterpret_cast<uint32_t*>(a.bits + 4 * u) = word;
#else
      std::memcpy(a.bits + 4 * u, &word, 4);  // little-endian, as on the GPU
#endif
    } else {
      for (int k = 0; k < 4 && 4 * u + k < bytes; ++k) a.bits[4 * u + k] = static_cast<uint8_t>(word >> (8 * k));
    }
  }
}

}  // namespace dropout
}  // namespace fusedopt
