// The CPU dropout kernels (DESIGN.md §6, §7): one pass, the mask drawn by the
// vector Philox 64 elements at a time (philox_vec.h), the element rules of
// math/dropout.h on op-math vectors, scalar tails. Every element's result is
// a pure function of its index, so nothing depends on the thread count.
#include "../vec.h"  // first: Note [Rule bodies]

#include <array>
#include <cstring>
#include <vector>

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

// Two op-math vectors stored as 2W elements at p: streamed (kStream) or not.
// Streamed, p is aligned to the bytes stored: pairs start at multiples of 2W
// elements of a 64-byte aligned output.
template <bool kStream, typename scalar_t, typename V>
void store2(scalar_t* p, const V& lo, const V& hi) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if constexpr (kStream) {
    VecIo<scalar_t>::stream2(p, lo, hi);
    return;
  }
#endif
  VecIo<scalar_t>::store2(p, lo, hi);
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
    prefetch_line(base + b);  // Note [Prefetch instruction]
}

// Makes a task's streamed stores (kStream) visible before the task ends.
template <bool kStream>
void end_streams() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if constexpr (kStream) _mm_sfence();
#endif
}

// Runs fn(q, bits) for every 64-element group q of [0, n) in parallel, with
// the group's keep bits; kStream: fn streams its stores (fenced per task).
// The arrays of `walks` are prefetched ahead. Each task runs its own copy of
// fn (Note [Group bodies]).
template <bool kStream, size_t K, typename F>
void for_each_group(const DropoutCall& c, const std::array<Walk, K>& walks, const F& body) {
  const Draw d = draw_of(c);
  at::parallel_for(0, (c.n + 63) / 64, kGroupsPerTask, [&](int64_t lo, int64_t hi) {
    const F fn = body;
    const Keeper keeper(d);
    uint64_t bits[kBatch];
    for (int64_t q = lo; q < hi; q += kBatch) {
      for (const Walk& w : walks) prefetch_batch(w, q, hi);
      keeper.batch(static_cast<uint64_t>(q), bits);
      for (int64_t j = 0; j < kBatch && q + j < hi; ++j) fn(q + j, bits[j]);
    }
    end_streams<kStream>();
  });
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// Note [bf16 in lanes]
// bf16 dropout is bound by its arithmetic, not by memory: on Zen 5 the keep
// bits of 32M elements alone take 2.5 ms (2 threads), x.mul_(1) 1.9 ms, and
// dropout took 4.1 ms, about their sum. ATen's conversions widen each 128-bit
// half of a vector's bf16s to fp32 in element order and pack the results
// back across lanes. Here a vector's bf16s stay in their 128-bit lanes:
// unpacking the words with zeros makes elements 8L + 0..3 of lane L one fp32
// vector and 8L + 4..7 another, packus_epi32 of the two rounded vectors puts
// every element back in place, and the keep bits are sorted the same way
// (AVX512: pext; every AVX512 CPU has BMI2, and pick_isa checks; AVX2: one
// variable shift moves each lane's bit to its sign, which blendv reads). The
// arithmetic is math::dropout's and the rounding ATen's (bf16_bits), so the
// bits are those of the pair path. Against that path, 8x1024x4096 bf16,
// alternating builds, Zen 5: AVX512, 2 threads 3.97-4.23 -> 3.72-3.87 ms
// forward, 3.79-3.85 -> 3.72-3.79 in place; one thread 7.75-7.95 -> 7.52-7.68
// forward; AVX2 (run on the same Zen 5), 2 threads 9.17-9.27 -> 8.78-8.87 ms
// forward, 9.06-9.11 -> 8.73-8.97 in place. bias_dropout_add does the same
// with its three inputs (a bias that wraps around a row end is copied into
// element order first; rows of a multiple of kLaneStep never wrap): 2
// threads, 8192x4096, AVX512 4.66-4.77 -> 4.36-4.62 ms, AVX2 9.79-10.03 ->
// 9.10-9.61; 32768x1000 (a wrap per row), AVX512 4.70-4.77 -> 4.72-4.92,
// AVX2 9.91-10.01 -> 9.20-9.57.
constexpr int kLaneStep = 2 * at::vec::Vectorized<float>::size();

// y[k] = rule(in[0][k], ..., in[K-1][k], keep ? scale : 0) for k < kLaneStep
// (bit k of bits: element k), the rule on fp32 vectors of lane-ordered
// elements.
template <bool kStream, size_t K, typename Rule>
void bf16_lanes(const std::array<const at::BFloat16*, K>& in, at::BFloat16* y, uint32_t bits, float scale,
                const Rule& rule) {
  using V = at::vec::Vectorized<float>;
  V lo[K], hi[K];
#if defined(CPU_CAPABILITY_AVX512)
  for (size_t j = 0; j < K; ++j) {
    const __m512i raw = _mm512_loadu_si512(in[j]), zero = _mm512_setzero_si512();
    lo[j] = V(_mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, raw)));
    hi[j] = V(_mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, raw)));
  }
  const V m_lo = keep_select<float>(_pext_u32(bits, 0x0F0F0F0Fu), scale);
  const V m_hi = keep_select<float>(_pext_u32(bits, 0xF0F0F0F0u), scale);
  const __m512i out = _mm512_packus_epi32(bf16_bits(rule(lo, m_lo)), bf16_bits(rule(hi, m_hi)));
  if constexpr (kStream) _mm512_stream_si512(reinterpret_cast<__m512i*>(y), out);
  else _mm512_storeu_si512(y, out);
