"""Grid emulation: the CUDA kernels' per-chunk bodies, run on the host over the CUDA launch plan
(torch.ops.fusedopt._gridemu_*, csrc/cpu/gridemu.cpp), against the CPU ops, bitwise.

The emulation is the CUDA op minus the __global__ shell: the same validation, launch plan, chunk bodies and
step kernel (csrc/include/fusedopt/mta.h). So everything but the launch itself is checked here without a
GPU: chunking, tails, 16-byte vs scalar paths, misaligned tensors, tensors split across launches, 64-bit
index arithmetic on the plan's side, steps/grad_scale/found_inf read through pointers. Every dtype must
match the CPU op bit for bit (same operation order, explicit FMAs, correctly rounded division and sqrt,
round-to-nearest-even conversions). FUSEDOPT_GRIDEMU_PLAN="tensors,blocks,chunk,threads" shrinks the
plan's limits so small tensors cross every boundary.
"""
import itertools
import random
import zlib

import pytest
import torch

import fusedopt._ext  # noqa: F401  (registers torch.ops.fusedopt.*)

OPS = torch.ops.fusedopt
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
        torch.bfloat16: torch.int16}
SEED = 0x1234_5678_9ABC_DEF1

# Per optimizer: its state lists in schema order, and whether a configuration uses each.
STATE_LISTS = {
    "sgd": [("momentum_buffers", lambda o: o.get("momentum", 0) != 0)],
    "adagrad": [("state_sums", lambda o: True)],
    "rmsprop": [("square_avgs", lambda o: True), ("grad_avgs", lambda o: o.get("centered", False)),
                ("momentum_buffers", lambda o: o.get("momentum", 0) > 0)],
    "adam": [("exp_avgs", lambda o: True), ("exp_avg_sqs", lambda o: True),
             ("max_exp_avg_sqs", lambda o: o.get("amsgrad", False))],
}
# State lists that must stay non-negative (they go under a square root).
POSITIVE = {"state_sums", "square_avgs", "exp_avg_sqs", "max_exp_avg_sqs"}

VARIANTS = {
    "sgd": [dict(lr=0.05), dict(lr=0.05, momentum=0.9), dict(lr=0.05, momentum=0.9, dampening=0.3),
            dict(lr=0.05, momentum=0.9, nesterov=True), dict(lr=0.05, momentum=0.8, ema_momentum=True)],
    "adagrad": [dict(lr=0.1), dict(lr=0.1, lr_decay=0.05)],
    "rmsprop": [dict(lr=0.01), dict(lr=0.01, centered=True), dict(lr=0.01, momentum=0.9),
                dict(lr=0.01, alpha=0.9, centered=True, momentum=0.5)],
    "adam": [dict(lr=0.01, beta1=0.8, beta2=0.99), dict(lr=0.01, amsgrad=True),
             dict(lr=0.01, eps=1e-6, eps_inside_sqrt=True)],
}
DECAYS = [{}, dict(weight_decay=0.1), dict(l1_decay=0.2), dict(weight_decay=0.1, l1_decay=0.2),
          dict(weight_decay=0.1, decoupled_weight_decay=True), dict(l1_decay=0.2, decoupled_weight_decay=True),
          dict(weight_decay=0.1, l1_decay=0.2, decoupled_weight_decay=True)]
EXTRAS = [{}, dict(maximize=True), dict(grad_keep_prob=0.6, grad_mask_seed=SEED)]


def _dt(dtype):
    return str(dtype).removeprefix("torch.")


