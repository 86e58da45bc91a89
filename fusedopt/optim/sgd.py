"""fusedopt.SGD: torch.optim.SGD's interface and state, one fused op call per device and dtype."""
import torch
from torch import Tensor

from fusedopt import ops

from ._base import FusedOptimizer


class SGD(FusedOptimizer):
    """torch.optim.SGD, plus the keyword-only options

    l1_decay (λ1), decoupled_weight_decay, grad_keep_prob, grad_mask_seed, state_dtype, bf16_stochastic_rounding: see
    fusedopt.Adam;
    ema_momentum: the course's form b ← μ·b + (1 − μ)·g from b₀ = 0, θ ← θ − lr·b (needs dampening=0,
    excludes nesterov).

    State: 'momentum_buffer' (momentum ≠ 0) as torch, plus 'step' (the gradient mask stream and the
    first-step seeding of the buffer need it; torch.optim.SGD ignores it when loading)."""

    _op = staticmethod(ops.sgd_)
    _step_required = False  # torch's SGD keeps no step (Note [Step tensors])

    def __init__(self, params, lr: float | Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float | Tensor = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None,
                 l1_decay: float = 0.0, decoupled_weight_decay: bool = False, grad_keep_prob: float = 1.0,
                 grad_mask_seed: int | None = None,
                 state_dtype: torch.dtype | None = None, bf16_stochastic_rounding: bool = False,
                 ema_momentum: bool = False) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                        fused=fused, ema_momentum=ema_momentum)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if ema_momentum and (dampening != 0 or nesterov):
            raise ValueError("ema_momentum requires dampening=0 and nesterov=False")
        super().__init__(params, defaults, l1_decay=l1_decay, decoupled_weight_decay=decoupled_weight_decay,
                         grad_keep_prob=grad_keep_prob, grad_mask_seed=grad_mask_seed,
                         state_dtype=state_dtype, bf16_stochastic_rounding=bf16_stochastic_rounding)

    def _buffers(self, group):
        return [("momentum_buffer", group["momentum"] != 0)]

    def state_dict(self):
        """torch.optim.Optimizer.state_dict, with the momentum of a parameter no step has updated yet (step 0:
        GradScaler skipped its first step) saved as None: torch.optim.SGD's mark of a momentum that the next
        step seeds from the gradient (b ← g), so torch resumes as fusedopt does, whatever the dampening."""
        saved = super().state_dict()
        saved["state"] = {i: {**s, "momentum_buffer": None} if s.get("momentum_buffer") is not None
                          and "step" in s and float(s["step"]) == 0 else s for i, s in saved["state"].items()}
        return saved

    def _options(self, group):
        return dict(momentum=float(group["momentum"]), dampening=float(group["dampening"]),
                    nesterov=bool(group["nesterov"]), ema_momentum=bool(group["ema_momentum"]))
