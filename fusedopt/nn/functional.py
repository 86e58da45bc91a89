"""Dropout whose mask is the same on every device and costs no memory (DESIGN.md §6).

Element i (row-major logical index) of a draw (seed, offset) is kept iff word i & 3 of
Philox4x32-10(counter = (i >> 2, offset), key = seed) is below round((1 - p)·2^32): a pure function of
(seed, offset, i), so the CPU and CUDA kernels, any thread count and any grid draw the same mask, and the
backward regenerates it from (p, seed, offset) instead of saving it. `fusedopt.reference.keep_mask` is the
same mask in numpy.

Kept elements are scaled by 1/(1 - p) (inverted dropout: evaluation needs no rescaling):
y = x·m with m = keep ? float(1/(1 - p)) : 0, in float32 for float32/float16/bfloat16 (float64 for float64),
rounded once to the input's dtype. For float32 this is bit for bit torch's CPU native_dropout given the
same mask. The output has the strides torch's dropout gives it (the input's where the input is dense, e.g.
channels_last; else contiguous); the mask follows the logical index whatever the strides.

Without an explicit `seed`, every call draws a fresh (seed, offset) from torch's default CPU generator
(two 64-bit outputs; also for CUDA inputs), so `torch.manual_seed` makes runs reproducible and a CPU and a
CUDA run of one program draw the same masks. Under torch.compile that draw stays in the graph as a random
op, in program order: a compiled module draws the masks eager mode draws, without graph breaks.
"""
import numbers
import operator
from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.overrides import handle_torch_function, has_torch_function, has_torch_function_unary

from ._ops import DropoutInplace, DropoutMask, _check_bias_shapes  # (also registers the fakes and autograd of the ops)

__all__ = ["bias_dropout_add", "dropout", "dropout_keep_bits", "unpack_keep_bits"]

_ops_ns = torch.ops.fusedopt


def _check_p(p) -> float:
    """p as a float, validated as torch.nn.functional.dropout does (NaN and bool are refused too)."""
    if isinstance(p, Tensor) and p.dim() == 0:  # torch takes a 0-d tensor too
        p = p.item()
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"dropout probability must be a number, got {type(p).__name__}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    return float(p)


def _int64(v, name: str) -> int:
    """A 64-bit word given as any int in [-2^63, 2^64), as the op's signed int64 (two's complement)."""
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        v = operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(v).__name__}") from None
    if not -(2**63) <= v < 2**64:
        raise ValueError(f"{name} must lie in [-2^63, 2^64), got {v}")
    return v - 2**64 if v >= 2**63 else v


# Draws taken by dropout_seed so far: its increment chains the calls in program order (Note [Dropout draw]).
_DRAWS = torch.zeros((), dtype=torch.int64)


def _random(seed, p) -> bool:
    """Whether the mask is drawn from torch's generator: without a seed, for 0 < p < 1 (p = 0 and p = 1 keep or
    drop everything whatever the draw, so they take nothing from it, as torch's dropout takes nothing then)."""
    return seed is None and 0.0 < p < 1.0


def _draw(seed, offset, p, device) -> Tensor:
    """The draw tensor (seed, offset): the given words, or a fresh pair from torch's default CPU generator
    where the mask is random. The ops read a draw on the host (Note [Dropout draw] in
    csrc/include/fusedopt/dropout.h), so a CUDA graph would replay the mask drawn at its capture on every
    replay: a random mask is refused while the current CUDA stream is capturing."""
    if seed is None:
        if offset is not None:
            raise ValueError("offset given without a seed")
        if not _random(seed, p):
            return torch.zeros(2, dtype=torch.int64)
        if device.type == "cuda" and not torch.compiler.is_compiling() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "fusedopt dropout: the current CUDA stream is capturing a graph, and fusedopt draws its mask's "
                "(seed, offset) on the host, so every replay would apply the mask drawn at capture. Leave the "
                "dropout out of the captured region, or pass seed= (and offset=) to replay that fixed mask on "
                "purpose")
        return _ops_ns.dropout_seed(_DRAWS)
    return torch.tensor([_int64(seed, "seed"), _int64(0 if offset is None else offset, "offset")],
                        dtype=torch.int64)


