"""The CPU kernels (torch.ops.fusedopt.*) against fusedopt.reference, on every ISA this CPU runs.

Note [Comparing kernels with the reference]
The reference runs in float64 on the kernel's inputs upcast. fp64 and fp32 run >= 3 steps chained (the kernel
keeps its own state, the reference its own float64 state) and compare after every step. fp16/bf16 state is
rounded to the storage type each step, so those compare one step at a time: before each step the reference is
fed the kernel's own parameters and state, upcast. The kernel computes in fp32 and rounds once on store, so
the half result lies within half an ulp of the reference, plus the fp32 noise of a step (scaled by the
tensor's magnitude, for elements near zero after cancellation).
"""
import contextlib
import functools
import itertools
import random
import zlib

import numpy as np
import pytest
import torch

import fusedopt._ext  # noqa: F401  (registers torch.ops.fusedopt.*)
import fusedopt.reference as ref

OPS = torch.ops.fusedopt
STEPS = 3
SEED = 0x1234_5678_9ABC_DEF1  # the gradient mask's key: its high word is non-zero
HALF = (torch.float16, torch.bfloat16)
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
EPS32 = torch.finfo(torch.float32).eps

# (rtol, atol relative to the tensor's largest magnitude, absolute atol) per dtype.
TOL = {
    torch.float64: (1e-12, 1e-14, 0.0),
    torch.float32: (1e-5, 1e-6, 0.0),
    # half an ulp (+ margin for the fp32 noise), the fp32 noise near zero, the smallest subnormal step
    torch.float16: (0.51 * 2**-10, 8 * EPS32, 2**-24),
    torch.bfloat16: (0.51 * 2**-7, 8 * EPS32, 2**-133),
}

# Per optimizer: the reference rule and the op's state lists in schema order as
# (list name, reference state key, used in this configuration?).
OPTIMIZERS = {
    "sgd": (ref.sgd_step, [("momentum_buffers", "momentum_buffer", lambda o: o.get("momentum", 0) != 0)]),
    "adagrad": (ref.adagrad_step, [("state_sums", "sum", lambda o: True)]),
    "rmsprop": (ref.rmsprop_step, [("square_avgs", "square_avg", lambda o: True),
                                   ("grad_avgs", "grad_avg", lambda o: o.get("centered", False)),
                                   ("momentum_buffers", "momentum_buffer", lambda o: o.get("momentum", 0) > 0)]),
    "adam": (ref.adam_step, [("exp_avgs", "exp_avg", lambda o: True),
                             ("exp_avg_sqs", "exp_avg_sq", lambda o: True),
                             ("max_exp_avg_sqs", "max_exp_avg_sq", lambda o: o.get("amsgrad", False))]),
}

VARIANTS = {
    "sgd": {
        "plain": dict(lr=0.05),
        "momentum": dict(lr=0.05, momentum=0.9),
        "dampening": dict(lr=0.05, momentum=0.9, dampening=0.3),
        "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True),
        "ema": dict(lr=0.05, momentum=0.8, ema_momentum=True),
    },
    "adagrad": {
        "plain": dict(lr=0.1),
        "lr_decay": dict(lr=0.1, lr_decay=0.05),
        "init_acc": dict(lr=0.1, initial_accumulator_value=0.5),
    },
    "rmsprop": {
        "plain": dict(lr=0.01),
        "centered": dict(lr=0.01, centered=True),
        "momentum": dict(lr=0.01, momentum=0.9),
        "centered_momentum": dict(lr=0.01, alpha=0.9, centered=True, momentum=0.5),
    },
    "adam": {
        "plain": dict(lr=0.01, beta1=0.8, beta2=0.99),
        "amsgrad": dict(lr=0.01, amsgrad=True),
        "eps_inside_sqrt": dict(lr=0.01, eps=1e-6, eps_inside_sqrt=True),
    },
}

DECAYS = {
    "none": {},
    "l2": dict(weight_decay=0.125),
    "l1": dict(l1_decay=0.25),
    "l2_l1": dict(weight_decay=0.125, l1_decay=0.25),
    "dec_l2": dict(weight_decay=0.125, decoupled_weight_decay=True),
    "dec_l1": dict(l1_decay=0.25, decoupled_weight_decay=True),
    "dec_l2_l1": dict(weight_decay=0.125, l1_decay=0.25, decoupled_weight_decay=True),
}

