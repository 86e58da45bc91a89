#pragma once
// Philox4x32-10 on CPU vectors, and the keep bits of a Bernoulli draw
// (DESIGN.md §6) built from it. Compiled once per ISA (Note [Per-ISA CPU
// kernels]): AVX512 runs 16 counters at once, AVX2 8, DEFAULT the scalar
// philox::block. Every path yields the bits of the scalar definition in
// fusedopt/philox.h; tests/test_dropout.py checks each ISA against the
// known answers and the numpy reference.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>

#include "fusedopt/philox.h"
#include "vec.h"

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace fusedopt {
namespace cpu {
namespace CPU_CAPABILITY {

// A Bernoulli draw: key, stream offset and keep threshold T ∈ [0, 2^32].
struct Draw {
  uint64_t seed = 0, offset = 0, threshold = 0;
};

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)

// Note [Vector Philox]
// One lane per counter. The 32x32 -> 64-bit products of a round come from
// mul_epu32, which multiplies the even 32-bit lanes only: the odd lanes are
// shifted down and multiplied separately, and the high and low halves go back
// into 32-bit lanes (AVX512: two masked shuffles; AVX2: a blend for the high
// halves, mullo for the low ones). The key is the same in every lane, so its
// ten round values are broadcasts, made once per draw. Zen 4 runs 16 counters
// in ~3.4 cycles each, within ~35% of its bound of one 512-bit multiply per
// cycle (four per round).
//
// Element order. Output word w of counter g is element 4g + w. A 4x4
// transpose inside each 128-bit lane (unpack epi32, then epi64) turns the
// four word vectors into vectors of consecutive elements if lane 4L + q (L the
// 128-bit lane, q the position in it) carries counter g0 + q·nL + L, nL being
// the number of 128-bit lanes: vector q of the transpose then holds counters
// g0 + q·nL .. g0 + q·nL + nL - 1, i.e. elements 4·(g0 + q·nL) onwards.
#if defined(CPU_CAPABILITY_AVX512)
using VI = __m512i;
constexpr int kLanes = 16;
inline VI set1(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }
// Low counter words g0 + lane offset (Note [Vector Philox]); g0 % kLanes == 0.
inline VI counters(uint32_t g0) {
  return _mm512_or_si512(set1(g0), _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
}
// The halves go back with one masked in-lane shuffle each: dwords (1, 1, 3, 3)
// of the even products fill the even lanes of `hi`, dwords (0, 0, 2, 2) of the
// odd products the odd lanes of `lo`.
inline void mulhilo(const VI& m, const VI& a, VI& hi, VI& lo) {
  const VI even = _mm512_mul_epu32(a, m);
  const VI odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_DDBB);
  lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CCAA);
}
inline VI xor2(const VI& a, const VI& b) { return _mm512_xor_si512(a, b); }
inline VI xor3(const VI& a, const VI& b, const VI& c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
inline VI unpacklo32(const VI& a, const VI& b) { return _mm512_unpacklo_epi32(a, b); }
inline VI unpackhi32(const VI& a, const VI& b) { return _mm512_unpackhi_epi32(a, b); }
inline VI unpacklo64(const VI& a, const VI& b) { return _mm512_unpacklo_epi64(a, b); }
inline VI unpackhi64(const VI& a, const VI& b) { return _mm512_unpackhi_epi64(a, b); }
inline VI loadu(const uint32_t* p) { return _mm512_loadu_si512(p); }
inline void storeu(void* p, const VI& v) { _mm512_storeu_si512(p, v); }
// Bit k set iff lane k < T, for T = last + 1 (callers handle T = 0).
inline uint64_t below(const VI& w, const VI& last) {
  return static_cast<uint64_t>(_mm512_cmple_epu32_mask(w, last));
}
#else
using VI = __m256i;
constexpr int kLanes = 8;
inline VI set1(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }
inline VI counters(uint32_t g0) { return _mm256_or_si256(set1(g0), _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7)); }
inline void mulhilo(const VI& m, const VI& a, VI& hi, VI& lo) {
  const VI even = _mm256_mul_epu32(a, m);
  const VI odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_mullo_epi32(a, m);
}
inline VI xor2(const VI& a, const VI& b) { return _mm256_xor_si256(a, b); }
inline VI xor3(const VI& a, const VI& b, const VI& c) { return xor2(xor2(a, b), c); }
inline VI unpacklo32(const VI& a, const VI& b) { return _mm256_unpacklo_epi32(a, b); }
inline VI unpackhi32(const VI& a, const VI& b) { return _mm256_unpackhi_epi32(a, b); }
inline VI unpacklo64(const VI& a, const VI& b) { return _mm256_unpacklo_epi64(a, b); }
inline VI unpackhi64(const VI& a, const VI& b) { return _mm256_unpackhi_epi64(a, b); }
inline VI loadu(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline void storeu(void* p, const VI& v) { _mm256_storeu_si256(static_cast<__m256i*>(p), v); }
// AVX2 has no unsigned compare: w <= last iff min(w, last) == w.
inline uint64_t below(const VI& w, const VI& last) {
  const VI le = _mm256_cmpeq_epi32(_mm256_min_epu32(w, last), w);
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(le)));
}
#endif

