"""Malformed calls of the CPU optimizer ops: each documented error path is a RuntimeError with a plain message
that names the problem, raised before anything is written; and a hypothesis run over the whole op surface
(in a subprocess, so that a crash fails a test instead of killing pytest) that must only ever raise."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusedopt._ext  # noqa: F401  (registers torch.ops.fusedopt.*)

OPS = torch.ops.fusedopt
ROOT = Path(__file__).resolve().parent.parent

# Per optimizer: the state lists in schema order, each with when a configuration uses it.
STATE_LISTS = {
    "sgd": {"momentum_buffers": lambda o: o["momentum"] != 0},
    "adagrad": {"state_sums": lambda o: True},
    "rmsprop": {"square_avgs": lambda o: True, "grad_avgs": lambda o: o["centered"],
                "momentum_buffers": lambda o: o["momentum"] > 0},
    "adam": {"exp_avgs": lambda o: True, "exp_avg_sqs": lambda o: True, "max_exp_avg_sqs": lambda o: o["amsgrad"]},
}
# Options under which every state list is used.
ALL_STATES = dict(sgd=dict(momentum=0.9), adagrad={}, rmsprop=dict(centered=True, momentum=0.9),
                  adam=dict(amsgrad=True))


class Call:
    """A valid op call (by default with every state list in use), to be broken one argument at a time.
    fill_all=True fills every state list, used or not."""

    def __init__(self, opt, sizes=(5, 35, 1), dtype=torch.float32, fill_all=False, **options):
        gen = torch.Generator().manual_seed(0)
        rand = lambda k: torch.randn(k, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
        self.opt = opt
        self.kwargs = {"lr": 0.1} | ALL_STATES[opt] | options
        self.lists = {"params": [rand(k) for k in sizes], "grads": [rand(k) for k in sizes]}
        for name, used in STATE_LISTS[opt].items():
            self.lists[name] = [rand(k).abs() for k in sizes] if fill_all or used(self.kwargs) else []
        self.lists["steps"] = [torch.tensor(2.0) for _ in sizes]
        self.indices = list(range(len(sizes)))

    def tensors(self):
        out = [t for ts in self.lists.values() for t in ts]
        return out + [self.kwargs[k] for k in ("grad_scale", "found_inf") if self.kwargs.get(k) is not None]

    def __call__(self):
        getattr(OPS, self.opt + "_")(*self.lists.values(), self.indices, **self.kwargs)


def _bits(t):
    t = t.to_dense() if t.layout != torch.strided else t
    return t.detach().reshape(-1).clone(memory_format=torch.contiguous_format).view(torch.uint8)


def expect_error(call, match):
    """The call raises RuntimeError matching `match` and every tensor it was given keeps its bits."""
    before = [_bits(t) for t in call.tensors()]
    with pytest.raises(RuntimeError, match=match):
        call()
    after = [_bits(t) for t in call.tensors()]
    assert len(before) == len(after)
    for j, (a, b) in enumerate(zip(before, after)):
        assert torch.equal(a, b), f"tensor {j} of the failed call was modified"


def test_valid_call_runs():
    """The baseline the other tests break is itself valid, and it writes: so 'nothing changed' means something."""
    for opt in STATE_LISTS:
        call = Call(opt)
        before = [t.clone() for t in call.lists["params"]]
        call()
        assert all(not torch.equal(a, b) for a, b in zip(before, call.lists["params"]))
        assert [s.item() for s in call.lists["steps"]] == [3.0, 3.0, 3.0]


# List lengths.

@pytest.mark.parametrize("opt", list(STATE_LISTS))
@pytest.mark.parametrize("which", ["params", "grads", "steps", "state"])
def test_list_length_mismatch(opt, which):
    call = Call(opt)
    name = list(STATE_LISTS[opt])[-1] if which == "state" else which
    if name == "params":
        call.lists[name].append(torch.zeros(3))
        expect_error(call, r"got 4 params but 3 grads")
    else:
        call.lists[name].pop()
        expect_error(call, rf"(3 params but 2 {name}|{name} must hold 3 tensors in this configuration, got 2)")


@pytest.mark.parametrize("opt", list(STATE_LISTS))
def test_indices_length_mismatch(opt):
    call = Call(opt)
    call.indices.append(3)
    expect_error(call, r"got 3 params but 4 indices")


@pytest.mark.parametrize("opt, options, name", [
    ("sgd", dict(momentum=0.0), "momentum_buffers"),
    ("rmsprop", dict(centered=False), "grad_avgs"),
    ("rmsprop", dict(momentum=0.0), "momentum_buffers"),
    ("adam", dict(amsgrad=False), "max_exp_avg_sqs"),
])
def test_unused_state_list_must_be_empty(opt, options, name):
    call = Call(opt, fill_all=True, **options)
    expect_error(call, rf"{name} must hold 0 tensors in this configuration, got 3")


# Tensors: size, dtype, layout, contiguity.

@pytest.mark.parametrize("opt", list(STATE_LISTS))
@pytest.mark.parametrize("which", ["grads", "state"])
def test_numel_mismatch(opt, which):
    call = Call(opt)
    name = list(STATE_LISTS[opt])[0] if which == "state" else which
    call.lists[name][1] = torch.zeros(34)
    expect_error(call, rf"{name}\[1\] has 34 elements, params\[1\] has 35")


@pytest.mark.parametrize("which, dtype", [("grads", torch.float64), ("state", torch.float16),
                                          ("params", torch.float64)])
def test_dtype_mismatch(which, dtype):
    call = Call("adam")
    name = "exp_avg_sqs" if which == "state" else which
    call.lists[name][2] = call.lists[name][2].to(dtype)
    if name == "params":
        call.lists["grads"][2] = call.lists["grads"][2].to(dtype)  # params[2] disagrees with params[0]
    expect_error(call, rf"{name}\[2\] has dtype {dtype_name(dtype)}, expected Float")


@pytest.mark.parametrize("param, state, match", [
    (torch.float32, torch.float64, r"exp_avgs\[0\] has dtype Double; the state of Float parameters must be Float \("),
    (torch.float64, torch.float32, r"the state of Double parameters must be Double \("),
    (torch.bfloat16, torch.float64, r"the state of BFloat16 parameters must be BFloat16 or float32"),
    (torch.float16, torch.bfloat16, r"the state of Half parameters must be Half or float32"),
])
def test_state_dtype_must_fit_the_params(param, state, match):
    """Note [State dtype]: the params' dtype, or float32 for half params; nothing else."""
    call = Call("adam", dtype=param)
    for name in STATE_LISTS["adam"]:
        call.lists[name] = [t.to(state) for t in call.lists[name]]
    expect_error(call, match)