#else
  for (size_t j = 0; j < K; ++j) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in[j])), zero = _mm256_setzero_si256();
    lo[j] = V(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw)));  // elements 0-3, 8-11
    hi[j] = V(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw)));  // elements 4-7, 12-15
  }
  const __m256i b = _mm256_set1_epi32(static_cast<int>(bits));
  const __m256 s = _mm256_set1_ps(scale), none = _mm256_setzero_ps();
  const __m256i to_sign_lo = _mm256_setr_epi32(31, 30, 29, 28, 23, 22, 21, 20);  // bit e to bit 31: 31 - e
  const __m256i to_sign_hi = _mm256_setr_epi32(27, 26, 25, 24, 19, 18, 17, 16);
  const V m_lo(_mm256_blendv_ps(none, s, _mm256_castsi256_ps(_mm256_sllv_epi32(b, to_sign_lo))));
  const V m_hi(_mm256_blendv_ps(none, s, _mm256_castsi256_ps(_mm256_sllv_epi32(b, to_sign_hi))));
  const __m256i out = _mm256_packus_epi32(bf16_bits(rule(lo, m_lo)), bf16_bits(rule(hi, m_hi)));
  if constexpr (kStream) _mm256_stream_si256(reinterpret_cast<__m256i*>(y), out);
  else _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), out);
#endif
}
#endif

// y[k] = dropout(x[k]) for k < count ≤ 64, kept iff bit k of bits: two
// op-math vectors a step (Note [Half pairs]), then element by element.
// Streamed (kStream), x and y start a 64-byte aligned group.
template <bool kStream, typename scalar_t, typename S>
void dropout_run(const scalar_t* x, scalar_t* y, int64_t count, uint64_t bits, S scale) {
  using Io = VecIo<scalar_t>;
  using V = typename Io::V;
  constexpr int W = Io::W;
  const int m = static_cast<int>(std::min<int64_t>(count, 64));  // = count: the bound shows every shift defined
  int k = 0;
  for (; k + 2 * W <= m; k += 2 * W) {
    V lo, hi;
    Io::load2(x + k, lo, hi);
    store2<kStream>(y + k, math::dropout(lo, keep_select<S>(bits >> k, scale)),
                    math::dropout(hi, keep_select<S>(bits >> (k + W), scale)));
  }
  for (; k < m; ++k) y[k] = static_cast<scalar_t>(math::dropout(static_cast<S>(x[k]), (bits >> k & 1) ? scale : S(0)));
}

