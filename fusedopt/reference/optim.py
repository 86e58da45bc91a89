"""The update rules of DESIGN.md §4, one function per optimizer, written plainly with torch ops.

Each `*_step` updates ONE parameter in place, in the dtype of the tensors passed. `state` is a dict with
torch.optim's keys ('step' is a Python int here: the number of steps already taken); buffers are created
on first use. Course notation in the comments: θ parameter, g gradient, η learning rate, t the 1-based step,
V the first moment / momentum, S the second moment, λ2 / λ1 the L2 / L1 coefficients.

Common keyword arguments (every rule):
    weight_decay=0.0 (λ2), l1_decay=0.0 (λ1), decoupled_weight_decay=False, maximize=False,
    grad_keep_prob=1.0 (r), grad_mask_seed=0, index=0 (the parameter's state_dict number),
    grad_scale=None, found_inf=None (AMP; Python floats or None).
"""
import math

import torch

from .philox import keep_mask


def _buffer(state, key, param, fill=0.0):
    if key not in state:
        state[key] = torch.full_like(param, fill)
    return state[key]


def _prelude(param, grad, state, lr, *, weight_decay=0.0, l1_decay=0.0, decoupled_weight_decay=False,
             maximize=False, grad_keep_prob=1.0, grad_mask_seed=0, index=0, grad_scale=None, found_inf=None):
    """Steps 1-5a of the §4 preamble. Returns (g, t), or None when the step is skipped (found_inf)."""
    # 1. AMP: skip the whole step on overflow, else unscale g and write it back to .grad.
    if found_inf:
        return None
    g = grad
    if grad_scale is not None:
        g = grad / grad_scale
        grad.copy_(g)
    t = state.get("step", 0) + 1
    # 2. maximize: ascend instead of descend.
    if maximize:
        g = -g
    # 3. Gradient masking (Child-Tuning-F): g ← m ⊙ g / r, m ~ Bernoulli(r) from Philox at offset t·2^24 + j.
    if grad_keep_prob < 1:
        m = keep_mask(grad_mask_seed, t * 2**24 + index, g.numel(), grad_keep_prob)
        m = torch.from_numpy(m).to(device=g.device, dtype=g.dtype).reshape(g.shape)
        g = m * g / grad_keep_prob
    # 4. Coupled regularization: g ← g + λ2·θ + λ1·sign(θ). A zero coefficient skips its term.
    if not decoupled_weight_decay:
        if weight_decay != 0:
            g = g + weight_decay * param
        if l1_decay != 0:
            g = g + l1_decay * torch.sign(param)
    # 5a. Decoupled weight decay: θ ← θ·(1 − η·λ2) before the rule.
    elif weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    return g, t


def _epilogue(param, state, lr, t, *, l1_decay=0.0, decoupled_weight_decay=False, **_):
    """Step 5b, the decoupled L1 proximal step θ ← sign(θ)·max(|θ| − η·λ1, 0) (exact zeros), and the step count."""
    if decoupled_weight_decay and l1_decay != 0:
        param.copy_(torch.sign(param) * torch.clamp(param.abs() - lr * l1_decay, min=0))
    state["step"] = t


def sgd_step(param, grad, state, *, lr, momentum=0.0, dampening=0.0, nesterov=False, ema_momentum=False,
             **common):
    """SGD with momentum μ (course β). ema_momentum=True is the course's form: V_0 = 0, no dampening/nesterov."""
    if ema_momentum and (dampening != 0 or nesterov):
        raise ValueError("ema_momentum requires dampening=0 and nesterov=False")
    pre = _prelude(param, grad, state, lr, **common)
    if pre is None:
        return
    g, t = pre
    if momentum != 0:
        if ema_momentum:
            # V_t = β V_{t-1} + (1 − β) g_t, V_0 = 0
            buf = _buffer(state, "momentum_buffer", param)
            buf.mul_(momentum).add_(g, alpha=1 - momentum)
        elif "momentum_buffer" not in state:
            # torch: the first step sets b = g
            buf = state["momentum_buffer"] = g.clone()
        else:
            # b_t = μ b_{t-1} + (1 − dampening) g_t
            buf = state["momentum_buffer"]
            buf.mul_(momentum).add_(g, alpha=1 - dampening)
        # nesterov: g ← g + μ b_t, else g ← b_t
        g = g + momentum * buf if nesterov else buf
    # θ_t = θ_{t-1} − η g
    param.add_(g, alpha=-lr)
    _epilogue(param, state, lr, t, **common)