def test_state_lists_share_one_dtype():
    call = Call("adam", dtype=torch.bfloat16)
    for name in STATE_LISTS["adam"]:
        call.lists[name] = [t.float() for t in call.lists[name]]
    call.lists["max_exp_avg_sqs"][1] = call.lists["max_exp_avg_sqs"][1].to(torch.bfloat16)
    expect_error(call, r"max_exp_avg_sqs\[1\] has dtype BFloat16, expected Float \(every state tensor")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("opt", list(STATE_LISTS))
def test_stochastic_rounding_needs_bf16(opt, dtype):
    expect_error(Call(opt, dtype=dtype, stochastic_rounding=True),
                 rf"stochastic_rounding applies to bfloat16 parameters, got {dtype_name(dtype)}")


def dtype_name(dtype):
    return {torch.float64: "Double", torch.float16: "Half", torch.float32: "Float"}[dtype]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.complex64, torch.bool, torch.uint8])
@pytest.mark.parametrize("opt", list(STATE_LISTS))
def test_unsupported_dtype(opt, dtype):
    call = Call(opt)
    for name in call.lists:
        if name != "steps":
            call.lists[name] = [torch.ones(t.shape, dtype=dtype) for t in call.lists[name]]
    expect_error(call, r"parameters must be float32, float64, float16 or bfloat16")


