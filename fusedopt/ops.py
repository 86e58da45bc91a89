"""Typed wrappers over torch.ops.fusedopt.* and their fake (meta) implementations.

The schemas live in csrc/registration.cpp. Every optimizer op updates its lists in place and returns None:

    params, grads, <state lists>, steps, indices, *, lr, <rule options>, <common options>

`lr` is a float, or a one-element float32/float64 tensor (on the CPU, or on the params' CUDA device, where the
kernels read it: the `.tensor_lr` overload of each op, Note [Tensor lr] in csrc/include/fusedopt/calls.h); under
torch.compile a tensor lr is a graph input, so changing it recompiles nothing. Adam's betas may be tensors
too (its `.tensor_betas` overload, Note [Tensor betas]).
`steps` holds one scalar float32/float64 tensor per parameter (steps already taken; on the CPU for CPU
tensors, on the device otherwise), which the op advances unless `found_inf` is set. `indices[j]` is the
parameter's number in the optimizer's state_dict (the gradient mask and rounding streams); `shard_offsets[j]`,
where params[j] is a shard of a larger parameter (FSDP2), the index of its first element in that parameter, so
that its masks and rounding bits are those of the unsharded parameter (Note [Shard offsets] in
csrc/include/fusedopt/philox.h). A state list a
configuration does not use is passed empty. State lists hold the params' dtype, or float32 for float16/bfloat16
params (Note [State dtype] in csrc/include/fusedopt/checks.h); `stochastic_rounding` stores bfloat16 params
rounded stochastically (Note [Stochastic rounding] in csrc/include/fusedopt/math/round.h). The fakes let
torch.compile trace the ops: they only check list lengths. In eager mode the wrappers call the ops from C++
without boxing their lists (Note [Direct calls] in csrc/module.cpp); under torch.compile, through torch.ops.
"""
from typing import Optional, Union

import torch
from torch import Tensor

import fusedopt._ext  # noqa: F401  (loads the library that defines torch.ops.fusedopt)
from fusedopt import _C

__all__ = ["adagrad_", "adam_", "rmsprop_", "sgd_", "stream_"]


def _call(packet, name, lists, options, overload=None):
    """The op `packet` on (lists, options), its `.tensor_lr` overload for a tensor lr (or the `overload` named):
    called from C++ without boxing its lists (Note [Direct calls] in csrc/module.cpp), or through torch.ops
    under torch.compile and wherever the direct call declines (tensor subclasses, torch function modes, other
    Python types)."""
    if overload is None and isinstance(options["lr"], Tensor):
        overload = "tensor_lr"
    if torch.compiler.is_compiling() or _C._call(f"{name}.{overload}" if overload else name, lists,
                                                 options) is NotImplemented:
        getattr(packet, overload or "default")(*lists, **options)


def sgd_(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], steps: list[Tensor],
         indices: list[int], *, lr: Union[float, Tensor], momentum: float = 0.0, dampening: float = 0.0,
         nesterov: bool = False, ema_momentum: bool = False, weight_decay: float = 0.0, l1_decay: float = 0.0,
         decoupled_weight_decay: bool = False, maximize: bool = False, grad_keep_prob: float = 1.0,
         grad_mask_seed: int = 0, stochastic_rounding: bool = False, shard_offsets: Optional[list[int]] = None,
         grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
    """SGD; momentum_buffers is empty when momentum == 0."""
    if params:  # with no tensor at all the dispatcher finds no kernel
        _call(torch.ops.fusedopt.sgd_, "sgd_", (params, grads, momentum_buffers, steps, indices), dict(
            lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, ema_momentum=ema_momentum,
            weight_decay=weight_decay, l1_decay=l1_decay, decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize, grad_keep_prob=grad_keep_prob, grad_mask_seed=grad_mask_seed,
            stochastic_rounding=stochastic_rounding, shard_offsets=shard_offsets, grad_scale=grad_scale,
            found_inf=found_inf))


