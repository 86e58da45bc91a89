"""Philox4x32-10 (Salmon et al., Random123) and the Bernoulli keep mask of DESIGN.md §6, in numpy.

Vectorised over arrays of counters; words are held in uint64 so that the 32x32 -> 64-bit products are exact.
"""
import numpy as np

PHILOX_M0 = 0xD2511F53  # multiplies counter word 0
PHILOX_M1 = 0xCD9E8D57  # multiplies counter word 2
PHILOX_W0 = 0x9E3779B9  # key increments (golden ratio, sqrt(3) - 1)
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


def _mulhilo(m, x):
    p = np.uint64(m) * x
    return p >> _SHIFT32, p & _MASK32


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """The four output words (uint32 arrays) for counters (c0, c1, c2, c3) and key (k0, k1).

    Inputs are broadcastable arrays or ints holding 32-bit values."""
    c0, c1, c2, c3, k0, k1 = (np.asarray(x, dtype=np.uint64) for x in np.broadcast_arrays(c0, c1, c2, c3, k0, k1))
    for r in range(PHILOX_ROUNDS):
        if r:  # the key is bumped between rounds
            k0 = (k0 + np.uint64(PHILOX_W0)) & _MASK32
            k1 = (k1 + np.uint64(PHILOX_W1)) & _MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return tuple(c.astype(np.uint32) for c in (c0, c1, c2, c3))


def keep_threshold(r: float) -> int:
    """T = min(round(r·2^32), 2^32): a word w is kept iff w < T, so P(keep) = T / 2^32 exactly."""
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"keep probability must be in [0, 1], got {r}")
    return min(round(r * 2**32), 2**32)


def words(seed: int, offset: int, n: int, start: int = 0) -> np.ndarray:
    """The Philox words of elements start..start+n-1 of the stream (seed, offset), uint32.

    Element i: key = (seed low 32, seed high 32), counter = (g low, g high, offset low, offset high) with
    g = i >> 2, word i & 3 of the output."""
    seed %= 2**64
    offset %= 2**64
    g = np.arange(start // 4, (start + n + 3) // 4, dtype=np.uint64)
    out = philox4x32_10(g & _MASK32, g >> _SHIFT32, offset & 0xFFFFFFFF, offset >> 32, seed & 0xFFFFFFFF, seed >> 32)
    return np.stack(out, axis=-1).reshape(-1)[start % 4:start % 4 + n]  # element 4g + w: word w of counter g


def keep_mask(seed: int, offset: int, n: int, keep_prob: float, start: int = 0) -> np.ndarray:
    """Keep bits of elements start..start+n-1 (row-major logical index) of the draw (seed, offset), as a bool
    array: element i is kept iff its word (see `words`) < keep_threshold(keep_prob)."""
    return words(seed, offset, n, start).astype(np.int64) < keep_threshold(keep_prob)
