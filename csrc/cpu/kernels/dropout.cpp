// The CPU dropout kernels (DESIGN.md §6, §7): one pass, the mask drawn by the
// vector Philox 64 elements at a time (philox_vec.h), the element rules of
// math/dropout.h on op-math vectors, scalar tails. Every element's result is
// a pure function of its index, so nothing depends on the thread count.
#include "../vec.h"  // first: Note [Rule bodies]

#include <array>
#include <cstring>

#include "../loop.h"
#include "../philox_vec.h"
#include "fusedopt/math/dropout.h"
#include "kernels.h"

namespace fusedopt::cpu::CPU_CAPABILITY {
namespace {

// 64-element groups per parallel task: kChunk elements.
constexpr int64_t kGroupsPerTask = kChunk / 64;

// Note [Streaming stores]
// dropout's output is written, not read: ordinary stores first read every
// line they fill (12 bytes of traffic per fp32 element instead of 8). An
// output too large to stay in the last-level cache with its input goes out
// with non-temporal stores instead (measured here on 64 MB: 1.5x faster);
// a smaller one stays cached for the next layer. The values are the same.
// In place the output is the input: its lines are in the cache already, and
// a non-temporal store to a cached line first evicts it (measured on Zen 3,
// bf16 8x1024x4096 in place: 184 ms streamed against 26 ms for fp32, whose
// 32-byte stores fare better), so an output that is an input is stored
// ordinarily.
constexpr int64_t kStreamBytes = int64_t(16) << 20;

bool streams(const void* y, const void* x, int64_t n, size_t elem) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  return y != x && n * static_cast<int64_t>(elem) >= kStreamBytes && reinterpret_cast<uintptr_t>(y) % 64 == 0;
#else
  (void)y, (void)x, (void)n, (void)elem;
  return false;
#endif
}

// One op-math vector stored as W elements at p, non-temporally. p is aligned
// to the bytes stored: full groups start at multiples of 64 elements of a
// 64-byte aligned output.
template <typename scalar_t>
void store_stream(scalar_t* p, const typename VecIo<scalar_t>::V& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, float>) {
    _mm512_stream_ps(p, v);
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    _mm512_stream_pd(p, v);
  } else {
    const __m512i h = at::vec::convert_from_float<scalar_t>(v, v);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_castsi512_si256(h));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, float>) {
    _mm256_stream_ps(p, v);
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    _mm256_stream_pd(p, v);
  } else {
    const __m256i h = at::vec::convert_from_float<scalar_t>(v, v);
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(h));
  }
#else
  VecIo<scalar_t>::store(p, v);
#endif
}

template <typename scalar_t>
void store(scalar_t* p, const typename VecIo<scalar_t>::V& v, bool stream) {
  if (stream) store_stream(p, v);
  else VecIo<scalar_t>::store(p, v);
}

void fence(bool stream) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if (stream) _mm_sfence();  // streamed lines visible before the task ends
#else
  (void)stream;
#endif
}

Draw draw_of(const DropoutCall& c) { return {c.seed, c.offset, c.threshold}; }

// An array a kernel reads in element order, `elem` bytes an element.
struct Walk {
  const void* p;
  int64_t elem;
};

// Prefetches the lines that groups [q, q + kBatch) of w read, shifted
// kPrefetchBytes ahead, up to group `end`. Note [Prefetch ahead] holds here
// as in the optimizers' element loop: a batch's Philox draw fills the reorder
// window, and the loads after it waited. Measured here (2 threads, pages
// kept): bf16 8x1024x4096 in place 11.4 -> 9.9 ms, bias_dropout_add 15-16 ->
// 11.9 ms; fp32 4096x4096 bias_dropout_add 9.7 -> 7.2-8.2 ms, dropout 7.2-7.6 ->
// 6.9 ms. Read prefetches: write ones were no faster in place; 2 KB ahead did
// as well as 4 or 8 KB, or better.
void prefetch_batch(const Walk& w, int64_t q, int64_t end) {
  const char* base = static_cast<const char*>(w.p);
  const int64_t last = 64 * end * w.elem;
  for (int64_t b = 64 * q * w.elem + kPrefetchBytes, e = b + 64 * kBatch * w.elem; b < e && b < last; b += 64)
    __builtin_prefetch(base + b);
}

