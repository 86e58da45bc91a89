"""fusedopt.Adagrad: torch.optim.Adagrad's interface and state, one fused op call per device and dtype."""
import torch
from torch import Tensor

from fusedopt import ops

from ._base import FusedOptimizer


class Adagrad(FusedOptimizer):
    """torch.optim.Adagrad, plus the keyword-only options l1_decay, decoupled_weight_decay, grad_keep_prob
    grad_mask_seed, state_dtype and bf16_stochastic_rounding (see
    fusedopt.Adam). State: 'step' and 'sum', created here as torch does."""

    _op = staticmethod(ops.adagrad_)

    def __init__(self, params, lr: float | Tensor = 1e-2, lr_decay: float = 0, weight_decay: float = 0,
                 initial_accumulator_value: float = 0, eps: float = 1e-10, foreach: bool | None = None, *,
                 maximize: bool = False, differentiable: bool = False, fused: bool | None = None,
                 l1_decay: float = 0.0, decoupled_weight_decay: bool = False, grad_keep_prob: float = 1.0,
                 grad_mask_seed: int | None = None,
                 state_dtype: torch.dtype | None = None, bf16_stochastic_rounding: bool = False) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= lr_decay:
            raise ValueError(f"Invalid lr_decay value: {lr_decay}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= initial_accumulator_value:
            raise ValueError(f"Invalid initial_accumulator_value value: {initial_accumulator_value}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        defaults = dict(lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, foreach=foreach, maximize=maximize,
                        differentiable=differentiable, fused=fused)
        super().__init__(params, defaults, l1_decay=l1_decay, decoupled_weight_decay=decoupled_weight_decay,
                         grad_keep_prob=grad_keep_prob, grad_mask_seed=grad_mask_seed,
                         state_dtype=state_dtype, bf16_stochastic_rounding=bf16_stochastic_rounding)
        for group in self.param_groups:
            for p in group["params"]:
                self._state(p, group)

    def _buffers(self, group):
        return [("sum", True)]

    def _initial(self, group, key):
        return group["initial_accumulator_value"]

    def _options(self, group):
        return dict(lr_decay=float(group["lr_decay"]), eps=float(group["eps"]))