// The ten round keys of a seed, broadcast, and the seed's words.
struct RoundKeys {
  uint32_t a, b;  // seed low, seed high: round r's key is (round_key0(a, r), round_key1(b, r))
  VI k0[10], k1[10];
  explicit RoundKeys(uint64_t seed) : a(static_cast<uint32_t>(seed)), b(static_cast<uint32_t>(seed >> 32)) {
    for (int r = 0; r < 10; ++r) {
      k0[r] = set1(philox::round_key0(a, r));
      k1[r] = set1(philox::round_key1(b, r));
    }
  }
};

// Philox rounds R0 .. 9 on P vectors of kLanes counters (c[p][0..3] =
// counter words) in place. A round is a chain mul -> shuffle -> xor, so one
// vector alone leaves the pipes idle; P independent vectors interleave.
template <int P, int R0 = 0>
inline void philox_rounds(VI (&c)[P][4], const RoundKeys& k) {
  const VI m0 = set1(philox::kMul0), m1 = set1(philox::kMul1);
  for (int r = R0; r < 10; ++r) {
    for (int p = 0; p < P; ++p) {
      VI hi0, lo0, hi1, lo1;
      mulhilo(m0, c[p][0], hi0, lo0);
      mulhilo(m1, c[p][2], hi1, lo1);
      c[p][0] = xor3(hi1, c[p][1], k.k0[r]);
      c[p][1] = lo1;
      c[p][2] = xor3(hi0, c[p][3], k.k1[r]);
      c[p][3] = lo0;
    }
  }
}

// Vectors drawn together, and the 64-element groups they cover. Measured on
// one core: AVX512 on Zen 4, 16M elements: 7.0 ms for 1 vector, 5.7 for 2,
// 5.2 for 4, more spill; AVX2 on Zen 3 (16 registers: 4 vectors spill some of
// their state), 32M elements, alternating runs: 19.7-20.7 ms for 2, 17.4-18.7
// for 3, 16.5-17.7 for 4.
constexpr int kVectors = 4;
constexpr int kBatch = kVectors * kLanes / 16;

#else
constexpr int kBatch = 1;
#endif

// The keep bits of a draw, kBatch 64-element groups at a time, with the
// draw's constants (round keys, threshold) prepared once.
class Keeper {
 public:
  explicit Keeper(const Draw& d)
      : d_(d)
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
        ,
        keys_(d.seed),
        head_(keys_, d.offset, 0),
        last_(set1(static_cast<uint32_t>(d.threshold - 1)))
#endif
  {
  }

  // out[j] bit k = keep of element 64·(q0 + j) + k, for j < kBatch.
  void batch(uint64_t q0, uint64_t* out) const {
    for (int j = 0; j < kBatch; ++j) out[j] = 0;
    if (d_.threshold == 0) return;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    // Vector v covers counters 16·q0 + v·kLanes onwards: 4·kLanes elements of group q0 + v·kLanes/16, from
    // bit 4·kLanes·v mod 64. T ≥ 1 here.
    VI w[kVectors][4];
    words(q0, w);
    for (int v = 0; v < kVectors; ++v) {
      const uint64_t b = below(w[v][0], last_) | below(w[v][1], last_) << kLanes |
                         below(w[v][2], last_) << (2 * kLanes) | below(w[v][3], last_) << (3 * kLanes);
      out[v * kLanes / 16] |= b << (4 * kLanes * v % 64);
    }
#else
    static_assert(kBatch == 1);
    uint32_t w[64];
    words(q0, w);
    for (int e = 0; e < 64; ++e) out[0] |= uint64_t(philox::keep(w[e], d_.threshold)) << e;
#endif
  }