def _transformed() -> bool:
    """Under torch.func transforms or forward-mode AD, which the ops' registered autograd does not support."""
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


# Run eagerly under torch.compile, whose tracing of an autograd.Function would skip its vmap rule.
_mask = torch.compiler.disable(DropoutMask.apply)


def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
            seed: Optional[int] = None, offset: Optional[int] = None) -> Tensor:
    """Drop each element with probability p and scale the rest by 1/(1 - p); identity when not training.

    A drop-in for torch.nn.functional.dropout (same arguments and errors; `input` itself returned when not
    training, for p = 0 and for an empty input; nothing drawn for p = 0 or 1; inplace=True overwrites `input`
    without allocating anything and saves no mask), plus the draw: `seed` and `offset` (64-bit ints; offset
    defaults to 0) pick the mask, else a fresh draw is taken from torch's default CPU generator. float32,
    float64, float16 and bfloat16 inputs of any shape.
    """
    if has_torch_function_unary(input):  # e.g. torch.fx tracing: the call, hence the draw, goes in the graph
        return handle_torch_function(dropout, (input,), input, p, training, inplace, seed=seed, offset=offset)
    p = _check_p(p)
    if not training or p == 0.0 or input.numel() == 0:  # torch's dropout returns the input itself then
        return input
    draw = _draw(seed, offset, p, input.device)
    if _transformed():
        y = (input * _mask(input.detach(), p, draw, _random(seed, p))).to(input.dtype)
        return input.copy_(y) if inplace else y
    if inplace:
        return DropoutInplace.apply(input, p, draw)
    return _ops_ns.dropout(input, p, draw)


def bias_dropout_add(x: Tensor, bias: Tensor, residual: Tensor, p: float = 0.5, training: bool = True, *,
                     seed: Optional[int] = None, offset: Optional[int] = None) -> Tensor:
    """residual + dropout(x + bias, p) in one pass (the transformer block's epilogue).

    `bias` has shape [x.shape[-1]], `residual` x's shape, all three one dtype and device. The sum x + bias
    is not rounded to the storage type before the mask (it stays float32 for half types). When not training:
    residual + (x + bias). Gradients: dx = dropout's backward, dbias = dx summed over all but the last dim
    (in a fixed order, so it does not depend on the thread count), dresidual = the incoming gradient.
    """
    if has_torch_function((x, bias, residual)):
        return handle_torch_function(bias_dropout_add, (x, bias, residual), x, bias, residual, p, training, seed=seed,
                                     offset=offset)
    p = _check_p(p)
    if not training:
        return residual + (x + bias)
    draw = _draw(seed, offset, p, x.device)
    if _transformed():
        _check_bias_shapes(x, bias, residual)
        m = _mask(x.detach(), p, draw, _random(seed, p))
        return (residual + (x.to(m.dtype) + bias) * m).to(x.dtype)
    return _ops_ns.bias_dropout_add(x, bias, residual, p, draw)


def dropout_keep_bits(input: Tensor, p: float, *, seed: int, offset: int = 0) -> Tensor:
    """The keep mask dropout(input, p, seed=seed, offset=offset) applies, packed 1 bit per element.

    A uint8 tensor of ceil(input.numel() / 8) bytes on input's device; bit k (value 2^k, little-endian bit
    order) of byte j is 1 iff element 8j + k (row-major logical index) is kept. Bits past numel are 0.
    Equals numpy.packbits(fusedopt.reference.keep_mask(seed, offset, numel, 1 - p), bitorder="little").
    """
    p = _check_p(p)
    return _ops_ns.dropout_keep_bits(input, p, _draw(seed, offset, p, input.device))


def unpack_keep_bits(bits: Tensor, numel: int) -> Tensor:
    """The bool mask of `numel` elements packed by dropout_keep_bits."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    return ((bits.unsqueeze(-1) >> shifts) & 1).bool().reshape(-1)[:numel]