EXTRAS = {
    "plain": {},
    "maximize": dict(maximize=True),
    "mask": dict(grad_keep_prob=0.6, grad_mask_seed=SEED),
}

CONFIGS = [(opt, v, d, e) for opt in VARIANTS for v in VARIANTS[opt] for d in DECAYS for e in EXTRAS]


def _options(opt, variant, decay, extra):
    return {**VARIANTS[opt][variant], **DECAYS[decay], **EXTRAS[extra]}


def _dt(dtype):
    return str(dtype).removeprefix("torch.")


def _generator(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _randn(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


# The op and the reference, per parameter.

def kernel_options(options):
    return {k: v for k, v in options.items() if k != "initial_accumulator_value"}


def reference_options(opt, options):
    o = dict(options)
    if opt == "adam":
        o["betas"] = (o.pop("beta1", 0.9), o.pop("beta2", 0.999))
    return o


def call_op(opt, params, grads, states, steps, indices, options, **amp):
    """One op call; states[j] maps reference keys to that parameter's state tensors."""
    lists = [[s[key] for s in states] if used(options) else [] for _, key, used in OPTIMIZERS[opt][1]]
    getattr(OPS, opt + "_")(params, grads, *lists, steps, indices, **kernel_options(options), **amp)


def make_state(opt, options, shape, dtype, step, gen):
    """The state of a parameter that has taken `step` steps: initial values at 0, else random valid ones."""
    state = {}
    for _, key, used in OPTIMIZERS[opt][1]:
        if not used(options):
            continue
        if step == 0:
            fill = options.get("initial_accumulator_value", 0.0) if key == "sum" else 0.0
            state[key] = torch.full(shape, fill, dtype=dtype)
        elif key in ("sum", "square_avg", "exp_avg_sq", "max_exp_avg_sq"):
            state[key] = _randn(shape, torch.float64, gen, 0.1).abs().to(dtype)
        else:
            state[key] = _randn(shape, dtype, gen, 0.1)
    if "grad_avg" in state and step != 0:  # centered RMSprop: v − a² ≥ 0.1, so √(v − a²) is well conditioned
        state["square_avg"] = (state["grad_avg"].double() ** 2 + 0.1
                               + _randn(shape, torch.float64, gen, 0.1).abs()).to(dtype)
    return state


def reference_state(opt, options, state, step):
    """The reference's state dict for a kernel state (upcast copies) after `step` steps."""
    out = {"step": step}
    for key, t in state.items():
        if key == "momentum_buffer" and opt == "sgd" and step == 0 and not options.get("ema_momentum"):
            continue  # torch semantics: the first step sets the buffer to g
        out[key] = t.to(torch.float64, copy=True)
    return out


def serial(fn):
    """Runs fn on one thread: torch parallelises even 4099-element sqrt, and on a busy 2-core machine each
    wake-up costs milliseconds. Only the kernels under test need threads."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with _threads(1):
            return fn(*args, **kwargs)
    return run


@contextlib.contextmanager
def _threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@serial
def reference_step(opt, param, grad, state, index, options, **amp):
    OPTIMIZERS[opt][0](param, grad, state, index=index, **reference_options(opt, options), **amp)


@serial
def assert_matches(actual, expected, dtype, what):
    rtol, atol_rel, atol_abs = TOL[dtype]
    scale = torch.nan_to_num(expected, posinf=0.0, neginf=0.0).abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=rtol, atol=atol_abs + atol_rel * scale,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def _at_offset(t, offset):
    """A contiguous copy of t that starts `offset` elements into a fresh storage."""
    backing = torch.empty(t.numel() + offset, dtype=t.dtype)
    return backing[offset:].view(t.shape).copy_(t)


class Case:
    """Inputs of a run: parameters, states, steps and `nsteps` gradients per parameter, deterministic per key."""

    def __init__(self, opt, options, dtype, shapes, steps0, indices, key, nsteps=STEPS, offsets=None):
        gen = _generator(key)
        self.opt, self.options, self.dtype, self.indices = opt, options, dtype, list(indices)
        self.offsets = offsets or [0] * len(shapes)
        self.params = [_randn(s, dtype, gen) for s in shapes]
        self.states = [make_state(opt, options, s, dtype, k, gen) for s, k in zip(shapes, steps0)]
        self.steps0 = list(steps0)
        self.grads = [[_randn(s, dtype, gen) for s in shapes] for _ in range(nsteps)]

    def fresh(self):
        """Copies of the parameters, states and steps for one kernel run (tensor j starting offsets[j] elements
        into its storage, so unaligned; steps alternate fp32/fp64)."""
        params = [_at_offset(p, off) for p, off in zip(self.params, self.offsets)]
        states = [{k: _at_offset(t, off) for k, t in s.items()} for s, off in zip(self.states, self.offsets)]
        steps = [torch.tensor(float(k), dtype=torch.float32 if j % 2 == 0 else torch.float64)
                 for j, k in enumerate(self.steps0)]
        return params, states, steps

    def grads_at(self, k):
        """Copies of step k's gradients, placed like the parameters."""
        return [_at_offset(g, off) for g, off in zip(self.grads[k], self.offsets)]


def check_against_reference(case, isas):
    """Runs the case on every ISA and compares with the reference after every step (Note above)."""
    opt, options, dtype = case.opt, case.options, case.dtype
    chained = dtype not in HALF
    if chained:  # the reference's own trajectory, shared by every ISA
        ref_params = [p.to(torch.float64, copy=True) for p in case.params]
        ref_states = [reference_state(opt, options, s, k) for s, k in zip(case.states, case.steps0)]
        trajectory = []
        for grads in case.grads:
            for j, (p, g, s) in enumerate(zip(ref_params, grads, ref_states)):
                reference_step(opt, p, g.to(torch.float64, copy=True), s, case.indices[j], options)
            trajectory.append(([p.clone() for p in ref_params],
                               [{k: v.clone() for k, v in s.items() if k != "step"} for s in ref_states]))
    for isa in isas:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FUSEDOPT_CPU_ISA", isa)
            params, states, steps = case.fresh()
            for k, grads in enumerate(case.grads):
                grads_in = case.grads_at(k)
                if not chained:
                    ref_params = [p.to(torch.float64, copy=True) for p in params]
                    ref_states = [reference_state(opt, options, s, int(st.item())) for s, st in zip(states, steps)]
                    for j, (p, g, s) in enumerate(zip(ref_params, grads, ref_states)):
                        reference_step(opt, p, g.to(torch.float64, copy=True), s, case.indices[j], options)
                    expected = (ref_params, ref_states)
                else:
                    expected = trajectory[k]
                call_op(opt, params, grads_in, states, steps, case.indices, options)
                for j in range(len(params)):
                    where = f"isa={isa} step={k + 1} tensor={j} numel={params[j].numel()}"
                    assert params[j].dtype == dtype
                    assert_matches(params[j], expected[0][j], dtype, f"param {where}")
                    for key, t in states[j].items():
                        assert_matches(t, expected[1][j][key], dtype, f"{key} {where}")
                    assert steps[j].item() == case.steps0[j] + k + 1, where
                    assert torch.equal(grads_in[j], grads[j]), f"grad changed without grad_scale: {where}"


# 1. The full product on small tensors: sizes 1, 7 and 4099 in one call, the 7-element one mid-run.

@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("opt, variant, decay, extra", CONFIGS, ids=["-".join(c) for c in CONFIGS])
def test_matches_reference(opt, variant, decay, extra, dtype, isas):
    options = _options(opt, variant, decay, extra)
    case = Case(opt, options, dtype, [(1,), (7,), (4099,)], steps0=[0, 2, 0], indices=[5, 0, 2**24 - 1],
                key=(opt, variant, decay, extra, str(dtype)), offsets=[0, 1, 3])
    check_against_reference(case, isas)


# 2. Large tensors and many tensors: a sample of the product, every optimizer and dtype represented.

def _sample(count_per_stratum, seed, strata):
    rng = random.Random(seed)
    out = []
    for opt, dtype in strata:
        configs = [c for c in CONFIGS if c[0] == opt]
        out += [(c, dtype) for c in rng.sample(configs, count_per_stratum)]
    return out


LARGE = _sample(1, 278011, itertools.product(VARIANTS, DTYPES))
MANY = _sample(2, 500, zip(VARIANTS, DTYPES))


@pytest.mark.parametrize("config, dtype", LARGE, ids=["-".join(c) + "-" + _dt(d) for c, d in LARGE])
def test_large_tensor(config, dtype, isas):
    case = Case(config[0], _options(*config), dtype, [(278011,)], steps0=[0], indices=[3],
                key=("large",) + config + (str(dtype),))
    check_against_reference(case, isas)


def _many_shapes(seed, n=500, most=300):
    rng = random.Random(seed)
    shapes = [(rng.randint(1, most),) if rng.random() < 0.7 else (rng.randint(1, 9), rng.randint(1, 40))
              for _ in range(n)]
    shapes[17] = (0,)
    shapes[18] = (1,)
    shapes[400] = (3, 0)
    return shapes


@pytest.mark.parametrize("config, dtype", MANY, ids=["-".join(c) + "-" + _dt(d) for c, d in MANY])
def test_many_tensors(config, dtype, isas):
    rng = random.Random(7)
    shapes = _many_shapes(8)
    case = Case(config[0], _options(*config), dtype, shapes, steps0=[rng.randint(0, 4) for _ in shapes],
                indices=rng.sample(range(2**24), len(shapes)), key=("many",) + config + (str(dtype),))
    check_against_reference(case, isas)


# 3. Every ISA computes the same bits; so do 1 and 2 threads.

def _run(case):
    params, states, steps = case.fresh()
    for k in range(len(case.grads)):
        call_op(case.opt, params, case.grads_at(k), states, steps, case.indices, case.options)
    return params + [t for s in states for t in s.values()]


def _assert_bitwise(a, b, what):
    assert len(a) == len(b)
    for j, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8)), f"{what}: tensor {j} differs"


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("opt, variant", [(o, v) for o in VARIANTS for v in VARIANTS[o]])
def test_isas_bitwise_identical(opt, variant, dtype, isas, use_isa):
    """Vector body and scalar tail share the math (explicit FMAs), so no ISA changes a bit; sizes cover tails
    of every vector width, and two parameters start at odd element offsets (unaligned)."""
    if len(isas) == 1:
        pytest.skip("this CPU runs only the DEFAULT kernels")
    results = {}
    for decay, extra in [("l2_l1", "mask"), ("dec_l2_l1", "maximize")]:
        options = _options(opt, variant, decay, extra)
        case = Case(opt, options, dtype, [(1,), (7,), (37,), (4099,), (70001,)], steps0=[0, 1, 0, 3, 0],
                    indices=[0, 1, 2, 3, 4], key=("isa", opt, variant, decay, str(dtype)), offsets=[0, 0, 0, 1, 5])
        for isa in isas:
            use_isa(isa)
            results[isa, decay] = _run(case)
        for isa in isas[1:]:
            _assert_bitwise(results[isa, decay], results[isas[0], decay], f"{isa} vs {isas[0]} ({decay}, {extra})")


