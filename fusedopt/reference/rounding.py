"""Stochastic rounding of float32 values to bfloat16 (Note [Stochastic rounding] in
csrc/include/fusedopt/math/round.h), in numpy.

A value x becomes its upper bfloat16 neighbour with probability (x - lower) / (upper - lower), so the stored
value is x on average: a uniform 16-bit u is added to the low 16 bits of x's float32 bits and the result
truncated. Element i of parameter j at step t (1-based) takes u from the stream at offset 2^63 + t·2^24 + j
keyed by grad_mask_seed, read as 16-bit halves, low half first: half i % 2 of word i // 2 (Note [Rounding
stream] in csrc/include/fusedopt/philox.h).
"""
import numpy as np

from .philox import words


def rounding_offset(step: int, index: int) -> int:
    """The stream offset of parameter `index`'s rounding words at 1-based step `step`."""
    return ((step << 24) + index) % 2**64 | 2**63


def rounding_bits(seed: int, step: int, index: int, n: int) -> np.ndarray:
    """u (uint16) of elements 0..n-1 of parameter `index` at 1-based step `step`."""
    w = words(seed, rounding_offset(step, index), (n + 1) // 2).astype("<u4")
    return w.view("<u2")[:n]


def bf16_bits_stochastic(x: np.ndarray, u: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) of float32 x rounded with u in [0, 2^16); a NaN becomes 0x7FC0, as in torch's
    round-to-nearest conversion."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    out = ((b + u.astype(np.uint64)) >> np.uint64(16)).astype(np.uint16)
    nan = (b & 0x7FFFFFFF) > 0x7F800000
    out[nan] = 0x7FC0
    return out


def round_stochastic(x, seed: int, step: int, index: int):
    """float32 tensor x (a parameter's new value, row-major) rounded to bfloat16 as the op with
    stochastic_rounding=True stores it."""
    import torch

    flat = x.detach().reshape(-1).to(torch.float32).numpy()
    bits = bf16_bits_stochastic(flat, rounding_bits(seed, step, index, flat.size))
    return torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).reshape(x.shape)