class Case:
    """One op call's inputs: params, grads, state lists, steps; each tensor optionally a view starting
    `offset` elements into its storage (misaligned for the 16-byte path)."""

    def __init__(self, opt, options, dtype, sizes, *, offsets=None, steps0=None, step_dtype=torch.float32,
                 seed=0, indices=None, state_dtype=None):
        rng = torch.Generator().manual_seed(seed)
        self.opt, self.options, self.dtype = opt, options, dtype
        self.lists = [name for name, used in STATE_LISTS[opt] if used(options)]
        offsets = offsets or {}
        steps0 = steps0 if steps0 is not None else [0] * len(sizes)

        def tensor(name, j, n):
            off = offsets.get((name, j), 0)
            x = torch.randn(n + off, generator=rng, dtype=torch.float64)
            if name in POSITIVE:
                x = x.abs() * 0.1 if steps0[j] else torch.zeros_like(x)
            elif name != "params" and name != "grads":
                x = x * 0.1 if steps0[j] else torch.zeros_like(x)
            return x.to(dtype if name in ("params", "grads") else state_dtype or dtype)[off:]

        self.tensors = {name: [tensor(name, j, n) for j, n in enumerate(sizes)]
                        for name in ["params", "grads"] + self.lists}
        if "grad_avgs" in self.tensors:  # centered RMSprop: v − a² ≥ 0
            for v, a in zip(self.tensors["square_avgs"], self.tensors["grad_avgs"]):
                v.copy_((v.double() + a.double() ** 2).to(v.dtype))
        self.steps = [torch.tensor(float(k), dtype=step_dtype) for k in steps0]
        self.indices = indices if indices is not None else list(range(len(sizes)))

    def clone(self, device="cpu"):
        """Fresh copies on `device`, keeping each tensor's offset within its storage; steps too."""
        def copy(t):
            off = t.storage_offset()
            base = torch.empty(off + t.numel(), dtype=t.dtype, device=device)
            return base[off:].view(t.shape).copy_(t)
        return ({k: [copy(t) for t in v] for k, v in self.tensors.items()},
                [s.to(device, copy=True) for s in self.steps])

    def call(self, op, tensors, steps, **amp):
        lists = [tensors[name] if name in tensors else [] for name, _ in STATE_LISTS[self.opt]]
        getattr(OPS, op)(tensors["params"], tensors["grads"], *lists, steps, self.indices, **self.options, **amp)


def _assert_bitwise(got, want, where):
    """Same bits, except that any NaN equals any NaN (payloads differ between CPU vector units, the
    scalar path and GPUs; e.g. fp16 centered RMSprop can reach √(v − a²) of a negative)."""
    for name in want[0]:
        for j, (g, w) in enumerate(zip(got[0][name], want[0][name])):
            assert g.dtype == w.dtype and g.shape == w.shape
            differ = (g.view(BITS[g.dtype]) != w.view(BITS[w.dtype])) & ~(g.isnan() & w.isnan())
            if differ.any():
                bad = differ.flatten().nonzero()[:5].flatten().tolist()
                raise AssertionError(f"{where}: {name}[{j}] differs from the CPU op at elements {bad}: "
                                     f"{g.flatten()[bad].tolist()} vs {w.flatten()[bad].tolist()}")
    for j, (g, w) in enumerate(zip(got[1], want[1])):
        assert g.dtype == w.dtype and g.item() == w.item(), f"{where}: steps[{j}] {g.item()} vs {w.item()}"


def run_both(case, steps=1, **amp):
    """`steps` chained calls of the CPU op and of the emulation on copies of the case; returns both."""
    cpu, emu = case.clone(), case.clone()
    for _ in range(steps):
        case.call(case.opt + "_", *cpu, **amp)
        case.call("_gridemu_" + case.opt + "_", *emu, **amp)
    return emu, cpu


@pytest.fixture
def plan(monkeypatch):
    """plan("tensors,blocks,chunk,threads") shrinks the emulated launch limits for the rest of the test."""
    monkeypatch.delenv("FUSEDOPT_GRIDEMU_PLAN", raising=False)
    return lambda limits: monkeypatch.setenv("FUSEDOPT_GRIDEMU_PLAN", limits)


@pytest.fixture(autouse=True)
def _default_plan(monkeypatch):
    monkeypatch.delenv("FUSEDOPT_GRIDEMU_PLAN", raising=False)


def test_same_schemas():
    for opt in STATE_LISTS:
        for overload in ("default", "tensor_lr") + (("tensor_betas",) if opt == "adam" else ()):
            real = str(getattr(getattr(OPS, opt + "_"), overload)._schema)
            emu = str(getattr(getattr(OPS, "_gridemu_" + opt + "_"), overload)._schema)
            assert emu == real.replace(f"fusedopt::{opt}_", f"fusedopt::_gridemu_{opt}_", 1)


# Every optimizer × variant × decay × extra × dtype, 3 chained steps, odd sizes, bitwise; once with the
# CUDA launcher's own limits and once with limits that split everything.
SIZES = [1, 7, 64, 65, 4099, 0, 300]


@pytest.mark.parametrize("limits", [None, "2,3,64,32"], ids=["cuda-plan", "small-plan"])
@pytest.mark.parametrize("opt, variant", [(o, i) for o in VARIANTS for i in range(len(VARIANTS[o]))],
                         ids=[f"{o}{i}" for o in VARIANTS for i in range(len(VARIANTS[o]))])