// Note [Group bodies]
// The bodies below take what they use by value, and each task runs its own
// copy of them: captured by reference, or read through the one closure all
// tasks share, every store through y (a may-alias vector store) made the
// compiler reload the pointers and the scale before the next vector. They
// move two vectors per step (Note [Half pairs]), and whether they stream is
// a template argument, not a test per store. With Note [bf16 in lanes], on
// Zen 5, 2 threads, pages kept, alternating builds: bf16 8x1024x4096 forward
// 4.46-4.61 -> 3.97-4.12 ms, in place 4.06-4.13 -> 3.81-3.91; fp32 4096x4096
// in place 1.90-1.99 -> 1.78-1.80; the streamed fp32 forward and
// bias_dropout_add unchanged (2.2-2.4 and 3.4-3.7 ms both ways).
template <typename scalar_t, bool kStream>
void dropout_typed(const DropoutCall& c) {
  using Io = VecIo<scalar_t>;
  using V = typename Io::V;
  using S = typename Io::S;
  const S scale = static_cast<S>(c.scale);
  const auto* x = static_cast<const scalar_t*>(c.x);
  auto* y = static_cast<scalar_t*>(c.y);
  const int64_t n = c.n;
  const std::array walks{Walk{x, sizeof(scalar_t)}};
  for_each_group<kStream>(c, walks, [x, y, n, scale](int64_t q, uint64_t bits) {
    const int64_t i0 = 64 * q;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      if (i0 + 64 <= n) {
        for (int k = 0; k < 64; k += kLaneStep)
          bf16_lanes<kStream>(std::array{x + i0 + k}, y + i0 + k, static_cast<uint32_t>(bits >> k), scale,
                              [](const V (&v)[1], const V& m) { return math::dropout(v[0], m); });
        return;
      }
    }
#endif
    if (i0 + 64 <= n) dropout_run<kStream>(x + i0, y + i0, 64, bits, scale);  // a constant count: unrolled
    else dropout_run<kStream>(x + i0, y + i0, n - i0, bits, scale);
  });
}

// Note [Strided walk]
// The CPU side of Note [Strided dropout]. Rows (the stride-1 dimension is
// the last): a task takes whole rows in logical order, so its KeepCache
// draws each batch of keep bits once. Tiles (it is not): a task takes 64 j
// of one o and up to kTileRuns r; each j's run of r has logical indices
// (o·S + j)·P + r, consecutive. For each 64 r the task transposes the 64x64
// keep bits, so that word r holds the bits of the 64 j at r, which lie side
// by side in memory. A run shorter than kPipedRuns is drawn before the
// memory is walked, by one Batches for all j: where P is short, the runs
// of neighbouring j are neighbours in the logical order too, and share
// batches. A longer run has Batches of its own, drawn while the memory is
// walked: at each of the first 64 r of a word, the j of that index draws
// what it needs 1 + j % kBatch words ahead, so the draws of the 64 j are
// spread over the words instead of all falling on a batch's first. The
// Philox rounds then run between loads and stores, not before all of them:
// out of place, 16x64x128x128 channels_last 3.7-4.4 -> 3.4-3.6 ms,
// 16x256x64x64 4.3-5.2 -> 3.6-3.9, 4096x4096 .t() 5.1-5.9 -> 4.6-5.2
// (alternating builds; in place within noise). Each element's result is
// dropout_run's, a pure function of its logical index, as in the contiguous
// kernel.
//
// Two things made it fast (2 threads, pages kept, fp32 16.8M elements; this
// VM is noisy, so ranges):
// - Prefetch. Neighbouring memory runs of the walk are not neighbours in
//   memory (a row of heads transposed out of [batch, seq, heads, dim] is
//   8 KB from the next), and the hardware prefetcher does not follow. The
//   walk prefetches the run kLeadBytes ahead: 2 KB ahead, as the contiguous
//   loop does, gave in place 8x1024x16x128 heads 3.5-3.6 ms and
//   16x64x128x128 channels_last 3.3 ms; 8 KB ahead 2.5 and 2.7 ms; 16 KB no
//   better than 8.
// - Streaming stores, where every memory run fills whole lines (the
//   stride-1 dimension and every other stride a multiple of 64 bytes), for
//   an output as large as Note [Streaming stores] asks: out of place
//   channels_last 6.2-6.9 ms stored ordinarily, 3.6-3.8 streamed; heads
//   5.7-6.0 -> 3.1-3.3.
// With the runs drawn up front, kTileRuns 256 or 4096 instead of 1024 was
// no faster; drawn along the walk, 4096 leaves fewer draws before it.
constexpr int64_t kTileRuns = 4096;
constexpr int64_t kPipedRuns = 1024;
constexpr int64_t kLeadBytes = 8192;