  // Writes the words of elements 64·q0 .. 64·(q0 + kBatch) − 1 (the raw
  // words the keep bits above compare with the threshold) to the 256·kBatch
  // bytes at `out`, in element order, as the host stores uint32s.
  void words(uint64_t q0, void* out) const {
    char* bytes = static_cast<char*>(out);
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    VI w[kVectors][4];
    words(q0, w);
    for (int v = 0; v < kVectors; ++v)
      for (int q = 0; q < 4; ++q) storeu(bytes + 4 * (4 * kLanes * v + q * kLanes), w[v][q]);
#else
    for (int k = 0; k < 16; ++k) {
      const philox::Words w = philox::block(d_.seed, d_.offset, 16 * q0 + k);
      std::memcpy(bytes + 16 * k, w.w, sizeof(w.w));
    }
#endif
  }

 private:
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  // The words of counters 16·q0 .. 16·q0 + kVectors·kLanes − 1 (a multiple of
  // kLanes, so the low counter word never carries inside a vector), as
  // vectors of consecutive elements (Note [Vector Philox]): w[v][q] holds
  // elements 64·q0 + 4·kLanes·v + q·kLanes onwards.
  //
  // Note [Uniform counter words]
  // Of a vector's counters (x, h, offset low, offset high) only the low word x
  // differs between lanes. A round multiplies words 0 and 2 and XORs the rest
  // in, so with each word split into a lane-uniform part and a lane part
  // (their XOR), the first round of (x, h, o0, o1) is the first round of
  // (0, h, o0, o1) with (0, 0, hi(M0·x), lo(M0·x)) XORed in, and the second
  // round's product of word 0 is uniform too. So the first two rounds multiply
  // one vector each, not two; the uniform parts are scalar rounds of the x = 0
  // counter (philox::round, the definition itself), made once per draw for
  // h = 0 (every element below 2^34) and per vector otherwise. The bits are
  // unchanged (the known-answer and reference tests of every ISA). Measured
  // here, one core, keep bits of 32M elements (a standalone loop over
  // Keeper::batch, alternating builds): AVX2 28.2 -> 25.5 ms, AVX512 14.2 ->
  // 13.8 ms, which is bound by other work than the multiplies.
  struct Head {
    uint32_t h;
    VI x2, x0, y2, y3;  // XORed into the first round's word 2 and the second's words 0 and 2; the second's word 3
    Head(const RoundKeys& k, uint64_t offset, uint32_t h_) : h(h_) {
      const philox::Words u1 = philox::round(
          philox::Words{{0, h, static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)}}, k.a, k.b);
      const philox::Words u2 = philox::round(u1, philox::round_key0(k.a, 1), philox::round_key1(k.b, 1));
      x2 = set1(u1.w[2]);
      x0 = set1(u1.w[1] ^ philox::round_key0(k.a, 1));
      y2 = set1(u2.w[2]);
      y3 = set1(u2.w[3]);
    }
  };

  // The first two rounds of the counters (x + lane, h, offset) (Note [Uniform counter words]).
  static void head_rounds(const VI& x, const Head& u, VI (&c)[4]) {
    VI hi0, lo0, hi1, lo1;
    mulhilo(set1(philox::kMul0), x, hi0, lo0);
    mulhilo(set1(philox::kMul1), xor2(hi0, u.x2), hi1, lo1);
    c[0] = xor2(hi1, u.x0);
    c[1] = lo1;
    c[2] = xor2(lo0, u.y2);
    c[3] = u.y3;
  }

  void words(uint64_t q0, VI (&w)[kVectors][4]) const {
    VI c[kVectors][4];
    for (int v = 0; v < kVectors; ++v) {
      const uint64_t g0 = 16 * q0 + static_cast<uint64_t>(v) * kLanes;
      const uint32_t h = static_cast<uint32_t>(g0 >> 32);
      head_rounds(counters(static_cast<uint32_t>(g0)), h == head_.h ? head_ : Head(keys_, d_.offset, h), c[v]);
    }
    philox_rounds<kVectors, 2>(c, keys_);
    for (int v = 0; v < kVectors; ++v) {
      const VI t0 = unpacklo32(c[v][0], c[v][1]), t1 = unpacklo32(c[v][2], c[v][3]);
      const VI t2 = unpackhi32(c[v][0], c[v][1]), t3 = unpackhi32(c[v][2], c[v][3]);
      w[v][0] = unpacklo64(t0, t1);
      w[v][1] = unpackhi64(t0, t1);
      w[v][2] = unpacklo64(t2, t3);
      w[v][3] = unpackhi64(t2, t3);
    }
  }
#endif

  Draw d_;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  RoundKeys keys_;
  Head head_;  // h = 0
  VI last_;  // T - 1
#endif
};