@pytest.mark.parametrize("layout", ["large", "many"])
def test_thread_count_bitwise_identical(layout, isas, use_isa):
    if layout == "large":
        shapes, steps0, indices = [(278011,)], [0], [9]
    else:
        rng = random.Random(3)
        shapes = _many_shapes(4, most=600)  # > 2 chunks in all, so both threads work
        steps0, indices = [rng.randint(0, 3) for _ in shapes], list(range(len(shapes)))
    for opt, variant, decay in [("adam", "amsgrad", "dec_l2_l1"), ("sgd", "nesterov", "l2_l1"),
                                ("rmsprop", "centered_momentum", "l1")]:
        options = _options(opt, variant, decay, "mask")
        case = Case(opt, options, torch.float32, shapes, steps0, indices, key=("threads", layout, opt))
        for isa in isas:
            use_isa(isa)
            torch.set_num_threads(1)
            one = _run(case)
            torch.set_num_threads(2)
            two = _run(case)
            _assert_bitwise(one, two, f"{opt} {layout} isa={isa}: 1 vs 2 threads")


# 4. The gradient mask, AMP, steps, the L1 prox.

@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("keep_prob, seed", [(0.6, SEED), (0.1, -(2**40) + 12345), (1 - 2**-20, 2**63 - 1)])
def test_gradient_mask_is_the_reference_mask(keep_prob, seed, dtype, isas, use_isa):
    """SGD with lr=1 from θ = 0 and g = 1 writes −m/r: the kept elements are exactly the reference's mask for
    offset t·2^24 + j (t the 1-based step, j the index)."""
    shapes, indices, steps0 = [(1,), (7,), (4099,), (278011,)], [2**24 - 1, 0, 12, 7], [0, 5, 1, 2**20]
    for isa in isas:
        use_isa(isa)
        params = [torch.zeros(s, dtype=dtype) for s in shapes]
        grads = [torch.ones(s, dtype=dtype) for s in shapes]
        steps = [torch.tensor(float(k)) for k in steps0]
        OPS.sgd_(params, grads, [], steps, indices, lr=1.0, grad_keep_prob=keep_prob, grad_mask_seed=seed)
        for p, k, j in zip(params, steps0, indices):
            keep = torch.from_numpy(ref.keep_mask(seed, (k + 1) * 2**24 + j, p.numel(), keep_prob))
            np.testing.assert_array_equal((p != 0).numpy(), keep.numpy(), err_msg=f"isa={isa} index={j}")
            kept = p[keep].double()
            if kept.numel():
                assert (kept == kept[0]).all(), f"isa={isa} index={j}"
            assert_matches(kept, torch.full_like(kept, -1.0 / keep_prob), dtype, f"isa={isa} index={j}")
            if p.numel() > 1000 and keep_prob < 0.9:
                assert 0 < int(keep.sum()) < p.numel()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=_dt)
