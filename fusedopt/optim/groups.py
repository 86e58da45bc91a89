"""fusedopt.param_groups: the usual two groups, with biases and norm weights excluded from decay."""
from torch import nn

# Layers whose every parameter is a scale or shift of a normalization, never decayed.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm)


def param_groups(model: nn.Module, weight_decay: float | None = None, l1_decay: float | None = None, **extra):
    """[decayed, undecayed] param groups of `model` for any fusedopt (or torch.optim) optimizer.

    Decayed: the parameters with ndim >= 2 (weights of Linear, Conv, Embedding, ...), with `weight_decay`
    and `l1_decay` (left to the optimizer's defaults when None). Undecayed: biases, every other parameter
    with ndim < 2 and all parameters of normalization layers (BatchNorm*, InstanceNorm*, LayerNorm,
    GroupNorm, RMSNorm), with weight_decay=0 and l1_decay=0 (the course: "bias parameters are not
    regularized"). `extra` (lr=..., betas=...) goes into both groups. Frozen parameters (requires_grad=False)
    are left out; a parameter shared by several modules appears once. Both groups are always returned, so
    the state_dict layout does not depend on the model.
    """
    decayed, undecayed, seen = [], [], set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (undecayed if isinstance(module, NORM_LAYERS) or p.ndim < 2 else decayed).append(p)
    decay = {k: v for k, v in (("weight_decay", weight_decay), ("l1_decay", l1_decay)) if v is not None}
    return [dict(params=decayed, **decay, **extra), dict(params=undecayed, weight_decay=0.0, l1_decay=0.0, **extra)]
