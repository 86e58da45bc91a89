"""What every fusedopt optimizer shares: the extra options, state handling and the fused step.

Note [One op call per device and dtype]
step() walks the param groups in order, numbering every parameter as state_dict() does (j = 0, 1, ...; the
gradient mask stream of parameter j is offset t·2^24 + j, so the masks do not depend on which parameters
happen to have gradients; under ZeRO, as the ZeroRedundancyOptimizer's state_dict does: Note [ZeRO
numbering]). Within a group, the parameters with a gradient are bucketed by (device, dtype) and each bucket
is one op call. Complex parameters enter as real pairs (torch.view_as_real, as torch does),
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
import itertools
import math
import operator
import sys
import warnings
import weakref
from collections.abc import Mapping

import torch
from torch.optim.optimizer import Optimizer, _get_scalar_dtype

import fusedopt._ext  # noqa: F401  (loads fusedopt._C, or says plainly why it cannot)
from fusedopt import _C


class FusedOptimizer(Optimizer):
    """Base of fusedopt.SGD, Adagrad, RMSprop, Adam and AdamW.

    A subclass passes torch's `defaults` (already validated as torch validates them) and the fusedopt
    options to __init__, and defines `_op` (a fusedopt.ops function), `_buffers(group)` (its state keys
    in the op's order, each with whether the configuration uses it) and `_options(group)` (the op's
    rule-specific keyword arguments)."""

    # torch.amp.GradScaler then sets self.grad_scale / self.found_inf around step() instead of
    # unscaling the gradients itself; the op unscales them (and writes them back) or skips the step.
    _step_supports_amp_scaling = True
    # Whether a saved state must hold 'step' (Note [Checked state_dict]); torch's SGD keeps none.
    _step_required = True

    def __init__(self, params, defaults, *, l1_decay, decoupled_weight_decay, grad_keep_prob, grad_mask_seed,
                 state_dtype, bf16_stochastic_rounding):
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
        if state_dtype not in (None, torch.float32):
            raise ValueError(f"Invalid state_dtype value: {state_dtype} (None: the parameters' dtype, as torch; "
                             "torch.float32: float32 state for float16/bfloat16 parameters)")
        if not isinstance(bf16_stochastic_rounding, bool):
            raise ValueError(f"Invalid bf16_stochastic_rounding value: {bf16_stochastic_rounding} (must be a bool)")
        if grad_mask_seed is None:
            # Drawn from torch's default generator, so torch.manual_seed makes runs reproducible; without
            # masking or rounding no number is drawn (torch.initial_seed() instead), so swapping torch.optim
            # for fusedopt leaves the program's random stream (init, dropout, shuffling) as it was.
            random = grad_keep_prob < 1 or bf16_stochastic_rounding
            grad_mask_seed = (int(torch.randint(0, 2**63 - 1, ()).item()) if random
                              else torch.initial_seed() % 2**63)
            if random and _ranks() > 1:
                warnings.warn(f"{name}: grad_mask_seed was drawn from this rank's torch generator. Where every "
                              "rank steps every parameter (DDP), ranks whose generators differ draw different "
                              "masks and rounding bits, and the replicas drift apart: pass the same "
                              "grad_mask_seed on every rank", stacklevel=3)
        elif not (isinstance(grad_mask_seed, int) and 0 <= grad_mask_seed < 2**64):
            raise ValueError(f"Invalid grad_mask_seed value: {grad_mask_seed} (must be an int in [0, 2^64))")
        defaults.update(l1_decay=l1_decay, decoupled_weight_decay=decoupled_weight_decay,
                        grad_keep_prob=grad_keep_prob, grad_mask_seed=grad_mask_seed, state_dtype=state_dtype,
                        bf16_stochastic_rounding=bf16_stochastic_rounding)
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        params = self.param_groups[-1]["params"]
        if len(set(params)) != len(params):  # torch warns, then steps such a parameter twice
            self.param_groups.pop()
            raise ValueError(f"{type(self).__name__}: a parameter group holds a parameter more than once; "
                             "list each parameter once (the fused step updates each parameter once)")

    def _buffers(self, group):
        raise NotImplementedError

    def _options(self, group):
        raise NotImplementedError

    def _initial(self, group, key):
        """The value a new state buffer starts from."""
        return 0.0

    def load_state_dict(self, state_dict):
        """torch.optim.Optimizer.load_state_dict; a group saved without an option of ours (a torch.optim
        checkpoint: no l1_decay, grad_mask_seed, ...) keeps the value it has now. A state_dict that does not
        fit (Note [Checked state_dict]) raises ValueError before anything is changed. As in torch, it is
        checked as the load_state_dict pre-hooks leave it, and the post-hooks see the state as loaded."""
        loaded = []

        def check(_, state_dict):  # the last pre-hook
            _check_layout(self, state_dict)
            saved = [dict(g) for g in state_dict["param_groups"]]
            for group, current in zip(saved, self.param_groups):
                for key, value in current.items():
                    if key not in ("params", "param_names"):
                        group.setdefault(key, value)
            _check_state(self, state_dict["state"], saved)
            # A buffer saved as None is one no step has made or seeded yet (torch.optim.SGD's momentum): the
            # next step makes it afresh, as torch's would.
            state = {i: {k: v for k, v in entries.items() if v is not None}  # a None step failed the check
                     for i, entries in state_dict["state"].items()}
            loaded.append({**state_dict, "state": state, "param_groups": saved})
            return loaded[0]

        def cast(_):  # the first post-hook
            # torch casts every buffer to its parameter's dtype; a group with float32 state takes the saved
            # buffers as float32 instead, from the saved tensors (Note [State dtype] in csrc/include/fusedopt/checks.h).
            state = self.__dict__["state"]
            for g, group in zip(loaded[0]["param_groups"], self.param_groups):
                for i, p in zip(g["params"], group["params"]):
                    want = _state_dtype(p, group)
                    for key, value in loaded[0]["state"].get(i, {}).items():
                        if key != "step" and state[p][key].dtype != want:
                            state[p][key] = value.to(dtype=want, device=p.device)
            self.__dict__.pop("_plans", None)  # Note [Step plans]: the state tensors were replaced

        hooks = [self.register_load_state_dict_pre_hook(check),
                 self.register_load_state_dict_post_hook(cast, prepend=True)]
        try:
            super().load_state_dict(state_dict)
        finally:
            for hook in hooks:
                hook.remove()

    @property
    def state(self):
        # Whoever reads opt.state may replace what it holds, so the next step checks its plans (Note [Step plans]).
        self.__dict__["_state_read"] = True
        return self.__dict__["state"]

    @state.setter
    def state(self, value):
        self.__dict__["state"] = value
        self.__dict__.pop("_plans", None)

    def _state(self, p, group):
        """The state of parameter p, created or completed as its group needs it (Note [Step tensors])."""
        state = self.__dict__["state"][p]
        step = state.get("step", 1.0 if state else 0.0)
        if not torch.is_tensor(step):
            step = torch.tensor(float(step), dtype=_get_scalar_dtype(is_fused=p.device.type != "cpu"))
        if step.device != p.device:
            step = step.to(p.device)
        if state.get("step") is not step:
            state["step"] = step
        dtype = _state_dtype(p, group)
        for key, used in self._buffers(group):
            if used and key not in state:
                fill = self._initial(group, key)
                state[key] = torch.full_like(p, complex(fill, fill) if p.is_complex() else fill, dtype=dtype,
                                             memory_format=torch.preserve_format)
            elif used and state[key].dtype != dtype:  # the group's state_dtype changed
                state[key] = state[key].to(dtype)
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
        compiling = torch.compiler.is_compiling()
        if not compiling and self.__dict__.pop("_state_read", False):
            for gi in [gi for gi, plan in plans.items() if not self._holds_state(plan)]:
                del plans[gi]
        # Every group's plan before any op runs: what cannot be stepped raises with nothing changed.
        groups = []
        first = 0  # state_dict number of the group's first parameter
        numbering = self.__dict__.get("_numbering")  # Note [ZeRO numbering]
        index = None if numbering is None else numbering()
        for gi, group in enumerate(self.param_groups):
            params = group["params"]
            # Each parameter's number j, its mask and rounding streams' (Note [One op call per device and dtype]).
            numbers = (range(first, first + len(params)) if index is None
                       else tuple(map(index.__getitem__, params)))
            # Note [Gradients from C++] in csrc/module.cpp; torch.compile traces the Python forms (its graph
            # holds the op alone).
            grads = [p.grad for p in params] if compiling else _C._grads(params)
            spec = self._buffers(group)
            key = (tuple(map(operator.is_not, grads, itertools.repeat(None))), tuple(spec), numbers,
                   group["state_dtype"])
            plan = plans.get(gi)
            if plan is None or plan[0] != key or not all(map(operator.is_, plan[2], params)):
                plan = plans[gi] = (key, self._plan(group, spec, grads, numbers), list(params))
            if group["grad_keep_prob"] < 1:
                for *_, unmaskable in plan[1]:
                    if unmaskable:
                        raise _unmaskable(self, params[unmaskable[0]])
            groups.append((group, grads, spec, numbers, plan[1]))
            first += len(params)
        for group, grads, spec, numbers, buckets in groups:
            params = group["params"]
            lr = group["lr"]  # a tensor goes to the op as it is (Note [Tensor lr] in csrc/include/fusedopt/calls.h)
            options = dict(lr=lr if torch.is_tensor(lr) else float(lr), **self._options(group), **_common(group))
            rounding = group["bf16_stochastic_rounding"]
            for device, dtype, members, lists, offsets, _ in buckets:
                copies = []  # (tensor, the contiguous copy handed to the op)
                # A gradient is written only when unscaled; an expanded one cannot be written back.
                grad_copies = copies if grad_scale is not None else []
                if lists is None:  # complex or non-contiguous members: operands anew each step
                    rows = [[_operand(t, grad_copies if k == 1 else copies)
                             for k, t in enumerate(self._operands(params[i], grads[i], group, spec))]
                            for i in members]
                    op_lists = _columns(rows) + [[numbers[i] for i in members]]
                else:  # real members (so real gradients: torch checks a .grad's dtype); copy only if strided
                    members_grads = grads if len(members) == len(grads) else [grads[i] for i in members]
                    contiguous = (all(map(torch.Tensor.is_contiguous, members_grads)) if compiling
                                  else _C._contiguous(members_grads))
                    if not contiguous:
                        members_grads = [_operand(g, grad_copies) for g in members_grads]
                    op_lists = [lists[0], members_grads, *lists[1:]]
                if device not in amp:
                    amp[device] = [None if t is None else t.to(device=device, dtype=torch.float32)
                                   for t in (grad_scale, found_inf)]
                self._op(*op_lists, **options, stochastic_rounding=rounding and dtype is torch.bfloat16,
                         shard_offsets=offsets, grad_scale=amp[device][0], found_inf=amp[device][1])
                for t, c in copies:
                    t.copy_(c)
        return loss

    def _operands(self, p, g, group, spec):
        """p, its gradient, its state buffers in use (op order) and its step tensor, each a plain tensor
        (Note [DTensor operands])."""
        state = self._state(p, group)
        return [_local(p), *map(_local, [g, *(state[k] if used else None for k, used in spec), state["step"]])]

    def _plan(self, group, spec, grads, numbers):
        """Note [Step plans]
        The tensors a group hands to its op calls change only when its parameters, the set of those with a
        gradient, the buffers in use or the state (load_state_dict) change, so step() keeps, per group, the op's lists
        for each (device, dtype) bucket and rebuilds them only then; a step then costs a list of gradients
        per bucket. Complex, non-contiguous or DTensor members go to buckets that convert their operands anew each
        step. Returns [(device, dtype, members, lists or None, offsets, unmaskable)], lists = [params, *buffers,
        steps, indices] (indices: the members' numbers); offsets (None for plain members) are the members' shard
        offsets (Note [Shard offsets] in csrc/include/fusedopt/philox.h), unmaskable the members whose shard is
        not one run of their parameter.
        Users change the state behind the plans as torch lets them (`opt.state = defaultdict(dict)`,
        `opt.state.clear()`, `del opt.state[p]`, `opt.state[p]["exp_avg"] = ...`): assigning opt.state drops
        the plans, and reading it (the `state` property) makes the next step check that the tensors they hold
        are still the state's (_holds_state) and rebuild those that are not."""
        buckets = {}
        for i, (p, g) in enumerate(zip(group["params"], grads)):
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                   "(fusedopt's ops take dense tensors only)")
            tensors = self._operands(p, g, group, spec)
            # A DTensor's shard is a separate tensor object, which a later model.to() would orphan: its
            # members take their operands anew each step (Note [DTensor operands]).
            plain = tensors[0] is p and all(not t.is_complex() and t.is_contiguous()
                                            for t in tensors[:1] + tensors[2:] if t is not None)
            dtype = torch.view_as_real(p).dtype if p.is_complex() else p.dtype
            buckets.setdefault((p.device, dtype, plain), []).append(i)
        plan = []
        for (device, dtype, plain), members in buckets.items():
            lists, offsets, unmaskable = None, None, []
            if plain:
                rows = [self._operands(group["params"][i], None, group, spec) for i in members]
                columns = _columns(rows)
                lists = columns[:1] + columns[2:] + [[numbers[i] for i in members]]
            else:
                runs = [_shard_offset(group["params"][i]) for i in members]
                offsets = [0 if offset is None else offset for offset in runs]
                unmaskable = [i for i, offset in zip(members, runs) if offset is None]
            plan.append((device, dtype, members, lists, offsets, unmaskable))
        return plan

    def _holds_state(self, plan):
        """Whether the state tensors a group's plan holds are still those of self.state (Note [Step plans])."""
        (_, spec, *_), buckets, _ = plan
        state, keys = self.__dict__["state"], [k for k, _ in spec] + ["step"]
        for _, _, _, lists, *_ in buckets:
            if lists is not None:
                entries = list(map(state.get, lists[0], itertools.repeat({})))
                for key, column in zip(keys, lists[1:-1]):
                    if column and not all(map(operator.is_, map(dict.get, entries, itertools.repeat(key)), column)):
                        return False
        return True


def zero_numbering(zero):
    """Note [ZeRO numbering]
    torch.distributed.optim.ZeroRedundancyOptimizer gives each rank a local optimizer of its share of the
    parameters, and that optimizer numbers only those (j = 0, 1, ... in its own state_dict), so its gradient
    masks and stochastic rounding bits, drawn from stream j, are not those of one process stepping every
    parameter. zero_numbering(zero) makes zero's local fusedopt optimizer number each parameter as zero's
    state_dict does (all ranks' parameters, group by group: ZeroRedundancyOptimizer._param_to_index, which
    that numbering is), so masked ZeRO training equals masked single-process training bit for bit, given the
    same grad_mask_seed on every rank (tests/test_distributed.py), and stochastic rounding draws the bits of
    the same numbers. Call it once, after making zero, on every rank."""
    local = getattr(zero, "optim", None)
    if not isinstance(local, FusedOptimizer):
        raise TypeError("zero_numbering: expected a torch.distributed.optim.ZeroRedundancyOptimizer whose "
                        f"optimizer_class is a fusedopt optimizer, got {type(zero).__name__}"
                        + (f" holding a {type(local).__name__}" if local is not None else ""))
    if not isinstance(getattr(type(zero), "_param_to_index", None), property):
        raise TypeError(f"zero_numbering: this torch's {type(zero).__name__} has no _param_to_index property "
                        "(the global numbering of its state_dict)")
    zero_ref = weakref.ref(zero)  # the local optimizer is zero's: no reference cycle

    def numbering():
        owner = zero_ref()
        if owner is None:
            raise RuntimeError("zero_numbering: the ZeroRedundancyOptimizer that numbered this optimizer's "
                               "parameters is gone")
        return owner._param_to_index

    local.__dict__["_numbering"] = numbering
    local.__dict__.pop("_plans", None)


# Note [Checked state_dict]
# torch's load_state_dict checks only the number of groups and of parameters per group; the state it
# casts to each parameter's dtype and device and otherwise takes as it comes. A state of the wrong
# shape, a missing buffer (which _state would silently recreate as zeros) or a missing step (which
# would restart the bias corrections) would make training silently wrong or fail later inside a
# step, so load_state_dict checks every parameter's state against the group it is loaded into, before
# anything is changed: known keys only; every buffer the group uses, and 'step' (torch's SGD keeps
# none: _step_required False), present; buffers None (not made yet, as torch's SGD before 2.3 saved its
# momentum with momentum 0, and fusedopt.SGD saves one no step has seeded) or tensors of the parameter's
# shape, real floating point for a real parameter (cast to its dtype, as torch does) and of its very dtype
# for a complex one (torch does not cast those); the step a whole number >= 0, as a number or a one-element
# float tensor.

def _check_layout(opt, state_dict):
    """The containers and the group sizes of a state_dict loaded into opt."""
    name = f"{type(opt).__name__}.load_state_dict"
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= state_dict.keys():
        raise ValueError(f"{name}: expected a dict with 'state' and 'param_groups', got "
                         f"{sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__}")
    groups, state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{name}: 'state' must be a dict, got {type(state).__name__}")
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, Mapping) and "params" in g for g in groups):
        raise ValueError(f"{name}: 'param_groups' must be a list of dicts with 'params'")
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"{name}: the state_dict has {len(groups)} parameter groups, this optimizer "
                         f"{len(opt.param_groups)}")
    for i, (saved, group) in enumerate(zip(groups, opt.param_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"{name}: parameter group {i} of the state_dict has {len(saved['params'])} "
                             f"parameters, this optimizer's {len(group['params'])}")


def _check_state(opt, state, groups):
    """Each parameter's saved state against the group (saved options) it is loaded into."""
    name = f"{type(opt).__name__}.load_state_dict"
    where = {}  # saved parameter id -> (parameter, its group)
    for saved, group in zip(groups, opt.param_groups):
        where.update((i, (p, saved)) for i, p in zip(saved["params"], group["params"]))
    for i, entries in state.items():
        if i not in where:
            raise ValueError(f"{name}: the state_dict holds state for parameter {i!r}, which none of its "
                             "parameter groups lists")
        p, group = where[i]
        if not isinstance(entries, Mapping):
            raise ValueError(f"{name}: the state of parameter {i} must be a dict, got {type(entries).__name__}")
        if not entries:
            continue
        spec = opt._buffers(group)
        unknown = set(entries) - {k for k, _ in spec} - {"step"}
        if unknown:
            raise ValueError(f"{name}: the state of parameter {i} has {sorted(unknown)}, which "
                             f"{type(opt).__name__} does not keep (a state_dict of another optimizer?)")
        needed = [k for k, used in spec if used] + ["step"] * opt._step_required
        missing = [k for k in needed if k not in entries]
        if missing:
            raise ValueError(f"{name}: the state of parameter {i} lacks {missing}, which its group"
                             f"{_options_text(group)} uses")
        for key, value in entries.items():
            if key == "step":
                _check_step(value, f"{name}: the step of parameter {i}")
                continue
            what = f"{name}: state '{key}' of parameter {i}"
            if value is None:  # not made yet (torch.optim.SGD's momentum_buffer); the next step makes it
                continue
            if not torch.is_tensor(value):
                raise ValueError(f"{what} must be a tensor, got {type(value).__name__}")
            if value.shape != p.shape:
                raise ValueError(f"{what} has shape {tuple(value.shape)}, the parameter {tuple(p.shape)}")
            fits = value.dtype == p.dtype if p.is_complex() else value.is_floating_point()
            if not fits:
                raise ValueError(f"{what} has dtype {value.dtype}, which cannot hold the state of a "
                                 f"{p.dtype} parameter")


def _check_step(value, what):
    if torch.is_tensor(value):
        if value.numel() != 1 or value.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{what} must be a number or a one-element float32/float64 tensor, got a "
                             f"{value.dtype} tensor of shape {tuple(value.shape)}")
        value = value.item()
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number or a one-element float tensor, got {type(value).__name__}")
    if not (0 <= value < 2**53 and value == int(value)):
        raise ValueError(f"{what} must be a whole number >= 0, got {value}")


