"""Pure-Python spec of fusedopt (DESIGN.md §4 and §6): the update rules and the Philox Bernoulli mask.

Needs only torch and numpy, never the compiled extension."""
from .optim import adagrad_step, adam_step, rmsprop_step, sgd_step
from .philox import (PHILOX_M0, PHILOX_M1, PHILOX_ROUNDS, PHILOX_W0, PHILOX_W1, keep_mask, keep_threshold,
                     philox4x32_10, words)
from .rounding import bf16_bits_stochastic, round_stochastic, rounding_bits, rounding_offset

__all__ = ["PHILOX_M0", "PHILOX_M1", "PHILOX_ROUNDS", "PHILOX_W0", "PHILOX_W1", "adagrad_step", "adam_step",
           "bf16_bits_stochastic", "keep_mask", "keep_threshold", "philox4x32_10", "rmsprop_step",
           "round_stochastic", "rounding_bits", "rounding_offset", "sgd_step", "words"]
