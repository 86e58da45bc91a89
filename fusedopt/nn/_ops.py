"""Fakes (for torch.compile) and autograd of the dropout ops; the schemas live in csrc/registration.cpp.

Each op's backward needs only p and the draw (an int64 CPU tensor (seed, offset)), which are op inputs: the mask
is regenerated, never saved.
"""
import torch

import fusedopt._ext  # noqa: F401  (loads the library that defines torch.ops.fusedopt)

_ops = torch.ops.fusedopt


def _check_bias_shapes(x, bias, residual):
    torch._check(x.dim() >= 1, lambda: "bias_dropout_add: input must have at least one dimension")
    torch._check(bias.dim() == 1 and bias.shape[0] == x.shape[-1],
                 lambda: f"bias_dropout_add: bias must have shape [{x.shape[-1]}], got {list(bias.shape)}")
    torch._check(residual.shape == x.shape,
                 lambda: f"bias_dropout_add: residual must have the input's shape {list(x.shape)}, "
                         f"got {list(residual.shape)}")
    torch._check(bias.dtype == x.dtype and residual.dtype == x.dtype,
                 lambda: f"bias_dropout_add: input, bias and residual must share a dtype, got {x.dtype}, "
                         f"{bias.dtype} and {residual.dtype}")


@torch.library.register_fake("fusedopt::dropout_seed")
def _dropout_seed_fake(draws):
    return torch.empty(2, dtype=torch.int64, device="cpu")


@torch.library.register_fake("fusedopt::dropout")
def _dropout_fake(x, p, draw):
    return torch.empty_like(x)  # Note [Output layout]


@torch.library.register_fake("fusedopt::dropout_")
def _dropout_inplace_fake(x, p, draw):
    return None


@torch.library.register_fake("fusedopt::dropout_backward")
def _dropout_backward_fake(grad, p, draw):
    return torch.empty_like(grad)


@torch.library.register_fake("fusedopt::bias_dropout_add")
def _bias_dropout_add_fake(x, bias, residual, p, draw):
    _check_bias_shapes(x, bias, residual)
    return x.new_empty(x.shape)


@torch.library.register_fake("fusedopt::bias_dropout_add_backward")
def _bias_dropout_add_backward_fake(grad, p, draw):
    torch._check(grad.dim() >= 1, lambda: "bias_dropout_add_backward: grad must have at least one dimension")
    return grad.new_empty(grad.shape), grad.new_empty(grad.shape[-1:])


@torch.library.register_fake("fusedopt::dropout_keep_bits")
def _keep_bits_fake(x, p, draw):
    return x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8)


def _save_draw(ctx, p, draw):
    ctx.p = p
    ctx.save_for_backward(draw)


# dropout and dropout_backward are the same linear map x -> x·m (m = keep / (1 - p)); each is the other's
# derivative, so gradients of any order regenerate the same mask.
def _dropout_setup(ctx, inputs, output):
    _save_draw(ctx, *inputs[1:])


def _dropout_grad(ctx, grad):
    return _ops.dropout_backward(grad, ctx.p, *ctx.saved_tensors), None, None


torch.library.register_autograd("fusedopt::dropout", _dropout_grad, setup_context=_dropout_setup)
torch.library.register_autograd("fusedopt::dropout_backward", _dropout_grad, setup_context=_dropout_setup)


def _bias_dropout_add_setup(ctx, inputs, output):
    _save_draw(ctx, *inputs[3:])


def _bias_dropout_add_grad(ctx, grad):
    dx, dbias = _ops.bias_dropout_add_backward(grad, ctx.p, *ctx.saved_tensors)
    return dx, dbias, grad, None, None


torch.library.register_autograd("fusedopt::bias_dropout_add", _bias_dropout_add_grad,
                                setup_context=_bias_dropout_add_setup)


# (dx, dbias) = (g·m, Σ_rows g·m) is linear in g; its adjoint takes (u, v) to (u + v)·m, v broadcast over rows.
def _bias_dropout_add_backward_setup(ctx, inputs, output):
    _save_draw(ctx, *inputs[1:])


def _bias_dropout_add_backward_grad(ctx, gdx, gdbias):
    return _ops.dropout_backward(gdx + gdbias, ctx.p, *ctx.saved_tensors), None, None


torch.library.register_autograd("fusedopt::bias_dropout_add_backward", _bias_dropout_add_backward_grad,
                                setup_context=_bias_dropout_add_backward_setup)


class DropoutInplace(torch.autograd.Function):
    """x <- dropout(x) through the in-place op (Note [In-place dropout]); the backward regenerates the mask from
    (p, draw), so nothing of x's size is saved."""

    @staticmethod
    def forward(ctx, x, p, draw):
        _ops.dropout_(x, p, draw)
        ctx.mark_dirty(x)
        _save_draw(ctx, p, draw)
        return x

    @staticmethod
    def backward(ctx, grad):
        return _ops.dropout_backward(grad, ctx.p, *ctx.saved_tensors), None, None


_RANDOMNESS_ERROR = ("vmap: called random operation while in randomness error mode. Please either use the 'same' or "
                     "'different' randomness flags on vmap or perform the randomness operation out of vmap")


class DropoutMask(torch.autograd.Function):
    """x·mask is dropout(x) with mask = keep / (1 - p) or 0 per element of x, in op math (float32 for the half
    types): a constant, so torch differentiates and batches the product under torch.func transforms and forward-mode
    AD, which the ops' registered autograd does not support. Under vmap, `random` (a drawn, not an explicit, seed)
    follows torch's randomness flag: "error" raises, "different" takes each sample's mask from one draw over the
    batch, "same" (as an explicit seed) gives every sample the mask a call on it alone draws."""

    @staticmethod
    def forward(x, p, draw, random):
        t = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        return _ops.dropout(torch.ones(x.shape, dtype=t, device=x.device), p, draw)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output)

    @staticmethod
    def vmap(info, in_dims, x, p, draw, random):
        if random and info.randomness == "error":
            raise RuntimeError(_RANDOMNESS_ERROR)
        x = x.movedim(in_dims[0], 0)
        if random and info.randomness == "different":
            return DropoutMask.apply(x, p, draw, random), 0
        return DropoutMask.apply(x[0], p, draw, random), None