@pytest.mark.parametrize("opt", list(STATE_LISTS))
@pytest.mark.parametrize("which", ["params", "grads", "state"])
@pytest.mark.parametrize("how", ["transposed", "strided", "expanded"])
def test_non_contiguous_rejected(opt, which, how):
    call = Call(opt)
    name = list(STATE_LISTS[opt])[-1] if which == "state" else which
    t = call.lists[name][1]  # 35 elements
    if how == "transposed":
        bad = t.reshape(5, 7).t()
    elif how == "strided":
        bad = torch.zeros(70, dtype=t.dtype)[::2]
    else:
        bad = torch.zeros(1, dtype=t.dtype).expand(35)
    assert not bad.is_contiguous() and bad.numel() == 35
    call.lists[name][1] = bad
    expect_error(call, rf"{name}\[1\] must be contiguous")


@pytest.mark.parametrize("opt", list(STATE_LISTS))
def test_sparse_grad_rejected(opt):
    call = Call(opt)
    call.lists["grads"][1] = call.lists["grads"][1].to_sparse()
    expect_error(call, r"grads\[1\] must be dense \(strided\).*sparse gradients are not supported")


# Steps, AMP tensors.

@pytest.mark.parametrize("step, match", [
    (torch.tensor(2, dtype=torch.int64), r"steps\[1\] must be float32 or float64, got Long"),
    (torch.tensor(2.0, dtype=torch.float16), r"steps\[1\] must be float32 or float64, got Half"),
    (torch.tensor([2.0, 2.0]), r"steps\[1\] must hold one element"),
    (torch.zeros(0), r"steps\[1\] must hold one element"),
    (torch.tensor(-1.0), r"steps\[1\] must hold a non-negative whole number, got -1"),
    (torch.tensor(0.5, dtype=torch.float64), r"steps\[1\] must hold a non-negative whole number, got 0.5"),
    (torch.tensor(math.nan), r"steps\[1\] must hold a non-negative whole number, got nan"),
    (torch.tensor(math.inf), r"steps\[1\] must hold a non-negative whole number, got inf"),
    (torch.tensor(1e20, dtype=torch.float64), r"steps\[1\] must hold a non-negative whole number"),
])
@pytest.mark.parametrize("opt", list(STATE_LISTS))
def test_bad_steps(opt, step, match):
    call = Call(opt)
    call.lists["steps"][1] = step
    expect_error(call, match)


@pytest.mark.parametrize("name", ["grad_scale", "found_inf"])
@pytest.mark.parametrize("value, match", [
    (torch.ones(2), r"must hold one element, got 2"),
    (torch.ones(0), r"must hold one element, got 0"),
    (torch.ones(1, dtype=torch.float64), r"must be float32, got Double"),
    (torch.ones(1, dtype=torch.int32), r"must be float32, got Int"),
    (torch.ones(1, dtype=torch.float16), r"must be float32, got Half"),
])
@pytest.mark.parametrize("opt", list(STATE_LISTS))
def test_bad_amp_tensors(opt, name, value, match):
    call = Call(opt)
    call.kwargs[name] = value
    expect_error(call, f"{name} {match}")


# Aliasing (Note [Aliasing] in checks.h).

@pytest.mark.parametrize("opt", list(STATE_LISTS))
@pytest.mark.parametrize("how", ["param_is_grad", "state_is_param", "states_alias", "param_twice",
                                 "overlapping_views", "shared_step", "step_in_param"])
