"""fusedopt.Adam and AdamW: torch.optim's interface and state, one fused op call per device and dtype."""
import torch
from torch import Tensor
from torch.optim.optimizer import _to_scalar

from fusedopt import ops

from ._base import FusedOptimizer


class Adam(FusedOptimizer):
    """torch.optim.Adam, plus the keyword-only options (DESIGN.md §4)

    l1_decay (λ1, default 0): coupled, g ← g + λ2·θ + λ1·sign(θ); decoupled, after the update the
        proximal step θ ← sign(θ)·max(|θ| − lr·λ1, 0), which gives exact zeros.
    decoupled_weight_decay (default False here, True for AdamW): θ ← θ·(1 − lr·λ2) before the update
        instead of adding λ2·θ to the gradient.
    grad_keep_prob (r, default 1): Bernoulli gradient masking, g ← m·g / r with m ~ Bernoulli(r) drawn from
        Philox keyed by grad_mask_seed at offset t·2^24 + j (j: the parameter's state_dict number).
    grad_mask_seed (default None: drawn from torch's default CPU generator at construction): stored in each
        param group, so it travels with state_dict().
    eps_inside_sqrt (default False): the course's θ ← θ − (lr/bc1)·m / √(v/bc2 + ε).
    state_dtype (default None: the parameter's dtype, as torch): torch.float32 keeps the state of float16 and
        bfloat16 parameters in float32 (the math is float32 either way; the moments are no longer rounded to
        8 or 11 bits after each step).
    bf16_stochastic_rounding (default False): bfloat16 parameters are stored rounded stochastically, up with
        probability equal to the fraction of the gap to the upper neighbour, so the rounding error is zero on
        average and updates below half an ulp still move θ in expectation; the random bits are Philox keyed by
        grad_mask_seed (its own stream, not the mask's).

    State: 'step', 'exp_avg', 'exp_avg_sq', 'max_exp_avg_sq' (amsgrad), as torch. foreach, fused and
    capturable are accepted and stored, and change nothing; differentiable=True is refused."""

    _op = staticmethod(ops.adam_)

    def __init__(self, params, lr: float | Tensor = 1e-3, betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, decoupled_weight_decay: bool = False, l1_decay: float = 0.0,
                 grad_keep_prob: float = 1.0, grad_mask_seed: int | None = None,
                 state_dtype: torch.dtype | None = None, bf16_stochastic_rounding: bool = False,
                 eps_inside_sqrt: bool = False) -> None:
        if isinstance(lr, Tensor):
            if foreach and not capturable:
                raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not ((isinstance(betas[0], float) and isinstance(betas[1], float))
                or (isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor))):
            raise ValueError("betas must be either both floats or both Tensors")
        for i, beta in enumerate(betas):
            if isinstance(beta, Tensor):
                if not capturable and foreach:
                    raise ValueError(
                        f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
                if beta.numel() != 1:
                    raise ValueError(f"Tensor betas[{i}] must be 1-element")
        betas = tuple(map(_to_scalar, betas))
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay, eps_inside_sqrt=eps_inside_sqrt)
        super().__init__(params, defaults, l1_decay=l1_decay, decoupled_weight_decay=decoupled_weight_decay,
                         grad_keep_prob=grad_keep_prob, grad_mask_seed=grad_mask_seed,
                         state_dtype=state_dtype, bf16_stochastic_rounding=bf16_stochastic_rounding)

    def _buffers(self, group):
        return [("exp_avg", True), ("exp_avg_sq", True), ("max_exp_avg_sq", group["amsgrad"])]

    def _options(self, group):
        # Tensor betas go to the op as they are (Note [Tensor betas] in csrc/include/fusedopt/calls.h).
        beta1, beta2 = (b if torch.is_tensor(b) else float(b) for b in group["betas"])
        return dict(beta1=beta1, beta2=beta2, eps=float(group["eps"]), amsgrad=bool(group["amsgrad"]),
                    eps_inside_sqrt=bool(group["eps_inside_sqrt"]))


class AdamW(Adam):
    """torch.optim.AdamW: fusedopt.Adam with decoupled_weight_decay=True and weight_decay=1e-2 by default."""

    def __init__(self, params, lr: float | Tensor = 1e-3, betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, decoupled_weight_decay: bool = True, l1_decay: float = 0.0,
                 grad_keep_prob: float = 1.0, grad_mask_seed: int | None = None,
                 state_dtype: torch.dtype | None = None, bf16_stochastic_rounding: bool = False,
                 eps_inside_sqrt: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=decoupled_weight_decay, l1_decay=l1_decay,
                         grad_keep_prob=grad_keep_prob, grad_mask_seed=grad_mask_seed,
                         state_dtype=state_dtype, bf16_stochastic_rounding=bf16_stochastic_rounding,
                         eps_inside_sqrt=eps_inside_sqrt)

    def __setstate__(self, state):
        # As torch.optim.AdamW: loaded groups keep this optimizer's decoupling (a torch Adam checkpoint says False).
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = self.defaults["decoupled_weight_decay"]