@pytest.mark.parametrize("keep_prob", [0.6, 0.1, 0.9, 1 - 2**-20])
def test_masked_gradient_is_scaled_by_rounded_reciprocal(keep_prob, dtype, isas, use_isa):
    """Note [Mask scale]: the masked gradient is m·g·(1/r) with 1/r rounded once to the op-math type, bit for
    bit: SGD with lr=1 from θ = 0 writes 0 − m·g·(1/r), dropped elements +0."""
    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) * 3 for n in (1, 17, 4099, 70001)]
    unkeep = torch.tensor(1.0 / keep_prob, dtype=torch.float64).to(dtype)
    for isa in isas:
        use_isa(isa)
        params = [torch.zeros_like(g) for g in grads]
        OPS.sgd_(params, [g.clone() for g in grads], [], [torch.zeros(()) for _ in grads], list(range(len(grads))),
                 lr=1.0, grad_keep_prob=keep_prob, grad_mask_seed=SEED)
        for j, (p, g) in enumerate(zip(params, grads)):
            keep = torch.from_numpy(ref.keep_mask(SEED, 2**24 + j, g.numel(), keep_prob)).to(dtype)
            _assert_bitwise([p], [torch.zeros_like(g) - keep * g * unkeep], f"isa={isa} index={j}")