// Walks dimensions [first, last) of s in row-major order from index `start`,
// keeping the memory offset of the current index.
class Odometer {
 public:
  Odometer(const Strided& s, int first, int last)
      : size_(s.sizes.data() + first), stride_(s.strides.data() + first), idx_(last - first) {}
  Odometer(const Strided& s, int first, int last, int64_t start) : Odometer(s, first, last) { seek(start); }
  void seek(int64_t start) {
    offset = 0;
    for (int d = static_cast<int>(idx_.size()) - 1; d >= 0; --d) {
      idx_[d] = start % size_[d];
      start /= size_[d];
      offset += idx_[d] * stride_[d];
    }
  }
  void next() {
    for (int d = static_cast<int>(idx_.size()) - 1; d >= 0; --d) {
      offset += stride_[d];
      if (++idx_[d] < size_[d]) return;
      offset -= stride_[d] * size_[d];
      idx_[d] = 0;
    }
  }
  int64_t offset = 0;

 private:
  const int64_t* size_;
  const int64_t* stride_;
  std::vector<int64_t> idx_;
};

// Bit j of a[r] becomes bit r of a[j]: a 64x64 bit matrix transposed by
// swapping ever smaller blocks across the diagonal.
void transpose64(uint64_t (&a)[64]) {
  uint64_t m = 0x00000000FFFFFFFFull;  // the columns of the blocks that stay
  for (int j = 32; j != 0; j >>= 1, m ^= m << j)
    for (int k = 0; k < 64; k = (k + j + 1) & ~j) {
      const uint64_t t = ((a[k] >> j) ^ a[k + j]) & m;
      a[k] ^= t << j;
      a[k + j] ^= t;
    }
}

// Prefetches the first kPrefetchBytes of the `bytes` at p.
void prefetch_run(const void* p, int64_t bytes) {
  for (int64_t b = 0; b < std::min(bytes, kPrefetchBytes); b += 64) prefetch_line(static_cast<const char*>(p) + b);
}