// Philox4x32-10 of n arbitrary counters: out[4r + w] = word w for the counter
// words ctr[4r .. 4r + 3] and the key (seed low, seed high). A test hook for
// the vector rounds (known answers; counters that carry anywhere).
inline void philox_counters(const uint32_t* ctr, uint32_t* out, int64_t n, uint64_t seed) {
  int64_t r = 0;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  const RoundKeys keys(seed);
  for (; r + kLanes <= n; r += kLanes) {
    uint32_t cols[4][kLanes];
    for (int l = 0; l < kLanes; ++l)
      for (int w = 0; w < 4; ++w) cols[w][l] = ctr[4 * (r + l) + w];
    VI c[1][4] = {{loadu(cols[0]), loadu(cols[1]), loadu(cols[2]), loadu(cols[3])}};
    philox_rounds<1>(c, keys);
    for (int w = 0; w < 4; ++w) storeu(cols[w], c[0][w]);
    for (int l = 0; l < kLanes; ++l)
      for (int w = 0; w < 4; ++w) out[4 * (r + l) + w] = cols[w][l];
  }
#endif
  for (; r < n; ++r) {
    const philox::Words w = philox::philox4x32_10(
        philox::Words{{ctr[4 * r], ctr[4 * r + 1], ctr[4 * r + 2], ctr[4 * r + 3]}}, static_cast<uint32_t>(seed),
        static_cast<uint32_t>(seed >> 32));
    std::memcpy(out + 4 * r, w.w, sizeof(w.w));
  }
}

// The op-math vector whose lane k is `value` if bit k of `bits` is set, else 0.
template <typename S>
inline at::vec::Vectorized<S> keep_select(uint64_t bits, S value) {
  using V = at::vec::Vectorized<S>;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<S, float>)
    return V(_mm512_maskz_mov_ps(static_cast<__mmask16>(bits), _mm512_set1_ps(value)));
  else
    return V(_mm512_maskz_mov_pd(static_cast<__mmask8>(bits), _mm512_set1_pd(value)));
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<S, float>) {
    const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i on = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), sel), sel);
    return V(_mm256_and_ps(_mm256_castsi256_ps(on), _mm256_set1_ps(value)));
  } else {
    const __m256i sel = _mm256_setr_epi64x(1, 2, 4, 8);
    const __m256i on =
        _mm256_cmpeq_epi64(_mm256_and_si256(_mm256_set1_epi64x(static_cast<int64_t>(bits)), sel), sel);
    return V(_mm256_and_pd(_mm256_castsi256_pd(on), _mm256_set1_pd(value)));
  }
#else
  S lanes[V::size()];
  for (int k = 0; k < V::size(); ++k) lanes[k] = (bits >> k & 1) ? value : S(0);
  return V::loadu(lanes);
#endif
}

// Keep bits of an arbitrary run of elements, for a loop that walks a draw in
// order but not a batch at a time (Note [Strided walk]), drawn by a Keeper
// the caller holds. Two batches are cached, consecutive ones in different
// slots, so a run that straddles batches draws each once. A slot is tagged
// with its batch's index in the draw, so it stays right for any run of it.
class Batches {
 public:
  // Bits of elements [i, i + n), bit k = element i + k; n ≤ 64, so the run
  // touches two groups at most.
  uint64_t bits(const Keeper& k, uint64_t i, int n) {
    const uint64_t q = i >> 6;
    const int s = static_cast<int>(i & 63);
    uint64_t b = group(k, q) >> s;
    if (s + n > 64) b |= group(k, q + 1) << (64 - s);
    return n == 64 ? b : b & ((uint64_t(1) << n) - 1);
  }
  // The bits of group q, its batch drawn if it is not cached.
  uint64_t group(const Keeper& k, uint64_t q) {
    const uint64_t b = q / kBatch;
    Slot& s = slot_[b & 1];
    if (!s.valid || s.b != b) refill(k, s, b);
    return s.bits[q - b * kBatch];
  }

 private:
  struct Slot {
    uint64_t bits[kBatch] = {};
    uint64_t b = 0;  // batch index: groups [b·kBatch, (b + 1)·kBatch)
    bool valid = false;
  };
  // Out of line: the hot path is the cache hit above.
  __attribute__((noinline)) void refill(const Keeper& k, Slot& s, uint64_t b) {
    k.batch(b * kBatch, s.bits);
    s.b = b;
    s.valid = true;
  }

  Slot slot_[2];
};

// Batches with a Keeper of their own, made on first use, for the draw of
// that call (bias_dropout_add's backward, row by row).
class KeepCache {
 public:
  uint64_t bits(const Draw& d, uint64_t i, int n) {
    if (!keeper_) keeper_.emplace(d);
    return batches_.bits(*keeper_, i, n);
  }

 private:
  Batches batches_;
  std::optional<Keeper> keeper_;
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedopt
