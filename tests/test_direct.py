"""fusedopt.ops calls the optimizer ops directly from C++ (Note [Direct calls] in csrc/module.cpp): the same
results and errors as torch.ops, through the same dispatcher (version counters, profiler, dispatch modes), no
reference left behind, and torch.ops wherever the direct call declines."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _modes import Counting, Sub
from fusedopt import _C, ops

STATES = {"sgd_": ["momentum_buffers"], "adagrad_": ["state_sums"],
          "rmsprop_": ["square_avgs", "grad_avgs", "momentum_buffers"],
          "adam_": ["exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"]}
OPTIONS = {"sgd_": dict(momentum=0.9, nesterov=True), "adagrad_": dict(lr_decay=0.01),
           "rmsprop_": dict(centered=True, momentum=0.5), "adam_": dict(amsgrad=True)}
COMMON = dict(weight_decay=0.01, l1_decay=1e-3, decoupled_weight_decay=False, maximize=False,
              grad_keep_prob=0.7, grad_mask_seed=5, stochastic_rounding=False)
SIZES = [1, 7, 300, 4099]


def _call(op, sizes=SIZES, dtype=torch.float32, seed=0):
    """(lists, options) of a whole call of `op`: every list in use, every option given, as fusedopt.ops passes
    them."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda: [torch.randn(n, generator=g).to(dtype) for n in sizes]  # noqa: E731
    # every state non-negative, the first (v: a sum or mean of squares) the largest, so no rule makes a NaN
    states = [[t.abs() * 0.1 + (k == 0) for t in rand()] for k in range(len(STATES[op]))]
    lists = (rand(), rand(), *states, [torch.tensor(float(j)) for j in range(len(sizes))], list(range(len(sizes))))
    schema = getattr(torch.ops.fusedopt, op).default._schema
    options = {a.name: a.default_value for a in schema.arguments if a.kwarg_only}
    options.update(lr=0.01, **OPTIONS[op], **COMMON, grad_scale=torch.tensor(2.0), found_inf=torch.tensor(0.0))
    return lists, options


def _snapshot(lists):
    return [t.clone() for lst in lists[:-1] for t in lst]


OVERLOADS = [(op, overload) for op in STATES
             for overload in ("default", "tensor_lr") + (("tensor_betas",) if op == "adam_" else ())]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op, overload", OVERLOADS, ids=[f"{o}{v}" for o, v in OVERLOADS])
def test_direct_equals_torch_ops(op, overload, dtype):
    """Three steps through _C._call and through torch.ops: bitwise the same params, grads, state and steps."""
    direct, boxed = _call(op, dtype=dtype), _call(op, dtype=dtype)
    name = op if overload == "default" else f"{op}.{overload}"
    tensors = {"default": (), "tensor_lr": ("lr",), "tensor_betas": ("lr", "beta1", "beta2")}[overload]
    for lists, options in (direct, boxed):
        for key in tensors:
            options[key] = torch.tensor(options[key], dtype=torch.float64)
    packet = getattr(torch.ops.fusedopt, op)
    for _ in range(3):
        assert _C._call(name, direct[0], direct[1]) is None
        getattr(packet, overload)(*boxed[0], **boxed[1])
    for a, b in zip(_snapshot(direct[0]), _snapshot(boxed[0])):
        assert not a.isnan().any() and torch.equal(a, b)
    assert [s.item() for s in direct[0][-2]] == [j + 3.0 for j in range(len(SIZES))]


def _errors(op, lists, options):
    """The messages of a direct call and of torch.ops for the same bad call (None where nothing raised)."""
    messages = []
    for call in (lambda: _C._call(op, lists, options),
                 lambda: getattr(torch.ops.fusedopt, op).default(*lists, **options)):
        try:
            call()
            messages.append(None)
        except RuntimeError as e:
            messages.append(str(e).split("\n")[0])
    return messages


BAD = {
    "a grad missing": lambda lists, o: ((lists[0], lists[1][:-1], *lists[2:]), o),
    "a float64 grad": lambda lists, o: ((lists[0], [lists[1][0].double(), *lists[1][1:]], *lists[2:]), o),
    "aliased state": lambda lists, o: ((lists[0], lists[1], [lists[0][0], *lists[2][1:]], *lists[3:]), o),
    "a strided param": lambda lists, o: (([lists[0][0], torch.randn(14)[::2]], *lists[1:]), o),
    "a negative lr": lambda lists, o: (lists, {**o, "lr": -1.0}),
    "an index past 2^24": lambda lists, o: ((*lists[:-1], [2**24, *lists[-1][1:]]), o),
}


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("op", list(STATES))
def test_direct_raises_as_torch_ops(op, bad):
    """A bad call raises the same RuntimeError both ways and changes nothing."""
    lists, options = BAD[bad](*_call(op, sizes=[1, 7]))
    before = _snapshot(lists)
    direct, boxed = _errors(op, lists, options)
    assert direct is not None and direct == boxed
    for a, b in zip(_snapshot(lists), before):
        assert torch.equal(a, b)