// Runs fn(q, bits) for every 64-element group q of [0, n) in parallel, with
// the group's keep bits; `stream`: fn streams its stores (fenced per task).
// The arrays of `walks` are prefetched ahead.
template <size_t K, typename F>
void for_each_group(const DropoutCall& c, bool stream, const std::array<Walk, K>& walks, const F& fn) {
  const Draw d = draw_of(c);
  at::parallel_for(0, (c.n + 63) / 64, kGroupsPerTask, [&](int64_t lo, int64_t hi) {
    const Keeper keeper(d);
    uint64_t bits[kBatch];
    for (int64_t q = lo; q < hi; q += kBatch) {
      for (const Walk& w : walks) prefetch_batch(w, q, hi);
      keeper.batch(static_cast<uint64_t>(q), bits);
      for (int64_t j = 0; j < kBatch && q + j < hi; ++j) fn(q + j, bits[j]);
    }
    fence(stream);
  });
}

template <typename scalar_t>
void dropout_typed(const DropoutCall& c) {
  using Io = VecIo<scalar_t>;
  using S = typename Io::S;
  constexpr int W = Io::W;
  const S scale = static_cast<S>(c.scale);
  const auto* x = static_cast<const scalar_t*>(c.x);
  auto* y = static_cast<scalar_t*>(c.y);
  const bool stream = streams(y, x, c.n, sizeof(scalar_t));
  const std::array walks{Walk{x, sizeof(scalar_t)}};
  for_each_group(c, stream, walks, [&](int64_t q, uint64_t bits) {
    const int64_t i0 = 64 * q;
    if (i0 + 64 <= c.n) {
      for (int k = 0; k < 64; k += W)
        store(y + i0 + k, math::dropout(Io::load(x + i0 + k), keep_select<S>(bits >> k, scale)), stream);
    } else {
      for (int64_t i = i0; i < c.n; ++i)
        y[i] = static_cast<scalar_t>(math::dropout(static_cast<S>(x[i]), (bits >> (i - i0) & 1) ? scale : S(0)));
    }
  });
}

template <typename scalar_t>
void bias_dropout_add_typed(const DropoutCall& c) {
  using Io = VecIo<scalar_t>;
  using V = typename Io::V;
  using S = typename Io::S;
  constexpr int W = Io::W;
  const S scale = static_cast<S>(c.scale);
  const auto* x = static_cast<const scalar_t*>(c.x);
  const auto* bias = static_cast<const scalar_t*>(c.bias);
  const auto* res = static_cast<const scalar_t*>(c.residual);
  auto* y = static_cast<scalar_t*>(c.y);
  const int64_t h = c.h;
  const bool stream = streams(y, x, c.n, sizeof(scalar_t));
  const std::array walks{Walk{x, sizeof(scalar_t)}, Walk{res, sizeof(scalar_t)}};
  for_each_group(c, stream, walks, [&](int64_t q, uint64_t bits) {
    const int64_t i0 = 64 * q;
    int64_t col = i0 % h;
    if (i0 + 64 <= c.n) {
      for (int k = 0; k < 64; k += W) {
        V b;
        if (col + W <= h) {
          b = Io::load(bias + col);
        } else {  // the vector wraps around a row end
          S lanes[W];
          for (int j = 0, cj = static_cast<int>(col); j < W; ++j, cj = cj + 1 == h ? 0 : cj + 1)
            lanes[j] = static_cast<S>(bias[cj]);
          b = V::loadu(lanes);
        }
        const int64_t i = i0 + k;
        store(y + i, math::bias_dropout_add(Io::load(x + i), b, Io::load(res + i), keep_select<S>(bits >> k, scale)),
              stream);
        for (col += W; col >= h;) col -= h;
      }
    } else {
      for (int64_t i = i0; i < c.n; ++i) {
        y[i] = static_cast<scalar_t>(math::bias_dropout_add(static_cast<S>(x[i]), static_cast<S>(bias[col]),
                                                            static_cast<S>(res[i]),
                                                            (bits >> (i - i0) & 1) ? scale : S(0)));
        if (++col == h) col = 0;
      }
    }
  });
}