def _options_text(group):
    """The options that decide which buffers a group uses, for a message."""
    shown = [f"{k}={group[k]}" for k in ("amsgrad", "centered", "momentum") if k in group]
    return f" ({', '.join(shown)})" if shown else ""


def _columns(rows):
    """Per-parameter rows of operands -> the op's lists; a buffer not in use (None) is an empty list."""
    return [[] if col[0] is None else list(col) for col in zip(*rows)]


def _operand(t, copies):
    """t as the op takes it: local, real and contiguous (Note [One op call per device and dtype])."""
    t = _local(t)
    if t is None:
        return None
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.is_contiguous():
        return t
    c = t.contiguous()
    copies.append((t, c))
    return c


def _local(t):
    """Note [DTensor operands]
    FSDP2 (torch.distributed.fsdp.fully_shard) makes each parameter a DTensor whose gradient is a DTensor
    too, and torch.full_like(p) makes the state buffers DTensors, as torch's optimizers keep them in
    state_dict(). fusedopt's ops have no DTensor sharding rule, and need none: every rule is elementwise, so
    the op updates each rank's shard (to_local(): the local tensor itself, no copy, under no_grad) in place.
    Only the gradient mask and the rounding bits depend on where an element lies in its parameter: each
    shard hands the op the index of its first element (_shard_offset). torch.distributed.tensor is looked up
    in sys.modules, not imported: importing it takes about a second, and without it no tensor is a
    DTensor."""
    if type(t) is torch.Tensor:  # the common case, a gradient: a quicker test than isinstance
        return t
    dtensor = sys.modules.get("torch.distributed.tensor")
    return t.to_local() if dtensor is not None and isinstance(t, dtensor.DTensor) else t