def test_aliasing_rejected(opt, how):
    call = Call(opt, sizes=(5, 35, 1))
    lists = call.lists
    states = list(STATE_LISTS[opt])
    first_state = states[0]
    if how == "param_is_grad":
        lists["grads"][1] = lists["params"][1]
    elif how == "state_is_param":
        lists[first_state][0] = lists["params"][0]
    elif how == "states_alias":
        if len(states) == 1:  # a state tensor shared by two parameters
            lists[first_state][2] = lists[first_state][0][:1]
        else:
            lists[states[1]][1] = lists[first_state][1]
    elif how == "param_twice":
        lists["params"][2] = lists["params"][0][2:3]
    elif how == "overlapping_views":  # two params, views of one storage that overlap by 2 elements
        base = torch.randn(38)
        lists["params"][0], lists["params"][1] = base[:5], base[3:]
    elif how == "shared_step":
        lists["steps"][2] = lists["steps"][0]
    else:  # a step that is an element of a parameter
        lists["params"][1][4] = 1.0
        lists["steps"][0] = lists["params"][1][4]
    expect_error(call, r"share memory; every mutated tensor must be distinct")


@pytest.mark.parametrize("opt", list(STATE_LISTS))
def test_aliasing_rejected_after_the_same_tensors_passed(opt):
    """Note [Aliasing]: a call with the byte ranges of a call that passed skips the sort. An aliasing call
    is still rejected after passing calls (more of them than are remembered), and the valid call then
    passes again."""
    call = Call(opt, sizes=(5, 35, 1))
    others = [Call(opt, sizes=(3, 4)) for _ in range(5)]
    for c in [call, *others, call, call]:
        c()
    grad = call.lists["grads"][1]
    call.lists["grads"][1] = call.lists["params"][1]
    expect_error(call, r"share memory; every mutated tensor must be distinct")
    call.lists["grads"][1] = grad
    call()
    assert [s.item() for s in call.lists["steps"]] == [6.0, 6.0, 6.0]


def test_disjoint_views_of_one_storage_are_fine():
    """Views that do not overlap are legal: adjacent slices of one flat buffer (how FSDP flattens)."""
    call = Call("adam")
    base = torch.randn(41)
    call.lists["params"] = [base[:5], base[5:40], base[40:]]
    call()
    assert [s.item() for s in call.lists["steps"]] == [3.0, 3.0, 3.0]


# Hyper-parameters and indices.

BAD_HYPER = [
    ("sgd", dict(lr=-0.1), r"invalid lr: -0.1"),
    ("adam", dict(lr=math.nan), r"invalid lr: nan"),
    ("adagrad", dict(lr=math.inf), r"invalid lr: inf"),
    ("rmsprop", dict(weight_decay=-1.0), r"invalid weight_decay: -1"),
    ("adam", dict(l1_decay=math.nan), r"invalid l1_decay: nan"),
    ("sgd", dict(grad_keep_prob=0.0), r"invalid grad_keep_prob: 0"),
    ("adam", dict(grad_keep_prob=1.5), r"invalid grad_keep_prob: 1.5"),
    ("adagrad", dict(grad_keep_prob=math.nan), r"invalid grad_keep_prob: nan"),
    ("rmsprop", dict(grad_keep_prob=-0.5), r"invalid grad_keep_prob: -0.5"),
    ("adam", dict(beta1=1.0), r"invalid beta1: 1"),
    ("adam", dict(beta1=-0.1), r"invalid beta1: -0.1"),
    ("adam", dict(beta2=1.0), r"invalid beta2: 1"),
    ("adam", dict(beta2=math.nan), r"invalid beta2: nan"),
    ("adam", dict(eps=-1e-8), r"invalid eps: -1e-08"),
    ("adagrad", dict(eps=-1.0), r"invalid eps: -1"),
    ("rmsprop", dict(eps=math.nan), r"invalid eps: nan"),
    ("adagrad", dict(lr_decay=-0.1), r"invalid lr_decay: -0.1"),
    ("rmsprop", dict(alpha=-0.5), r"invalid alpha: -0.5"),
    ("rmsprop", dict(momentum=-0.9), r"invalid momentum: -0.9"),
    ("sgd", dict(momentum=-0.9), r"invalid momentum: -0.9"),
    ("sgd", dict(dampening=math.inf), r"invalid dampening: inf"),
    ("sgd", dict(nesterov=True, dampening=0.1), r"nesterov momentum requires a momentum and zero dampening"),
    ("sgd", dict(nesterov=True, momentum=0.0), r"nesterov momentum requires a momentum and zero dampening"),
    ("sgd", dict(ema_momentum=True, dampening=0.1), r"ema_momentum requires dampening=0"),
    ("sgd", dict(ema_momentum=True, nesterov=True), r"nesterov and ema_momentum are exclusive"),
]