def adagrad_(params: list[Tensor], grads: list[Tensor], state_sums: list[Tensor], steps: list[Tensor],
             indices: list[int], *, lr: Union[float, Tensor], lr_decay: float = 0.0, eps: float = 1e-10,
             weight_decay: float = 0.0, l1_decay: float = 0.0, decoupled_weight_decay: bool = False,
             maximize: bool = False, grad_keep_prob: float = 1.0, grad_mask_seed: int = 0,
             stochastic_rounding: bool = False, shard_offsets: Optional[list[int]] = None,
             grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
    """Adagrad."""
    if params:  # with no tensor at all the dispatcher finds no kernel
        _call(torch.ops.fusedopt.adagrad_, "adagrad_", (params, grads, state_sums, steps, indices), dict(
            lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay, l1_decay=l1_decay,
            decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, grad_keep_prob=grad_keep_prob,
            grad_mask_seed=grad_mask_seed, stochastic_rounding=stochastic_rounding, shard_offsets=shard_offsets,
            grad_scale=grad_scale, found_inf=found_inf))


def rmsprop_(params: list[Tensor], grads: list[Tensor], square_avgs: list[Tensor], grad_avgs: list[Tensor],
             momentum_buffers: list[Tensor], steps: list[Tensor], indices: list[int], *, lr: Union[float, Tensor],
             alpha: float = 0.99, eps: float = 1e-8, momentum: float = 0.0, centered: bool = False,
             weight_decay: float = 0.0, l1_decay: float = 0.0, decoupled_weight_decay: bool = False,
             maximize: bool = False, grad_keep_prob: float = 1.0, grad_mask_seed: int = 0,
             stochastic_rounding: bool = False, shard_offsets: Optional[list[int]] = None,
             grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
    """RMSprop; grad_avgs is empty unless centered, momentum_buffers unless momentum > 0."""
    if params:  # with no tensor at all the dispatcher finds no kernel
        lists = (params, grads, square_avgs, grad_avgs, momentum_buffers, steps, indices)
        _call(torch.ops.fusedopt.rmsprop_, "rmsprop_", lists, dict(
            lr=lr, alpha=alpha, eps=eps, momentum=momentum, centered=centered, weight_decay=weight_decay,
            l1_decay=l1_decay, decoupled_weight_decay=decoupled_weight_decay, maximize=maximize,
            grad_keep_prob=grad_keep_prob, grad_mask_seed=grad_mask_seed, stochastic_rounding=stochastic_rounding,
            shard_offsets=shard_offsets, grad_scale=grad_scale, found_inf=found_inf))


def adam_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
          max_exp_avg_sqs: list[Tensor], steps: list[Tensor], indices: list[int], *, lr: Union[float, Tensor],
          beta1: Union[float, Tensor] = 0.9, beta2: Union[float, Tensor] = 0.999, eps: float = 1e-8, amsgrad: bool = False,
          eps_inside_sqrt: bool = False, weight_decay: float = 0.0, l1_decay: float = 0.0,
          decoupled_weight_decay: bool = False, maximize: bool = False, grad_keep_prob: float = 1.0,
          grad_mask_seed: int = 0, stochastic_rounding: bool = False, shard_offsets: Optional[list[int]] = None,
          grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
    """Adam / AdamW (decoupled_weight_decay=True); max_exp_avg_sqs is empty unless amsgrad. With a tensor beta,
    the `.tensor_betas` overload, which takes lr and both betas as tensors (Note [Tensor betas] in
    csrc/include/fusedopt/calls.h): the float ones become float64 CPU tensors, read on the host as floats."""
    if params:  # with no tensor at all the dispatcher finds no kernel
        lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, indices)
        overload = None
        if isinstance(beta1, Tensor) or isinstance(beta2, Tensor):
            overload = "tensor_betas"
            lr, beta1, beta2 = (x if isinstance(x, Tensor) else torch.tensor(x, dtype=torch.float64)
                                for x in (lr, beta1, beta2))
        _call(torch.ops.fusedopt.adam_, "adam_", lists, overload=overload, options=dict(
            lr=lr, beta1=beta1, beta2=beta2, eps=eps, amsgrad=amsgrad, eps_inside_sqrt=eps_inside_sqrt,
            weight_decay=weight_decay, l1_decay=l1_decay, decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize, grad_keep_prob=grad_keep_prob, grad_mask_seed=grad_mask_seed,
            stochastic_rounding=stochastic_rounding, shard_offsets=shard_offsets, grad_scale=grad_scale,
            found_inf=found_inf))


def stream_(a: Tensor, b: Tensor, s: float) -> None:
    """a += s·b over contiguous float32 tensors of one size: the benchmark's bandwidth yardstick."""
    torch.ops.fusedopt.stream_(a, b, s)


def _fake(op: str, n_states: int):
    """The fake of an optimizer op with `n_states` state lists: it writes nothing, it checks list lengths."""

    def fake(params, grads, *lists, **options):
        *states, steps, indices = lists
        if len(states) != n_states:
            raise RuntimeError(f"{op}: expected {n_states} state lists, got {len(states)}")
        n = len(params)
        counted = [("grads", grads), ("steps", steps), ("indices", indices)]
        if options.get("shard_offsets") is not None:
            counted.append(("shard_offsets", options["shard_offsets"]))
        for name, got in counted:
            if len(got) != n:
                raise RuntimeError(f"{op}: got {n} params but {len(got)} {name}")
        for i, state in enumerate(states):
            if len(state) not in (0, n):
                raise RuntimeError(f"{op}: state list {i} must hold 0 or {n} tensors, got {len(state)}")

    return fake


for _op, _n in [("sgd_", 1), ("adagrad_", 1), ("rmsprop_", 3), ("adam_", 3)]:
    torch.library.register_fake(f"fusedopt::{_op}", _fake(_op, _n))
    torch.library.register_fake(f"fusedopt::{_op}.tensor_lr", _fake(_op, _n))
torch.library.register_fake("fusedopt::adam_.tensor_betas", _fake("adam_", 3))


@torch.library.register_fake("fusedopt::stream_")
def _stream_fake(a, b, s):
    if a.numel() != b.numel():
        raise RuntimeError("stream_: expected contiguous tensors of equal size")