// dx = dropout(dy) and the partial sums of Note [dbias row blocks]; `partial`
// arrives zeroed. Tasks are (row block, column chunk); a task walks its rows
// in order and adds each row's dx into the block's partial row, so every
// column sums its rows in the order the CUDA body does.
template <typename scalar_t>
void bias_dropout_add_backward_typed(const DropoutCall& c) {
  using Io = VecIo<scalar_t>;
  using V = typename Io::V;
  using S = typename Io::S;
  constexpr int W = Io::W;
  constexpr int64_t kCols = 2048;
  const S scale = static_cast<S>(c.scale);
  const auto* dy = static_cast<const scalar_t*>(c.x);
  auto* dx = static_cast<scalar_t*>(c.y);
  auto* partial = static_cast<S*>(c.partial);
  const int64_t h = c.h;
  const int64_t rows = c.n / h;
  const auto rb = dropout::row_blocks(rows);
  const int64_t col_chunks = (h + kCols - 1) / kCols;
  const Draw d = draw_of(c);
  const int64_t grain = std::max<int64_t>(1, kChunk / (rb.per_block * std::min(h, kCols)));
  at::parallel_for(0, rb.count * col_chunks, grain, [&](int64_t lo, int64_t hi) {
    KeepCache cache;
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / col_chunks;
      const int64_t c_lo = (task % col_chunks) * kCols, c_hi = std::min(h, c_lo + kCols);
      S* acc = partial + b * h;
      const int64_t r_end = std::min(rows, (b + 1) * rb.per_block);
      for (int64_t r = b * rb.per_block; r < r_end; ++r) {
        int64_t col = c_lo;
        for (; col + W <= c_hi; col += W) {
          const int64_t i = r * h + col;
          const V m = keep_select<S>(cache.bits(d, static_cast<uint64_t>(i), W), scale);
          const V v = math::dropout(Io::load(dy + i), m);
          Io::store(dx + i, v);
          (V::loadu(acc + col) + v).store(acc + col);
        }
        for (; col < c_hi; ++col) {
          const int64_t i = r * h + col;
          const S v = math::dropout(static_cast<S>(dy[i]), cache.bits(d, static_cast<uint64_t>(i), 1) ? scale : S(0));
          dx[i] = static_cast<scalar_t>(v);
          acc[col] = acc[col] + v;
        }
      }
    }
  });
}

}  // namespace

void dropout(const DropoutCall& c) {
  FUSEDOPT_DISPATCH_FLOATING(c.dtype, "dropout", [&] { dropout_typed<scalar_t>(c); });
}

void bias_dropout_add(const DropoutCall& c) {
  FUSEDOPT_DISPATCH_FLOATING(c.dtype, "bias_dropout_add", [&] { bias_dropout_add_typed<scalar_t>(c); });
}

void bias_dropout_add_backward(const DropoutCall& c) {
  FUSEDOPT_DISPATCH_FLOATING(c.dtype, "bias_dropout_add_backward",
                             [&] { bias_dropout_add_backward_typed<scalar_t>(c); });
}

// Bit k of byte j = keep of element 8j + k: each group's 64 bits are its 8
// bytes, little-endian.
void keep_bits(const DropoutCall& c, uint8_t* out) {
  static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "byte j of a group's bits is bits >> 8j");
  const int64_t bytes = (c.n + 7) / 8;
  for_each_group(c, false, std::array<Walk, 0>{}, [&](int64_t q, uint64_t bits) {
    const int64_t b0 = 8 * q;
    if (64 * q + 64 <= c.n) {  // a whole group: one 8-byte store (bytes one at a time took a third of the op)
      std::memcpy(out + b0, &bits, sizeof bits);
      return;
    }
    bits &= (uint64_t(1) << (c.n - 64 * q)) - 1;  // no bits past the end
    for (int64_t j = b0; j < bytes; ++j) out[j] = static_cast<uint8_t>(bits >> (8 * (j - b0)));
  });
}

void philox_words(const uint32_t* counters, uint32_t* out, int64_t n, uint64_t seed) {
  philox_counters(counters, out, n, seed);
}

}  // namespace fusedopt::cpu::CPU_CAPABILITY