@pytest.mark.parametrize("opt, options, match", BAD_HYPER,
                         ids=[f"{o}-" + "-".join(f"{k}={v}" for k, v in kw.items()) for o, kw, _ in BAD_HYPER])
def test_bad_hyper_parameters(opt, options, match):
    expect_error(Call(opt, **options), match)


@pytest.mark.parametrize("index", [-1, 2**24, 2**40])
@pytest.mark.parametrize("opt", list(STATE_LISTS))
def test_index_out_of_range(opt, index):
    call = Call(opt)
    call.indices[2] = index
    expect_error(call, rf"indices\[2\] must lie in \[0, 2\^24\), got {index}")


@pytest.mark.parametrize("value", ["bogus", "avx2", "AVX1024"])
@pytest.mark.parametrize("opt", list(STATE_LISTS))
def test_bad_isa_env(opt, value, monkeypatch):
    monkeypatch.setenv("FUSEDOPT_CPU_ISA", value)
    expect_error(Call(opt), rf"FUSEDOPT_CPU_ISA must be DEFAULT, AVX2 or AVX512, got {value}")


def test_stream_bad_input():
    a, b = torch.ones(8), torch.ones(8)
    for x, y, match in [(a, b.double(), "expected float32"), (a, torch.ones(7), "equal size"),
                        (torch.ones(16)[::2], b, "contiguous")]:
        before = x.clone()
        with pytest.raises(RuntimeError, match=match):
            OPS.stream_(x, y, 2.0)
        assert torch.equal(x, before)


# Crash-safety, in subprocesses.

def _run_python(args, timeout):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_empty_lists_never_touch_the_amp_tensors():
    """With no parameters nothing is read: not even a found_inf or grad_scale with no element (this used to
    dereference a null pointer)."""
    code = ("import torch, fusedopt._ext\n"
            "torch.ops.fusedopt.sgd_([], [], [], [], [], lr=0.1, found_inf=torch.empty(0, dtype=torch.int64))\n"
            "torch.ops.fusedopt.adam_([], [], [], [], [], [], [], lr=0.1, grad_scale=torch.empty(0))\n"
            "print('ok')\n")
    proc = _run_python(["-c", code], timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", \
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"


FUZZ_EXAMPLES = 400


def test_fuzz_op_surface(isas, tmp_path):
    """Hypothesis over every CPU op (optimizers with float and tensor lr, dropout, stream_): random list
    lengths, shapes, dtypes, strides, aliasing, steps, indices, AMP tensors, draws, ISAs and scalars (NaN,
    ±inf, negative, huge): every call either succeeds cleanly (steps advanced by one, outputs of the right
    shape) or raises RuntimeError/ValueError/TypeError having changed nothing (tests/_fuzz_worker.py)."""
    last = tmp_path / "last_call.txt"
    proc = _run_python(["tests/_fuzz_worker.py", "--examples", str(FUZZ_EXAMPLES), "--isas", ",".join(isas),
                        "--last-call", str(last)], timeout=600)
    detail = f"exit {proc.returncode}\nstdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-6000:]}"
    if proc.returncode < 0:  # killed by a signal: say which call did it
        detail = f"worker crashed (signal {-proc.returncode}) during:\n{last.read_text()}\n{detail}"
    assert proc.returncode == 0, detail
    calls = int(proc.stdout.split("fuzzed ")[1].split()[0])
    assert calls >= FUZZ_EXAMPLES * 3 // 4, detail  # stream_ calls (1 in 20) are not counted
