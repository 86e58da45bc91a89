"""fusedopt.RMSprop: torch.optim.RMSprop's interface and state, one fused op call per device and dtype."""
import torch
from torch import Tensor

from fusedopt import ops

from ._base import FusedOptimizer


class RMSprop(FusedOptimizer):
    """torch.optim.RMSprop, plus the keyword-only options l1_decay, decoupled_weight_decay, grad_keep_prob
    grad_mask_seed, state_dtype and bf16_stochastic_rounding (see
    fusedopt.Adam). State: 'step', 'square_avg', 'grad_avg' (centered) and
    'momentum_buffer' (momentum > 0)."""

    _op = staticmethod(ops.rmsprop_)

    def __init__(self, params, lr: float | Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0, momentum: float = 0, centered: bool = False, capturable: bool = False,
                 foreach: bool | None = None, maximize: bool = False, differentiable: bool = False, *,
                 l1_decay: float = 0.0, decoupled_weight_decay: bool = False, grad_keep_prob: float = 1.0,
                 grad_mask_seed: int | None = None,
                 state_dtype: torch.dtype | None = None, bf16_stochastic_rounding: bool = False) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= alpha:
            raise ValueError(f"Invalid alpha value: {alpha}")
        defaults = dict(lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered,
                        weight_decay=weight_decay, capturable=capturable, foreach=foreach, maximize=maximize,
                        differentiable=differentiable)
        super().__init__(params, defaults, l1_decay=l1_decay, decoupled_weight_decay=decoupled_weight_decay,
                         grad_keep_prob=grad_keep_prob, grad_mask_seed=grad_mask_seed,
                         state_dtype=state_dtype, bf16_stochastic_rounding=bf16_stochastic_rounding)

    def _buffers(self, group):
        return [("square_avg", True), ("grad_avg", group["centered"]), ("momentum_buffer", group["momentum"] > 0)]

    def _options(self, group):
        return dict(alpha=float(group["alpha"]), eps=float(group["eps"]), momentum=float(group["momentum"]),
                    centered=bool(group["centered"]))