def _ranks():
    """The world size of torch.distributed's default group, 1 when it is not initialized."""
    dist = sys.modules.get("torch.distributed")
    return dist.get_world_size() if dist is not None and dist.is_available() and dist.is_initialized() else 1


def _shard_offset(p):
    """The index, in p's whole parameter (as real numbers), of the first element of p's local shard: 0 for a
    plain tensor; None where the shard is not one run of the parameter's row-major elements, as FSDP2's dim-0
    shards are (a tensor-parallel Shard(1), a _StridedShard). A shard's gradient mask and rounding bits are
    then those of unsharded training (Note [Shard offsets] in csrc/include/fusedopt/philox.h); one that is not a
    run cannot mask its gradient (_unmaskable) and draws its rounding bits as a tensor of its own."""
    if _local(p) is p:
        return 0
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, start = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    run = all(type(placement) in (Shard, Replicate) for placement in p.placements) and all(
        size == whole or math.prod(shape[:d]) == 1 for d, (size, whole) in enumerate(zip(shape, p.shape)))
    if not run:
        return None
    stride = 2 if p.is_complex() else 1  # view_as_real: two numbers per element
    offset = 0
    for d in reversed(range(p.dim())):
        offset += start[d] * stride
        stride *= p.shape[d]
    return offset