def adagrad_step(param, grad, state, *, lr=1e-2, lr_decay=0.0, eps=1e-10, initial_accumulator_value=0.0,
                 **common):
    """Adagrad: S_t = S_{t-1} + g², θ_t = θ_{t-1} − η_t g / (√S_t + ε), η_t = η / (1 + (t − 1)·lr_decay)."""
    pre = _prelude(param, grad, state, lr, **common)
    if pre is None:
        return
    g, t = pre
    clr = lr / (1 + (t - 1) * lr_decay)
    # S_t = S_{t-1} + g_t², S_0 = initial_accumulator_value
    s = _buffer(state, "sum", param, initial_accumulator_value)
    s.addcmul_(g, g)
    # θ_t = θ_{t-1} − η_t g_t / (√S_t + ε)
    param.addcdiv_(g, s.sqrt() + eps, value=-clr)
    _epilogue(param, state, lr, t, **common)


def rmsprop_step(param, grad, state, *, lr=1e-2, alpha=0.99, eps=1e-8, momentum=0.0, centered=False, **common):
    """RMSprop (course β = alpha), optionally centered and with momentum μ."""
    pre = _prelude(param, grad, state, lr, **common)
    if pre is None:
        return
    g, t = pre
    # S_t = β S_{t-1} + (1 − β) g_t²
    v = _buffer(state, "square_avg", param)
    v.mul_(alpha).addcmul_(g, g, value=1 - alpha)
    if centered:
        # A_t = β A_{t-1} + (1 − β) g_t;  d = √(S_t − A_t²) + ε
        a = _buffer(state, "grad_avg", param)
        a.mul_(alpha).add_(g, alpha=1 - alpha)
        d = (v - a * a).sqrt() + eps
    else:
        # d = √S_t + ε
        d = v.sqrt() + eps
    if momentum > 0:
        # b_t = μ b_{t-1} + g_t / d;  θ_t = θ_{t-1} − η b_t
        b = _buffer(state, "momentum_buffer", param)
        b.mul_(momentum).addcdiv_(g, d)
        param.add_(b, alpha=-lr)
    else:
        # θ_t = θ_{t-1} − η g_t / d
        param.addcdiv_(g, d, value=-lr)
    _epilogue(param, state, lr, t, **common)


def adam_step(param, grad, state, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, amsgrad=False, eps_inside_sqrt=False,
              **common):
    """Adam; AdamW is adam_step(..., decoupled_weight_decay=True).

    The course writes the bias correction as V_t / β1^t; that is a typo for V_t / (1 − β1^t) (Kingma & Ba)."""
    pre = _prelude(param, grad, state, lr, **common)
    if pre is None:
        return
    g, t = pre
    beta1, beta2 = betas
    # V_t = β1 V_{t-1} + (1 − β1) g_t
    m = _buffer(state, "exp_avg", param)
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    # S_t = β2 S_{t-1} + (1 − β2) g_t²
    v = _buffer(state, "exp_avg_sq", param)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if amsgrad:
        # Ŝ_t = max(Ŝ_{t-1}, S_t) replaces S_t below
        v_max = _buffer(state, "max_exp_avg_sq", param)
        torch.maximum(v_max, v, out=v_max)
        v = v_max
    bc1 = 1 - beta1**t
    bc2 = 1 - beta2**t
    if eps_inside_sqrt:
        # course: θ_t = θ_{t-1} − η V̂_t / √(Ŝ_t + ε), V̂_t = V_t / (1 − β1^t), Ŝ_t = S_t / (1 − β2^t)
        denom = (v / bc2 + eps).sqrt()
    else:
        # torch: θ_t = θ_{t-1} − η V̂_t / (√Ŝ_t + ε)
        denom = v.sqrt() / math.sqrt(bc2) + eps
    param.addcdiv_(m, denom, value=-lr / bc1)
    _epilogue(param, state, lr, t, **common)