template <bool kStream, typename scalar_t>
void dropout_strided_typed(const DropoutCall& c) {
  using S = typename VecIo<scalar_t>::S;
  const Strided& s = *c.strided;
  const S scale = static_cast<S>(c.scale);
  const auto* x = static_cast<const scalar_t*>(c.x);
  auto* y = static_cast<scalar_t*>(c.y);
  const Draw d = draw_of(c);
  const int dims = static_cast<int>(s.sizes.size()), u = s.unit;
  // Memory runs (a row, or a tile's 64 j at one r) ahead by kLeadBytes.
  const auto lead_for = [](int64_t run_bytes) { return std::max<int64_t>(1, kLeadBytes / run_bytes); };
  if (u == dims - 1) {  // rows, cut into pieces of at most about kChunk (a multiple of 64 elements)
    const int64_t len = s.sizes.back(), rows = c.n / len;
    const int64_t pieces = (len + kChunk - 1) / kChunk, piece = ((len + pieces - 1) / pieces + 63) / 64 * 64;
    const int64_t bytes = len * static_cast<int64_t>(sizeof(scalar_t)), lead = lead_for(bytes);
    at::parallel_for(0, rows * pieces, std::max<int64_t>(1, kChunk / piece), [&](int64_t lo, int64_t hi) {
      KeepCache cache;
      Odometer row(s, 0, dims - 1, lo / pieces), ahead(s, 0, dims - 1, lo / pieces + lead);
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t r = t / pieces, k0 = t % pieces * piece;
        if (k0 == 0 && t > lo) row.next(), ahead.next();
        if (k0 == 0 && r + lead < rows) prefetch_run(x + ahead.offset, bytes);
        for (int64_t k = k0; k < std::min(len, k0 + piece); k += 64) {
          const int64_t count = std::min<int64_t>(64, len - k);
          dropout_run<kStream>(x + row.offset + k, y + row.offset + k, count,
                               cache.bits(d, static_cast<uint64_t>(r * len + k), static_cast<int>(count)), scale);
        }
      }
      end_streams<kStream>();
    });
    return;
  }
  const int64_t js = s.sizes[u];
  int64_t runs = 1;
  for (int k = u + 1; k < dims; ++k) runs *= s.sizes[k];
  const int64_t j_blocks = (js + 63) / 64, r_blocks = (runs + kTileRuns - 1) / kTileRuns;
  const int64_t tasks = c.n / (js * runs) * r_blocks * j_blocks;
  const int64_t grain = std::max<int64_t>(1, kChunk / (std::min<int64_t>(64, js) * std::min(kTileRuns, runs)));
  at::parallel_for(0, tasks, grain, [&](int64_t lo, int64_t hi) {
    const Keeper keeper(d);
    Batches shared, own[64];
    uint64_t bits[64][kPipedRuns / 64];
    uint64_t start[64];
    Odometer outer(s, 0, u), r(s, u + 1, dims), ahead(s, u + 1, dims);
    for (int64_t task = lo; task < hi; ++task) {  // (o, r block, j block), j block fastest
      const int64_t o = task / (r_blocks * j_blocks);
      const int64_t r0 = task / j_blocks % r_blocks * kTileRuns, j0 = task % j_blocks * 64;
      const int64_t nj = std::min<int64_t>(64, js - j0), len = std::min(kTileRuns, runs - r0);
      const bool piped = len >= kPipedRuns;
      for (int64_t j = 0; j < nj; ++j) start[j] = static_cast<uint64_t>((o * js + j0 + j) * runs + r0);
      // Draws the batches that the 64 r of word v of j's run take (Note [Strided walk]).
      const auto draw_word = [&](int64_t j, int64_t v) {
        if (64 * v >= len) return;
        const uint64_t i = start[j] + 64 * v;
        own[j].group(keeper, i >> 6);
        if (i & 63) own[j].group(keeper, (i >> 6) + 1);
      };
      for (int64_t j = 0; j < nj; ++j) {
        if (piped) {
          for (int64_t v = 0; v <= j % kBatch; ++v) draw_word(j, v);
        } else {
          for (int64_t w = 0; 64 * w < len; ++w)
            bits[j][w] = shared.bits(keeper, start[j] + 64 * w, static_cast<int>(std::min<int64_t>(64, len - 64 * w)));
        }
      }
      outer.seek(o);
      const int64_t base = outer.offset + j0;
      const int64_t bytes = nj * static_cast<int64_t>(sizeof(scalar_t)), lead = lead_for(bytes);
      r.seek(r0);
      ahead.seek(r0 + lead);
      for (int64_t w = 0; 64 * w < len; ++w) {
        const int64_t count = std::min<int64_t>(64, len - 64 * w);
        uint64_t at_r[64] = {};
        for (int64_t j = 0; j < nj; ++j)
          at_r[j] = piped ? own[j].bits(keeper, start[j] + 64 * w, static_cast<int>(count)) : bits[j][w];
        transpose64(at_r);
        for (int64_t k = 0; k < count; ++k, r.next(), ahead.next()) {
          if (piped && k < nj) draw_word(k, w + 1 + k % kBatch);
          if (64 * w + k + lead < len) prefetch_run(x + base + ahead.offset, bytes);
          dropout_run<kStream>(x + base + r.offset, y + base + r.offset, nj, at_r[k], scale);
        }
      }
    }
    end_streams<kStream>();
  });
}