@pytest.mark.parametrize("opt", list(VARIANTS))
@pytest.mark.parametrize("found_inf", [1.0, float("inf"), float("nan")])
def test_found_inf_changes_nothing(opt, found_inf, isas, use_isa):
    variant = list(VARIANTS[opt])[-1]
    options = _options(opt, variant, "dec_l2_l1", "mask")
    case = Case(opt, options, torch.float32, [(1,), (4099,)], steps0=[0, 3], indices=[0, 1], key=("inf", opt))
    for isa in isas:
        use_isa(isa)
        params, states, steps = case.fresh()
        grads = [g.clone() for g in case.grads[0]]
        before = [t.clone() for t in params + grads + steps] + [t.clone() for s in states for t in s.values()]
        call_op(opt, params, grads, states, steps, case.indices, options,
                grad_scale=torch.tensor([8.0]), found_inf=torch.tensor([found_inf]))
        after = params + grads + steps + [t for s in states for t in s.values()]
        _assert_bitwise(after, before, f"isa={isa}")
        # found_inf == 0 runs the step
        call_op(opt, params, grads, states, steps, case.indices, options, found_inf=torch.zeros(1))
        assert [s.item() for s in steps] == [1, 4]
        assert not torch.equal(params[1], before[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("opt, variant", [(o, list(VARIANTS[o])[-1]) for o in VARIANTS])
@pytest.mark.parametrize("scale", [1024.0, 3.0])
def test_grad_scale_unscales_and_writes_back(opt, variant, scale, dtype, isas, use_isa):
    """g ← g / grad_scale, and that unscaled gradient (nothing more: no maximize, mask or decay) is written
    back to the grads, as torch's fused optimizers do."""
    for decay, extra in [("none", "plain"), ("l2_l1", "maximize"), ("dec_l2_l1", "mask")]:
        options = _options(opt, variant, decay, extra)
        case = Case(opt, options, dtype, [(7,), (4099,)], steps0=[0, 2], indices=[0, 1],
                    key=("scale", opt, decay, str(dtype)))
        grads = [(g.double() * scale).to(dtype) for g in case.grads[0]]
        for isa in isas:
            use_isa(isa)
            params, states, steps = case.fresh()
            grads_in = [g.clone() for g in grads]
            call_op(opt, params, grads_in, states, steps, case.indices, options,
                    grad_scale=torch.tensor([scale]), found_inf=torch.zeros(1))
            for j, (p, s, k) in enumerate(zip(params, states, case.steps0)):
                where = f"{decay}/{extra} isa={isa} tensor={j}"
                ref_p = case.params[j].to(torch.float64, copy=True)
                ref_s = reference_state(opt, options, case.states[j], k)
                ref_g = grads[j].to(torch.float64, copy=True)
                reference_step(opt, ref_p, ref_g, ref_s, j, options, grad_scale=scale, found_inf=0.0)
                assert_matches(grads_in[j], ref_g, dtype, f"written-back grad {where}")
                assert_matches(p, ref_p, dtype, f"param {where}")
                for key, t in s.items():
                    assert_matches(t, ref_s[key], dtype, f"{key} {where}")
                assert steps[j].item() == k + 1


@pytest.mark.parametrize("step_dtype", [torch.float32, torch.float64], ids=_dt)
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_steps_increment(step_dtype, shape, isas, use_isa):
    """Each parameter's own step drives its update (Adam's bias correction, here up to t = 10^6 + 1)."""
    options = _options("adam", "plain", "none", "plain")
    starts = [0, 1, 10**6]
    case = Case("adam", options, torch.float64, [(5,)] * 3, steps0=starts, indices=[0, 1, 2], key=("steps",))
    for isa in isas:
        use_isa(isa)
        params, states, _ = case.fresh()
        steps = [torch.full(shape, float(k), dtype=step_dtype) for k in starts]
        for n in range(1, 3):
            call_op("adam", params, [g.clone() for g in case.grads[n]], states, steps, case.indices, options)
            assert [s.item() for s in steps] == [k + n for k in starts]
            assert all(s.dtype == step_dtype and s.shape == shape for s in steps)
        ref_params = [p.to(torch.float64, copy=True) for p in case.params]
        for j, (p, s0, k) in enumerate(zip(ref_params, case.states, starts)):
            s = reference_state("adam", options, s0, k)
            for n in range(1, 3):
                reference_step("adam", p, case.grads[n][j].clone(), s, j, options)
            assert_matches(params[j], p, torch.float64, f"isa={isa} start={k}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("opt", list(VARIANTS))
def test_l1_prox_gives_exact_zeros(opt, dtype, isas, use_isa):
    """Decoupled L1 ends in θ ← sign(θ)·max(|θ| − lr·λ1, 0): exact zeros wherever the reference's θ before the
    prox lies below the threshold by more than the dtype's noise, non-zeros where it lies above; and coupled L1
    leaves θ = 0 at 0 under g = 0 (sign(0) = 0)."""
    n = 4099
    base = dict(VARIANTS[opt]["plain"], weight_decay=0.1, decoupled_weight_decay=True)
    gen = _generator("prox", opt, str(dtype))
    param, grad = _randn((n,), dtype, gen, 0.05), _randn((n,), dtype, gen)
    # the reference's θ before the prox: the same step without L1; λ1 puts the threshold at its median
    pre = param.to(torch.float64, copy=True)
    reference_step(opt, pre, grad.to(torch.float64, copy=True),
                   reference_state(opt, base, make_state(opt, base, (n,), dtype, 0, gen), 0), 0, base)
    threshold = pre.abs().median().item()
    options = dict(base, l1_decay=threshold / base["lr"])
    rtol, atol_rel, atol_abs = TOL[dtype]
    noise = 4 * (rtol * pre.abs() + atol_rel * pre.abs().max() + atol_abs)
    zero = pre.abs() < threshold - noise
    alive = pre.abs() > threshold + noise
    assert zero.sum() > n // 4 and alive.sum() > n // 4
    for isa in isas:
        use_isa(isa)
        p = param.clone()
        call_op(opt, [p], [grad.clone()], [make_state(opt, options, (n,), dtype, 0, gen)], [torch.zeros(())], [0],
                options)
        assert (p[zero] == 0).all(), f"isa={isa}: {int((p[zero] != 0).sum())} elements should be exactly 0"
        assert (p[alive] != 0).all(), f"isa={isa}"
        p = torch.zeros(37, dtype=dtype)
        coupled = dict(options, decoupled_weight_decay=False)
        call_op(opt, [p], [torch.zeros(37, dtype=dtype)], [make_state(opt, coupled, (37,), dtype, 0, gen)],
                [torch.zeros(())], [0], coupled)
        assert torch.equal(p, torch.zeros(37, dtype=dtype)), f"isa={isa}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=_dt)
@pytest.mark.parametrize("opt, variant", [(o, v) for o in VARIANTS for v in VARIANTS[o]])
def test_non_finite_values_propagate_as_in_the_reference(opt, variant, dtype, isas, use_isa):
    """inf/NaN in parameters, gradients and state travel as in the reference (torch semantics: sign(NaN) = 0,
    NaN-propagating maximum and clamp), in the vector body and the scalar tail alike."""
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 2.0, -1e-3, 0.5],
                           dtype=torch.float64)
    n = 8 * len(special) + 5  # a vector body and a scalar tail on every ISA
    for decay in ["none", "l2_l1", "dec_l2_l1", "l1"]:
        options = _options(opt, variant, decay, "plain")
        gen = _generator("nonfinite", opt, variant, decay)
        idx = torch.randint(0, len(special), (3, n), generator=gen)
        param, grad = special[idx[0]].to(dtype), special[idx[1]].to(dtype)
        state = make_state(opt, options, (n,), dtype, 1, gen)
        for key, t in state.items():  # every fifth state element special too (non-negative where it must be)
            values = special[idx[2][::5]]
            t[::5] = (values.abs() if key in ("sum", "square_avg", "exp_avg_sq", "max_exp_avg_sq") else values)
        expected = param.to(torch.float64, copy=True)
        ref_state = reference_state(opt, options, state, 1)
        reference_step(opt, expected, grad.to(torch.float64, copy=True), ref_state, 0, options)
        for isa in isas:
            use_isa(isa)
            p, s = param.clone(), {k: t.clone() for k, t in state.items()}
            call_op(opt, [p], [grad.clone()], [s], [torch.ones(())], [0], options)
            assert_matches(p, expected, dtype, f"param {decay} isa={isa}")
            for key, t in s.items():
                assert_matches(t, ref_state[key], dtype, f"{key} {decay} isa={isa}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_tiny_grad_keep_prob_is_rejected_or_exact(dtype, isas, use_isa):
    """A keep probability below fp32's range (here 1e-46: threshold 0, nothing kept) must either be refused or
    give the reference's result (every masked gradient 0, so θ unchanged), never 0·g/0 = NaN."""
    for isa in isas:
        use_isa(isa)
        p = torch.ones(37, dtype=dtype)
        try:
            OPS.sgd_([p], [torch.ones(37, dtype=dtype)], [], [torch.zeros(())], [0], lr=1.0, grad_keep_prob=1e-46)
        except RuntimeError as e:
            assert "grad_keep_prob" in str(e)
            continue
        expected = torch.ones(37, dtype=torch.float64)
        ref.sgd_step(expected, torch.ones(37, dtype=torch.float64), {}, lr=1.0, grad_keep_prob=1e-46)
        assert_matches(p, expected, dtype, f"isa={isa}")


def test_empty_lists_are_a_no_op():
    """No parameters: nothing to do (the AMP tensors give the dispatcher a device; without any tensor the
    dispatcher itself refuses, as for torch._fused_adam_, and fusedopt.ops skips the call)."""
    scale, found = torch.full((1,), 4.0), torch.zeros(1)
    OPS.sgd_([], [], [], [], [], lr=0.1, momentum=0.9, grad_scale=scale, found_inf=found)
    OPS.adam_([], [], [], [], [], [], [], lr=0.1, amsgrad=True, grad_scale=scale)
    assert scale.item() == 4.0 and found.item() == 0.0


def test_stream(isas, use_isa):
    gen = _generator("stream")
    a, b = torch.randn(100003, generator=gen), torch.randn(100003, generator=gen)
    for isa in isas:
        use_isa(isa)
        out = a.clone()
        OPS.stream_(out, b, 0.5)
        assert torch.equal(out, a + 0.5 * b)
