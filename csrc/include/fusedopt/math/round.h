#pragma once
// Rounding an op-math parameter back to bfloat16 stochastically.
//
// Note [Stochastic rounding]
// A bf16 parameter keeps 8 significant bits, so an update smaller than half
// its ulp (lr·m/√v of 1e-4 on a weight of 1) is rounded away by
// round-to-nearest on every step: training stalls. With
// `stochastic_rounding` the op stores the new fp32 value x as one of its two
// bf16 neighbours, the upper one with probability equal to x's distance from
// the lower one in units of their gap, so the stored value is x on average
// (the rounding error has mean zero) and small updates accumulate in
// expectation. That is: add a uniform 16-bit number u to the low half of x's
// bits and truncate, bits(x) + u >> 16. Adding to the magnitude bits rounds
// the magnitude, so the sign is kept and the rule is the same for negative
// x; a value above the largest finite bf16 may round up to inf, as
// round-to-nearest would; ±inf stays inf (its low half is 0); a NaN becomes
// 0x7FC0, the NaN c10's scalar bf16 conversion stores, whatever its sign
// and payload. Every bf16 value is a fixed point (its low half is 0, so
// nothing carries). u is element i's 16 bits of the rounding stream (Note
// [Rounding stream] in fusedopt/philox.h), so the rounded bits are a pure
// function of (seed, step, parameter index, element index): the same on
// every device, thread count and vector width.
#include <cstdint>
#include <cstring>

#include "fusedopt/fo.h"

namespace fusedopt {
namespace math {

// The bf16 bits of x rounded with the random u in [0, 2^16).
FUSEDOPT_HD inline uint16_t bf16_bits_stochastic(float x, uint32_t u) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  if ((b & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
  return static_cast<uint16_t>((b + u) >> 16);
}

}  // namespace math
}  // namespace fusedopt
