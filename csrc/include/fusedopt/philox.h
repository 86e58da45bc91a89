#pragma once
// Philox4x32-10 (Salmon et al., Random123), host+device, and the Bernoulli
// keep rule of DESIGN.md §6. One element's keep bit is a pure function of
// (seed, offset, element index), so every device, thread count, vector width
// and alignment draws the same mask.
#include <cstdint>

#include "fusedopt/fo.h"

namespace fusedopt {
namespace philox {

constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kKeyInc0 = 0x9E3779B9u;
constexpr uint32_t kKeyInc1 = 0xBB67AE85u;

struct Words {
  uint32_t w[4];
};

// One round with the round key (k0, k1).
FUSEDOPT_HD inline Words round(const Words& c, uint32_t k0, uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(kMul0) * c.w[0];
  const uint64_t p1 = static_cast<uint64_t>(kMul1) * c.w[2];
  const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
  const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
  return Words{{hi1 ^ c.w[1] ^ k0, lo1, hi0 ^ c.w[3] ^ k1, lo0}};
}

// Round r's key: the seed's words plus r times the key increments.
FUSEDOPT_HD inline uint32_t round_key0(uint32_t k0, int r) { return k0 + static_cast<uint32_t>(r) * kKeyInc0; }
FUSEDOPT_HD inline uint32_t round_key1(uint32_t k1, int r) { return k1 + static_cast<uint32_t>(r) * kKeyInc1; }

FUSEDOPT_HD inline Words philox4x32_10(Words c, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) c = round(c, round_key0(k0, r), round_key1(k1, r));
  return c;
}

// The four words that cover elements [4g, 4g + 4) of the draw (seed, offset).
FUSEDOPT_HD inline Words block(uint64_t seed, uint64_t offset, uint64_t g) {
  return philox4x32_10(
      Words{{static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32),
             static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)}},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Keep iff word < threshold, threshold = min(round(r * 2^32), 2^32), computed
// on the host as an integer, so P(keep) = threshold / 2^32 exactly.
inline uint64_t keep_threshold(double keep_prob) {
  const double t = std::nearbyint(keep_prob * 4294967296.0);
  return t >= 4294967296.0 ? (uint64_t(1) << 32) : static_cast<uint64_t>(t < 0 ? 0 : t);
}

FUSEDOPT_HD inline bool keep(uint32_t word, uint64_t threshold) {
  return static_cast<uint64_t>(word) < threshold;
}

// Keep bit of element i of the draw (seed, offset).
FUSEDOPT_HD inline bool keep_element(uint64_t seed, uint64_t offset, uint64_t i, uint64_t threshold) {
  return keep(block(seed, offset, i >> 2).w[i & 3], threshold);
}

// Keep bits of the G consecutive elements i .. i + G - 1 of the draw (seed,
// offset), bit e for element i + e: a gradient mask's group (i counted in the
// whole parameter, Note [Shard offsets]), a run of a strided dropout. G % 4 ==
// 0: G / 4 Philox blocks, and one more when i does not start a block.
template <int G>
FUSEDOPT_HD inline uint32_t keep_run(uint64_t seed, uint64_t offset, uint64_t threshold, uint64_t i) {
  static_assert(G % 4 == 0 && G <= 28, "a run is whole Philox blocks, its bits one word");
  const int lag = static_cast<int>(i & 3);
  uint32_t bits = 0;
  FUSEDOPT_UNROLL
  for (int b = 0; b <= G / 4; ++b) {
    if (b == G / 4 && lag == 0) break;
    const Words w = block(seed, offset, (i >> 2) + b);
    FUSEDOPT_UNROLL
    for (int k = 0; k < 4; ++k) bits |= static_cast<uint32_t>(keep(w.w[k], threshold)) << (4 * b + k);
  }
  return bits >> lag;
}

// Note [Gradient mask stream]
// Gradient masking in the optimizers draws element i of parameter j at step t
// (1-based) from the stream offset t * 2^24 + j: masks differ per step and per
// parameter and never share a Philox counter with each other.
FUSEDOPT_HD inline uint64_t grad_mask_offset(int64_t step, int64_t index) {
  return (static_cast<uint64_t>(step) << 24) + static_cast<uint64_t>(index);
}

// Note [Shard offsets]
// A tensor of an optimizer call may be a shard of a larger parameter (FSDP2's
// fully_shard leaves each rank a dim-0 slice of every parameter): its element
// i is element base + i of the whole parameter, base being the op's
// shard_offsets[j] (0 when not given). Element i draws its mask and rounding
// bits as element base + i, so sharded training draws the masks of unsharded
// training on any number of ranks. A shard may start anywhere: off a Philox
// block (4 mask or 8 rounding elements) and off a CPU draw span. The kernels
// then draw from the block that holds the shard's first element and shift
// the bits into place (Note [Draw spans] in csrc/cpu/loop.h; mta::keep_bits
// and mta::rounding_bits for CUDA).

// Note [Rounding stream]
// The random bits of stochastic rounding (Note [Stochastic rounding] in
// fusedopt/math/round.h) for parameter j at step t come from the same key
// (grad_mask_seed) at stream offset 2^63 + t * 2^24 + j, read as 16-bit
// halves, low half first: element i takes half i % 2 of word i / 2 (word w
// of block g being word 4g + w), so one Philox block rounds 8 elements. The
// offsets of the mask streams stay below 2^63 for any step below 2^39, so the
// two never share a counter and a masked, stochastically rounded step draws
// independent numbers for both.
FUSEDOPT_HD inline uint64_t rounding_offset(int64_t step, int64_t index) {
  return grad_mask_offset(step, index) | (uint64_t(1) << 63);
}

}  // namespace philox
}  // namespace fusedopt