def _unmaskable(opt, p):
    """The error for masking the gradient of a DTensor parameter whose shard is not one run of its elements."""
    return NotImplementedError(
        f"{type(opt).__name__}: grad_keep_prob < 1 needs each shard of a DTensor parameter to be one run of its "
        f"row-major elements (FSDP2's dim-0 shards are), got placements {tuple(p.placements)} with a local shard "
        f"of shape {tuple(p.to_local().shape)} of {tuple(p.shape)}")


def _state_dtype(p, group):
    """The dtype of p's state buffers: p's, or float32 (complex64) for a float16/bfloat16 (complex32)
    parameter in a group with state_dtype=torch.float32 (Note [State dtype] in csrc/include/fusedopt/checks.h)."""
    if group["state_dtype"] is torch.float32:
        if p.dtype in (torch.float16, torch.bfloat16):
            return torch.float32
        if p.dtype is torch.complex32:
            return torch.complex64
    return p.dtype


def _common(group):
    """The options every op takes, from a param group."""
    seed = group["grad_mask_seed"]
    return dict(weight_decay=float(group["weight_decay"]), l1_decay=float(group["l1_decay"]),
                decoupled_weight_decay=bool(group["decoupled_weight_decay"]), maximize=bool(group["maximize"]),
                grad_keep_prob=float(group["grad_keep_prob"]),
                grad_mask_seed=seed - 2**64 if seed >= 2**63 else seed)  # the op's int is signed 64-bit