def test_direct_leaves_reference_counts():
    lists, options = _call("adam_")
    tensors = [t for lst in lists[:-1] for t in lst] + [options["grad_scale"], options["found_inf"]]
    counts = [t._use_count() for t in tensors]
    _C._call("adam_", lists, options)
    with pytest.raises(RuntimeError):
        _C._call("adam_", (lists[0], lists[1][:-1], *lists[2:]), options)
    assert [t._use_count() for t in tensors] == counts


def test_direct_bumps_versions_and_refuses_grad():
    """The Autograd kernel runs: mutated lists' versions advance; requires-grad tensors under grad mode raise."""
    lists, options = _call("sgd_")
    versions = [t._version for t in lists[0] + lists[1] + lists[2]]
    _C._call("sgd_", lists, options)
    assert [t._version for t in lists[0] + lists[1] + lists[2]] == [v + 1 for v in versions]
    lists[0][0].requires_grad_()
    with pytest.raises(RuntimeError, match="requires grad while grad mode is on"):
        _C._call("sgd_", lists, options)
    with torch.no_grad():
        _C._call("sgd_", lists, options)


def test_direct_call_is_profiled():
    lists, options = _call("rmsprop_")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _C._call("rmsprop_", lists, options)
    assert "fusedopt::rmsprop_" in {e.key for e in prof.key_averages()}


class Recording(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_mode_sees_the_direct_call():
    lists, options = _call("adagrad_")
    expected = _call("adagrad_")
    with Recording() as mode:
        assert _C._call("adagrad_", lists, options) is None
    assert "fusedopt.adagrad_.default" in mode.ops
    torch.ops.fusedopt.adagrad_.default(*expected[0], **expected[1])
    for a, b in zip(_snapshot(lists), _snapshot(expected[0])):
        assert torch.equal(a, b)


DECLINED = {
    "a tensor subclass": lambda lists, o: (([lists[0][0].as_subclass(Sub), *lists[0][1:]], *lists[1:]), o),
    "a non-tensor in a list": lambda lists, o: ((lists[0], [1.0, *lists[1][1:]], *lists[2:]), o),
    "an option missing": lambda lists, o: (lists, {k: v for k, v in o.items() if k != "momentum"}),
    "an unknown option": lambda lists, o: (lists, {**o, "nesterov_momentum": True}),
    "a str option": lambda lists, o: (lists, {**o, "lr": "0.1"}),
    "an int too large": lambda lists, o: (lists, {**o, "grad_mask_seed": 2**64}),
    "a numpy-like float": lambda lists, o: (lists, {**o, "lr": torch.tensor(0.1).numpy()}),
    "an int for a bool": lambda lists, o: (lists, {**o, "nesterov": 1}),
    "a list of lists": lambda lists, o: ((lists[0], [lists[1]], *lists[2:]), o),
}


@pytest.mark.parametrize("case", list(DECLINED))
def test_direct_declines_what_is_not_plain(case):
    """NotImplemented, nothing changed: fusedopt.ops then goes through torch.ops, which decides as torch does."""
    lists, options = DECLINED[case](*_call("sgd_"))
    before = _snapshot([[t for t in lst if isinstance(t, torch.Tensor)] for lst in lists[:-1]] + [[]])
    assert _C._call("sgd_", lists, options) is NotImplemented
    after = _snapshot([[t for t in lst if isinstance(t, torch.Tensor)] for lst in lists[:-1]] + [[]])
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_direct_declines_under_a_torch_function_mode():
    lists, options = _call("sgd_")
    with Counting():
        assert _C._call("sgd_", lists, options) is NotImplemented


def test_unknown_op_name():
    with pytest.raises(ValueError, match="not an optimizer op"):
        _C._call("stream_", (), {})


def test_wrapper_falls_back_to_torch_ops():
    """fusedopt.ops with a tensor subclass and under a torch function mode: torch.ops runs the op, as before."""
    lists, options = _call("sgd_")
    expected = _call("sgd_")
    torch.ops.fusedopt.sgd_.default(*expected[0], **expected[1])
    subclass = [lists[0][0].as_subclass(Sub), *lists[0][1:]]
    with Counting() as mode:
        ops.sgd_(subclass, *lists[1:], **options)
    assert mode.calls > 0  # the op went through torch's __torch_function__ handling
    for a, b in zip(_snapshot(lists), _snapshot(expected[0])):
        assert torch.equal(a, b)


def test_parameters_are_plain():
    """nn.Parameter, what models hold, takes the direct call (THPVariable_CheckExact counts it as exact)."""
    lists, options = _call("adam_")
    expected = _call("adam_")
    params = [torch.nn.Parameter(p) for p in lists[0]]
    with torch.no_grad():
        assert _C._call("adam_", (params, *lists[1:]), options) is None
    torch.ops.fusedopt.adam_.default(*expected[0], **expected[1])
    for a, b in zip(params, expected[0][0]):
        assert torch.equal(a, b)
