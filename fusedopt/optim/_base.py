"""What every fusedopt optimizer shares: the extra options, state handling and the fused step.

Note [One op call per device and dtype]
step() walks the param groups in order, numbering every parameter as state_dict() does (j = 0, 1, ...; the
gradient mask stream of parameter j is offset t·2^24 + j, so the masks do not depend on which parameters
happen to have gradients). Within a group, the parameters with a gradient are bucketed by (device, dtype)
and each bucket is one op call. Complex parameters enter as real pairs (torch.view_as_real, as torch does),
so a complex64 parameter shares the float32 bucket. A tensor that is not contiguous (a channels_last weight,
a strided gradient) enters as a contiguous copy that is written back after the call, so the op's
elementwise loop and the mask's row-major element numbering always agree.

Note [Step tensors]
state['step'] is a scalar float tensor as in torch: on the CPU for CPU parameters (torch's dtype,
float32 unless the default dtype is float64), on the parameter's device otherwise (float32, as torch's
fused optimizers keep it), because the CUDA op reads the step there. The op advances it unless found_inf
is set. A step loaded to another device (map_location) is moved back before use. torch's SGD keeps no
step, only 'momentum_buffer', which it creates on a parameter's first step: a state holding a buffer
but no step therefore has taken at least one step, and continues at step 1 (the op seeds the buffer
with g only when t == 1).
"""
import torch
from torch.optim.optimizer import Optimizer, _get_scalar_dtype


class FusedOptimizer(Optimizer):
    """Base of fusedopt.SGD, Adagrad, RMSprop, Adam and AdamW.

    A subclass passes torch's `defaults` (already validated as torch validates them) and the fusedopt
    options to __init__, and defines `_op` (a fusedopt.ops function), `_buffers(group)` (its state keys
    in the op's order, each with whether the configuration uses it) and `_options(group)` (the op's
    rule-specific keyword arguments)."""

    # torch.amp.GradScaler then sets self.grad_scale / self.found_inf around step() instead of
    # unscaling the gradients itself; the op unscales them (and writes them back) or skips the step.
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults, *, l1_decay, decoupled_weight_decay, grad_keep_prob, grad_mask_seed):
        name = type(self).__name__
        if defaults.get("differentiable"):
            raise ValueError(f"{name} does not support differentiable=True: its step is a fused kernel "
                             "that autograd cannot differentiate through; use torch.optim instead")
        if defaults.get("fused") and defaults.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if not 0.0 <= l1_decay:
            raise ValueError(f"Invalid l1_decay value: {l1_decay}")
        if not 0.0 < grad_keep_prob <= 1.0:
            raise ValueError(f"Invalid grad_keep_prob value: {grad_keep_prob} (must lie in (0, 1])")
        if grad_mask_seed is None:
            # Drawn from torch's default generator, so torch.manual_seed makes runs reproducible.
            grad_mask_seed = int(torch.randint(0, 2**63 - 1, ()).item())
        elif not (isinstance(grad_mask_seed, int) and 0 <= grad_mask_seed < 2**64):
            raise ValueError(f"Invalid grad_mask_seed value: {grad_mask_seed} (must be an int in [0, 2^64))")
        defaults.update(l1_decay=l1_decay, decoupled_weight_decay=decoupled_weight_decay,
                        grad_keep_prob=grad_keep_prob, grad_mask_seed=grad_mask_seed)
        super().__init__(params, defaults)

    def _buffers(self, group):
        raise NotImplementedError

    def _options(self, group):
        raise NotImplementedError

    def _initial(self, group, key):
        """The value a new state buffer starts from."""
        return 0.0

    def load_state_dict(self, state_dict):
        """torch.optim.Optimizer.load_state_dict; a group saved without an option of ours (a torch.optim
        checkpoint: no l1_decay, grad_mask_seed, ...) keeps the value it has now."""
        saved = [dict(g) for g in state_dict["param_groups"]]
        for group, current in zip(saved, self.param_groups):
            for key, value in current.items():
                if key not in ("params", "param_names"):
                    group.setdefault(key, value)
        super().load_state_dict({**state_dict, "param_groups": saved})

    def _state(self, p, group):
        """The state of parameter p, created or completed as its group needs it (Note [Step tensors])."""
        state = self.state[p]
        step = state.get("step", 1.0 if state else 0.0)
        if not torch.is_tensor(step):
            step = torch.tensor(float(step), dtype=_get_scalar_dtype(is_fused=p.device.type != "cpu"))
        if step.device != p.device:
            step = step.to(p.device)
        if state.get("step") is not step:
            state["step"] = step
        for key, used in self._buffers(group):
            if used and key not in state:
                fill = self._initial(group, key)
                state[key] = torch.full_like(p, complex(fill, fill) if p.is_complex() else fill,
                                             memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step: one fused op call per param group, device and dtype.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        amp = {}  # device -> (grad_scale, found_inf) there, float32
        j = -1
        for group in self.param_groups:
            spec = self._buffers(group)
            buckets = {}  # (device, dtype) -> [params, grads, *one list per buffer of spec, steps, indices]
            copies = []  # (tensor, the contiguous copy handed to the op)
            for p in group["params"]:
                j += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                       "(fusedopt's ops take dense tensors only)")
                state = self._state(p, group)
                tensors = [_operand(t, copies) for t in [p, p.grad, *(state[k] for k, used in spec if used)]]
                lists = buckets.setdefault((p.device, tensors[0].dtype), [[] for _ in range(len(spec) + 4)])
                lists[0].append(tensors[0])
                lists[1].append(tensors[1])
                buffers = iter(tensors[2:])
                for lst, (_, used) in zip(lists[2:], spec):
                    if used:  # an unused buffer's list stays empty, as the op wants
                        lst.append(next(buffers))
                lists[-2].append(state["step"])
                lists[-1].append(j)
            for (device, _), lists in buckets.items():
                if device not in amp:
                    amp[device] = [None if t is None else t.to(device=device, dtype=torch.float32)
                                   for t in (grad_scale, found_inf)]
                self._op(*lists, lr=float(group["lr"]), **self._options(group), **_common(group),
                         grad_scale=amp[device][0], found_inf=amp[device][1])
            for t, c in copies:
                t.copy_(c)
        return loss


def _operand(t, copies):
    """t as the op takes it: real and contiguous (Note [One op call per device and dtype])."""
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.is_contiguous():
        return t
    c = t.contiguous()
    copies.append((t, c))
    return c


def _common(group):
    """The options every op takes, from a param group."""
    seed = group["grad_mask_seed"]
    return dict(weight_decay=float(group["weight_decay"]), l1_decay=float(group["l1_decay"]),
                decoupled_weight_decay=bool(group["decoupled_weight_decay"]), maximize=bool(group["maximize"]),
                grad_keep_prob=float(group["grad_keep_prob"]),
                grad_mask_seed=seed - 2**64 if seed >= 2**63 else seed)  # the op's int is signed 64-bit
