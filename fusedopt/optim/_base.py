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
            # Drawn from torch's default generator, so torch.manual_seed makes runs reproducible; without
            # masking no number is drawn (torch.initial_seed() instead), so swapping torch.optim for
            # fusedopt leaves the program's random stream (init, dropout, shuffling) as it was.
            grad_mask_seed = (int(torch.randint(0, 2**63 - 1, ()).item()) if grad_keep_prob < 1
                              else torch.initial_seed() % 2**63)
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
        self.__dict__.pop("_plans", None)  # Note [Step plans]: the state tensors were replaced

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
        plans = self.__dict__.setdefault("_plans", {})
        first = 0  # state_dict number of the group's first parameter
        for gi, group in enumerate(self.param_groups):
            params = group["params"]
            grads = [p.grad for p in params]
            spec = self._buffers(group)
            key = (tuple(g is not None for g in grads), tuple(spec), first)
            plan = plans.get(gi)
            if plan is None or plan[0] != key:
                plan = plans[gi] = (key, self._plan(group, spec, grads, first))
            options = dict(lr=float(group["lr"]), **self._options(group), **_common(group))
            for device, members, lists in plan[1]:
                copies = []  # (tensor, the contiguous copy handed to the op)
                if lists is None:  # complex or non-contiguous members: operands anew each step
                    rows = [[_operand(t, copies) for t in self._operands(params[i], grads[i], group, spec)]
                            for i in members]
                    op_lists = _columns(rows) + [[i + first for i in members]]
                else:
                    op_lists = [lists[0], [_operand(grads[i], copies) for i in members], *lists[1:]]
                if device not in amp:
                    amp[device] = [None if t is None else t.to(device=device, dtype=torch.float32)
                                   for t in (grad_scale, found_inf)]
                self._op(*op_lists, **options, grad_scale=amp[device][0], found_inf=amp[device][1])
                for t, c in copies:
                    t.copy_(c)
            first += len(params)
        return loss

    def _operands(self, p, g, group, spec):
        """p, its gradient, its state buffers in use (op order) and its step tensor."""
        state = self._state(p, group)
        return [p, g, *(state[k] if used else None for k, used in spec), state["step"]]

    def _plan(self, group, spec, grads, first):
        """Note [Step plans]
        The tensors a group hands to its op calls change only when the set of parameters with a gradient,
        the buffers in use or the state (load_state_dict) change, so step() keeps, per group, the op's lists
        for each (device, dtype) bucket and rebuilds them only then; a step then costs a list of gradients
        per bucket. Complex or non-contiguous members go to buckets that convert their operands anew each
        step. Returns [(device, members, lists or None)], lists = [params, *buffers, steps, indices]."""
        buckets = {}
        for i, (p, g) in enumerate(zip(group["params"], grads)):
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                   "(fusedopt's ops take dense tensors only)")
            tensors = self._operands(p, g, group, spec)
            plain = all(not t.is_complex() and t.is_contiguous() for t in tensors[:1] + tensors[2:] if t is not None)
            dtype = torch.view_as_real(p).dtype if p.is_complex() else p.dtype
            buckets.setdefault((p.device, dtype, plain), []).append(i)
        plan = []
        for (device, _, plain), members in buckets.items():
            lists = None
            if plain:
                rows = [self._operands(group["params"][i], None, group, spec) for i in members]
                columns = _columns(rows)
                lists = columns[:1] + columns[2:] + [[i + first for i in members]]
            plan.append((device, members, lists))
        return plan

def _columns(rows):
    """Per-parameter rows of operands -> the op's lists; a buffer not in use (None) is an empty list."""
    return [[] if col[0] is None else list(col) for col in zip(*rows)]


def _operand(t, copies):
    """t as the op takes it: real and contiguous (Note [One op call per device and dtype])."""
    if t is None:
        return None
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