// Whether the strided walk streams its stores (Note [Streaming stores]):
// for a large output, not in place, whose every memory run starts a line
// and fills whole lines (the stride-1 dimension, and every other stride,
// a multiple of 64 bytes).
bool streams_strided(const DropoutCall& c, size_t elem) {
  const Strided& s = *c.strided;
  bool lines = streams(c.y, c.x, c.n, elem) && s.sizes[s.unit] * static_cast<int64_t>(elem) % 64 == 0;
  for (size_t d = 0; d < s.strides.size(); ++d)
    lines = lines && (static_cast<int>(d) == s.unit || s.strides[d] * static_cast<int64_t>(elem) % 64 == 0);
  return lines;
}

template <typename scalar_t, bool kStream>
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
  const int64_t n = c.n, h = c.h;
  const std::array walks{Walk{x, sizeof(scalar_t)}, Walk{res, sizeof(scalar_t)}};
  for_each_group<kStream>(c, walks, [x, bias, res, y, n, h, scale](int64_t q, uint64_t bits) {
    const int64_t i0 = 64 * q;
    int64_t col = i0 % h;
    // The bias of the `count` elements from column col on, in element order: in place, or copied into
    // buf where they wrap around a row end. col moves on by count.
    const auto bias_run = [&](int count, scalar_t* buf) {
      const scalar_t* b = bias + col;
      if (col + count > h) {
        for (int j = 0, cj = static_cast<int>(col); j < count; ++j, cj = cj + 1 == h ? 0 : cj + 1) buf[j] = bias[cj];
        b = buf;
      }
      for (col += count; col >= h;) col -= h;
      return b;
    };
    if (i0 + 64 <= n) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
        for (int k = 0; k < 64; k += kLaneStep) {
          at::BFloat16 buf[kLaneStep];
          const at::BFloat16* b = bias_run(kLaneStep, buf);
          bf16_lanes<kStream>(std::array{x + i0 + k, b, res + i0 + k}, y + i0 + k, static_cast<uint32_t>(bits >> k),
                              scale, [](const V (&v)[3], const V& m) {
                                return math::bias_dropout_add(v[0], v[1], v[2], m);
                              });
        }
        return;
      }
#endif
      for (int k = 0; k < 64; k += 2 * W) {
        const int64_t i = i0 + k;
        V x_lo, x_hi, r_lo, r_hi;
        Io::load2(x + i, x_lo, x_hi);
        Io::load2(res + i, r_lo, r_hi);
        scalar_t buf[W];
        const V b_lo = Io::load(bias_run(W, buf));
        const V b_hi = Io::load(bias_run(W, buf));
        store2<kStream>(y + i, math::bias_dropout_add(x_lo, b_lo, r_lo, keep_select<S>(bits >> k, scale)),
                        math::bias_dropout_add(x_hi, b_hi, r_hi, keep_select<S>(bits >> (k + W), scale)));
      }
    } else {
      for (int64_t i = i0; i < n; ++i) {
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
  FUSEDOPT_DISPATCH_FLOATING(c.dtype, "dropout", [&] {
    FUSEDOPT_BOOL_SWITCH(streams(c.y, c.x, c.n, sizeof(scalar_t)), STREAM, [&] { dropout_typed<scalar_t, STREAM>(c); });
  });
}

void dropout_strided(const DropoutCall& c) {
  FUSEDOPT_DISPATCH_FLOATING(c.dtype, "dropout", [&] {
    FUSEDOPT_BOOL_SWITCH(streams_strided(c, sizeof(scalar_t)), STREAM, [&] { dropout_strided_typed<STREAM, scalar_t>(c); });
  });
}

void bias_dropout_add(const DropoutCall& c) {
  FUSEDOPT_DISPATCH_FLOATING(c.dtype, "bias_dropout_add", [&] {
    FUSEDOPT_BOOL_SWITCH(streams(c.y, c.x, c.n, sizeof(scalar_t)), STREAM,
                         [&] { bias_dropout_add_typed<scalar_t, STREAM>(c); });
  });
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
  for_each_group<false>(c, std::array<Walk, 0>{}, [&](int64_t q, uint64_t bits) {
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