def test_every_option_bitwise(opt, variant, limits, plan):
    if limits:
        plan(limits)
    for dtype, (d, decay), (e, extra) in itertools.product(DTYPES, enumerate(DECAYS), enumerate(EXTRAS)):
        options = {**VARIANTS[opt][variant], **decay, **extra}
        case = Case(opt, options, dtype, SIZES, steps0=[0, 1, 2, 5, 0, 3, 1000],
                    offsets={("grads", 1): 1, ("params", 6): 3}, seed=zlib.crc32(repr((opt, variant, d, e)).encode()))
        _assert_bitwise(*run_both(case, steps=3), f"{options} {_dt(dtype)}")


# float32 state for half params, and stochastic rounding of bf16 params (Note [State dtype], Note
# [Stochastic rounding]): the device bodies' mixed storage and rounding words against the CPU op.
@pytest.mark.parametrize("kind", [(torch.float16, False), (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=["float16", "bfloat16", "bfloat16-sr"])
@pytest.mark.parametrize("limits", [None, "2,3,64,32"], ids=["cuda-plan", "small-plan"])
@pytest.mark.parametrize("opt, variant", [(o, i) for o in VARIANTS for i in range(len(VARIANTS[o]))],
                         ids=[f"{o}{i}" for o in VARIANTS for i in range(len(VARIANTS[o]))])
def test_fp32_state_bitwise(opt, variant, limits, kind, plan):
    if limits:
        plan(limits)
    dtype, stochastic = kind
    for d, e in [(3, 2), (6, 1), (0, 0)]:
        options = {**VARIANTS[opt][variant], **DECAYS[d], **EXTRAS[e], "stochastic_rounding": stochastic,
                   "grad_mask_seed": SEED}
        case = Case(opt, options, dtype, SIZES, steps0=[0, 1, 2, 5, 0, 3, 1000], state_dtype=torch.float32,
                    offsets={("grads", 1): 1, ("params", 6): 3, ("exp_avgs", 3): 2},
                    seed=zlib.crc32(repr((opt, variant, d, e, "fp32")).encode()))
        _assert_bitwise(*run_both(case, steps=3), f"{options} {_dt(dtype)} fp32 state")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_misaligned_starts(dtype, plan):
    """Every list of every tensor at every offset mod 16 bytes: the scalar path where any pointer of a
    tensor is misaligned, the 16-byte path elsewhere; tails of every length."""
    plan("3,4,16,4")
    opt, options = "adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1, grad_keep_prob=0.7, grad_mask_seed=7)
    names = ["params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"]
    per = 16 // dtype.itemsize if dtype.itemsize < 16 else 1
    sizes, offsets = [], {}
    for j, (name, off) in enumerate(itertools.product(names, range(per))):
        sizes.append(37 + j)
        offsets[(name, j)] = off
    case = Case(opt, options, dtype, sizes, offsets=offsets, steps0=[1] * len(sizes), seed=11)
    _assert_bitwise(*run_both(case, steps=2), f"misaligned {_dt(dtype)}")


@pytest.mark.parametrize("limits", ["1,1,8,1", "1,1,8,3", "2,5,24,7", "4,2,64,64", "100,1000,4096,512"])
def test_plan_shapes(limits, plan):
    """Tensors split across launches (block budget), launches full of tensors (tensor budget), one thread
    per block, more threads than a chunk needs: all give the CPU op's bits."""
    plan(limits)
    sizes = [1, 8, 9, 23, 24, 25, 100, 1001, 3, 0, 4096, 4097]
    for opt, options in [("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, grad_keep_prob=0.5, grad_mask_seed=3)),
                         ("rmsprop", dict(lr=0.01, centered=True, momentum=0.9, l1_decay=0.01))]:
        case = Case(opt, options, torch.float32, sizes, steps0=list(range(len(sizes))), seed=5)
        _assert_bitwise(*run_both(case, steps=2), f"{limits} {opt}")


def test_every_element_updated_once(plan):
    """SGD θ ← θ − 1·g with g = 1 over a plan that splits tensors across launches and chunks: every
    element moves by exactly one (nothing skipped, nothing done twice)."""
    plan("2,3,8,3")
    sizes = [1, 7, 8, 9, 16, 17, 40, 41, 5]
    params = [torch.zeros(n) for n in sizes]
    grads = [torch.ones(n) for n in sizes]
    steps = [torch.zeros(()) for _ in sizes]
    OPS._gridemu_sgd_(params, grads, [], steps, list(range(len(sizes))), lr=1.0)
    for p in params:
        assert torch.equal(p, torch.full_like(p, -1.0))
    assert all(s.item() == 1 for s in steps)


def test_more_steps_than_one_step_launch():
    """More tensors than one step launch holds (StepTable::K = 3583): every step advances once."""
    n = 3700
    case = Case("sgd", dict(lr=0.1, grad_keep_prob=0.9, grad_mask_seed=1), torch.float32, [3] * n,
                steps0=[j % 7 for j in range(n)], seed=2)
    emu, cpu = run_both(case)
    _assert_bitwise(emu, cpu, "3700 tensors")
    assert [s.item() for s in emu[1]] == [j % 7 + 1 for j in range(n)]


@pytest.mark.parametrize("step_dtype", [torch.float32, torch.float64], ids=_dt)
def test_steps_read_per_tensor(step_dtype):
    """Each tensor's own step (float32 or float64) drives its bias correction and its mask stream."""
    options = dict(lr=0.01, grad_keep_prob=0.5, grad_mask_seed=SEED)
    case = Case("adam", options, torch.float32, [50] * 4, steps0=[0, 1, 10**6, 2**22],
                step_dtype=step_dtype, indices=[3, 0, 2**24 - 1, 17], seed=3)
    emu, cpu = run_both(case, steps=2)
    _assert_bitwise(emu, cpu, "steps")
    assert [s.item() for s in emu[1]] == [2, 3, 10**6 + 2, 2**22 + 2]


@pytest.mark.parametrize("opt", list(VARIANTS))
def test_found_inf_and_grad_scale(opt, plan):
    """found_inf != 0: nothing changes, steps included. grad_scale: the gradient is unscaled, written back,
    and the step matches the CPU op bit for bit."""
    plan("2,2,16,8")
    options = {**VARIANTS[opt][-1], "weight_decay": 0.1, "maximize": True, "grad_keep_prob": 0.8,
               "grad_mask_seed": 9}
    case = Case(opt, options, torch.float32, [5, 33, 64], steps0=[0, 4, 1], seed=4)
    before = case.clone()
    tensors, steps = case.clone()
    for inf in (1.0, float("inf"), float("nan")):
        case.call("_gridemu_" + opt + "_", tensors, steps, grad_scale=torch.tensor([4.0]),
                  found_inf=torch.tensor([inf]))
        _assert_bitwise((tensors, steps), before, f"found_inf={inf}")
    scale = torch.tensor([1024.0])
    for t in case.tensors["grads"]:
        t.mul_(1024.0)
    emu, cpu = run_both(case, grad_scale=scale, found_inf=torch.zeros(1))
    _assert_bitwise(emu, cpu, "grad_scale")
    for g, g0 in zip(emu[0]["grads"], case.tensors["grads"]):
        assert torch.equal(g, g0 / 1024.0)


def test_random_configurations_bitwise(plan):
    """Random options, dtypes, sizes, offsets, steps, AMP and plan limits, against the CPU op."""
    rnd = random.Random(1234)
    for trial in range(150):
        opt = rnd.choice(list(VARIANTS))
        options = {**rnd.choice(VARIANTS[opt]), **rnd.choice(DECAYS), **rnd.choice(EXTRAS)}
        if options.get("grad_keep_prob"):
            options["grad_keep_prob"] = rnd.choice([0.25, 0.6, 0.999])
            options["grad_mask_seed"] = rnd.randrange(-2**63, 2**63)
        dtype = rnd.choice(DTYPES)
        half = dtype in (torch.float16, torch.bfloat16)
        state_dtype = torch.float32 if half and rnd.random() < 0.5 else None
        options["stochastic_rounding"] = dtype == torch.bfloat16 and rnd.random() < 0.5
        n = rnd.randint(1, 6)
        sizes = [rnd.choice([0, 1, 2, 3, 4, 5, 8, 15, 16, 17, 63, 200, 1031]) for _ in range(n)]
        lists = ["params", "grads"] + [name for name, used in STATE_LISTS[opt] if used(options)]
        offsets = {(name, j): rnd.randrange(4) for name in lists for j in range(n) if rnd.random() < 0.3}
        limits = f"{rnd.randint(1, 4)},{rnd.randint(1, 6)},{rnd.choice([8, 16, 40, 128])},{rnd.choice([1, 5, 32])}"
        plan(limits)
        case = Case(opt, options, dtype, sizes, offsets=offsets, steps0=[rnd.choice([0, 1, 9]) for _ in sizes],
                    step_dtype=rnd.choice([torch.float32, torch.float64]), seed=trial,
                    indices=rnd.sample(range(1000), n), state_dtype=state_dtype)
        amp = rnd.choice([{}, dict(grad_scale=torch.tensor([rnd.choice([1.0, 3.0, 65536.0])]),
                                   found_inf=torch.zeros(1))])
        _assert_bitwise(*run_both(case, steps=2, **amp), f"trial {trial}: {opt} {options} {_dt(dtype)} "
                        f"state={state_dtype} sizes={sizes} offsets={offsets} plan={limits}")


def test_same_errors_as_cpu_op():
    """Validation is the CPU ops' own code: malformed calls raise the same RuntimeError."""
    p = [torch.zeros(3)]
    bad = [
        dict(args=(p, [torch.zeros(4)], [], [torch.zeros(())], [0]), kw=dict(lr=0.1)),
        dict(args=(p, [torch.zeros(3, dtype=torch.float64)], [], [torch.zeros(())], [0]), kw=dict(lr=0.1)),
        dict(args=(p, [torch.zeros(3)], [], [torch.zeros(())], [2**24]), kw=dict(lr=0.1)),
        dict(args=(p, [torch.zeros(3)], [], [torch.zeros(())], [0]), kw=dict(lr=0.1, momentum=0.9)),
        dict(args=(p, [torch.zeros(3)], [], [torch.zeros(())], [0]), kw=dict(lr=-1.0)),
        dict(args=(p, [torch.zeros(3)], [], [torch.zeros(())], [0]), kw=dict(lr=0.1, nesterov=True)),
        dict(args=(p, p, [], [torch.zeros(())], [0]), kw=dict(lr=0.1)),
    ]
    for b in bad:
        with pytest.raises(RuntimeError) as cpu:
            OPS.sgd_(*b["args"], **b["kw"])
        with pytest.raises(RuntimeError) as emu:
            OPS._gridemu_sgd_(*b["args"], **b["kw"])
        assert str(emu.value).splitlines()[0] == str(cpu.value).splitlines()[0]


@pytest.mark.parametrize("limits", ["0,1,8,1", "1,0,8,1", "1,1,12,1", "1,1,8,0", "1,1,8", "a,b,c,d"])
def test_bad_plan_limits(limits, plan):
    plan(limits)
    with pytest.raises(RuntimeError, match="FUSEDOPT_GRIDEMU_PLAN|launch plan"):
        OPS._gridemu_sgd_([torch.zeros(3)], [torch.zeros(3)], [], [torch.zeros(())], [0], lr=0.1)


def _call_with(case, op, tensors, steps, **scalars):
    """op on the case's tensors, with `scalars` (lr; Adam's betas) in place of the case's values for them."""
    lists = [tensors[name] if name in tensors else [] for name, _ in STATE_LISTS[case.opt]]
    options = {k: v for k, v in case.options.items() if k not in scalars}
    op(tensors["params"], tensors["grads"], *lists, steps, case.indices, **scalars, **options)


@pytest.mark.parametrize("opt", list(VARIANTS))
@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64], ids=_dt)
def test_tensor_lr(opt, lr_dtype, plan):
    """Note [Tensor lr]: the `.tensor_lr` overloads give the float op's bits for the tensor's value. The
    emulation reads lr through a pointer in every chunk body, as the CUDA kernels read an lr on the device;
    the CPU op reads it on the host. A new value in the same tensor is used by the next call."""
    plan("2,3,16,8")
    for dtype in DTYPES:
        options = {**VARIANTS[opt][-1], "weight_decay": 0.1, "l1_decay": 0.01, "decoupled_weight_decay": True}
        lr = torch.tensor(options["lr"], dtype=lr_dtype)
        case = Case(opt, {**options, "lr": lr.item()}, dtype, [5, 33, 64, 1], steps0=[0, 4, 1, 2],
                    seed=zlib.crc32(repr((opt, dtype, lr_dtype)).encode()))
        want, emu, cpu = case.clone(), case.clone(), case.clone()
        for value in (lr.item(), lr.item() / 3):
            lr.fill_(value)
            _call_with(case, getattr(OPS, opt + "_").default, *want, lr=lr.item())
            _call_with(case, getattr(OPS, "_gridemu_" + opt + "_").tensor_lr, *emu, lr=lr)
            _call_with(case, getattr(OPS, opt + "_").tensor_lr, *cpu, lr=lr)
        _assert_bitwise(emu, want, f"emulated tensor lr {_dt(dtype)}")
        _assert_bitwise(cpu, want, f"CPU tensor lr {_dt(dtype)}")


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("beta_dtype", [torch.float32, torch.float64], ids=_dt)
def test_tensor_betas(beta_dtype, amsgrad, plan):
    """Note [Tensor betas]: adam_.tensor_betas gives the float op's bits for the tensors' values. The emulation
    reads lr and both betas through pointers and computes the bias corrections in every chunk body, as the CUDA
    kernels do with tensors on the device; the CPU op reads them on the host. New values in the same tensors
    are used by the next call."""
    plan("2,3,16,8")
    for dtype in DTYPES:
        options = dict(lr=0.01, amsgrad=amsgrad, weight_decay=0.1, grad_keep_prob=0.7, grad_mask_seed=SEED)
        case = Case("adam", options, dtype, [5, 33, 64, 1], steps0=[0, 4, 1, 2],
                    seed=zlib.crc32(repr((dtype, beta_dtype, amsgrad)).encode()))
        lr, beta1, beta2 = (torch.tensor(v, dtype=beta_dtype) for v in (0.01, 0.8, 0.99))
        want, emu, cpu = case.clone(), case.clone(), case.clone()
        for b1, b2 in [(0.8, 0.99), (0.5, 0.9), (0.0, 0.999)]:
            beta1.fill_(b1)
            beta2.fill_(b2)
            _call_with(case, OPS.adam_.default, *want, lr=lr.item(), beta1=beta1.item(), beta2=beta2.item())
            _call_with(case, OPS._gridemu_adam_.tensor_betas, *emu, lr=lr, beta1=beta1, beta2=beta2)
            _call_with(case, OPS.adam_.tensor_betas, *cpu, lr=lr, beta1=beta1, beta2=beta2)
        _assert_bitwise(emu, want, f"emulated tensor betas {_dt(dtype)}")
        _assert_bitwise(cpu, want, f"CPU tensor betas {_dt(dtype)}")


@pytest.mark.parametrize("op", ["adam_", "_gridemu_adam_"])
def test_bad_tensor_betas(op):
    args = ([torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)], [], [torch.zeros(())], [0])
    good = dict(lr=torch.tensor(0.1), beta1=torch.tensor(0.9), beta2=torch.tensor(0.999))
    for name in ("beta1", "beta2"):
        for bad, match in [(torch.zeros(2), f"tensor {name} must be a dense tensor of one element"),
                           (torch.tensor(1), f"tensor {name} must be float32 or float64")]:
            with pytest.raises(RuntimeError, match=match):
                getattr(OPS, op).tensor_betas(*args, **{**good, name: bad})
        if op == "adam_":  # the public op: read on the host, checked like a float
            with pytest.raises(RuntimeError, match=f"invalid {name}"):
                OPS.adam_.tensor_betas(*args, **{**good, name: torch.tensor(1.0)})
    assert torch.equal(args[0][0], torch.zeros(3)) and args[5][0].item() == 0  # nothing was touched


@pytest.mark.parametrize("op", ["sgd_", "_gridemu_sgd_"])
def test_bad_tensor_lr(op):
    args = ([torch.zeros(3)], [torch.zeros(3)], [], [torch.zeros(())], [0])
    for lr, match in [(torch.zeros(2), "one element"), (torch.tensor(1), "float32 or float64")]:
        with pytest.raises(RuntimeError, match=match):
            getattr(OPS, op).tensor_lr(*args, lr=lr)
    if op == "sgd_":  # the public op: read on the host, checked like a float lr; sparse reaches it too
        with pytest.raises(RuntimeError, match="invalid lr"):
            OPS.sgd_.tensor_lr(*args, lr=torch.tensor(-1.0))
        with pytest.raises(RuntimeError, match="dense"):
            OPS.sgd_.tensor_lr(*args, lr=torch.zeros(1).to_sparse())
