"""Low-precision training beyond torch: float32 state for float16/bfloat16 parameters (state_dtype) and
stochastic rounding of bfloat16 parameters, in the ops (every ISA) and in the optimizers.

Note [Testing fp32 state and stochastic rounding]
A half-precision kernel loads θ and g (and float32 state) into float32, runs the rule in float32 and rounds θ
once on store. So a step of float16/bfloat16 params with float32 state is, bit for bit, the float32 op on the
params and grads upcast, with the same float32 state, followed by rounding θ to the half type: to nearest
without stochastic rounding, with it as fusedopt.reference.round_stochastic does (numpy Philox, the rounding
stream of parameter j at step t). The float32 op is itself checked against the float64 reference in
test_kernels.py. Unbiasedness is a statistical test on 10^6 elements.
"""
import math

import numpy as np
import pytest
import torch

import fusedopt
import fusedopt.reference as ref
from test_kernels import (DECAYS, EXTRAS, HALF, OPS, SEED, VARIANTS, Case, _assert_bitwise, _dt, _options, call_op,
                          make_state)

SHAPES = [(1,), (7,), (37,), (4099,), (70001,)]
STEPS0 = [0, 1, 0, 3, 0]
INDICES = [3, 0, 2**24 - 1, 1, 7]
OFFSETS = [0, 0, 0, 1, 5]  # two tensors start at odd element offsets
# Each (optimizer, variant) once, with decay and extras alternating so all of them appear.
CONFIGS = [(o, v, d, e) for k, (o, v) in enumerate((o, v) for o in VARIANTS for v in VARIANTS[o])
           for d, e in [(["l2_l1", "dec_l2_l1", "dec_l2", "l1"][k % 4], ["mask", "maximize", "plain"][k % 3])]]
KINDS = [(torch.float16, False), (torch.bfloat16, False), (torch.bfloat16, True)]


def _kind_id(kind):
    return _dt(kind[0]) + ("-sr" if kind[1] else "")


def _rounded(x32, dtype, stochastic, seed, steps, indices):
    """Params computed in float32 (a list), stored as `dtype`: to nearest or stochastically."""
    if not stochastic:
        return [x.to(dtype) for x in x32]
    return [ref.round_stochastic(x, seed, int(t.item()), j) for x, t, j in zip(x32, steps, indices)]


@pytest.mark.parametrize("kind", KINDS, ids=_kind_id)
@pytest.mark.parametrize("opt, variant, decay, extra", CONFIGS, ids=["-".join(c) for c in CONFIGS])
def test_fp32_state_is_the_fp32_step_rounded(opt, variant, decay, extra, kind, isas, use_isa):
    """Note [Testing fp32 state and stochastic rounding]: three steps on every ISA, bitwise."""
    dtype, stochastic = kind
    options = {**_options(opt, variant, decay, extra), "grad_mask_seed": SEED}
    case = Case(opt, options, dtype, SHAPES, STEPS0, INDICES, key=("fp32-state", opt, variant, str(dtype)),
                offsets=OFFSETS)
    gen = torch.Generator().manual_seed(11)
    states0 = [make_state(opt, options, s, torch.float32, k, gen) for s, k in zip(SHAPES, STEPS0)]
    for isa in isas:
        use_isa(isa)
        params, _, steps = case.fresh()
        states = [{k: t.clone() for k, t in s.items()} for s in states0]
        params32 = [p.float() for p in params]
        states32 = [{k: t.clone() for k, t in s.items()} for s in states0]
        steps32 = [t.clone() for t in steps]
        for k in range(len(case.grads)):
            grads = case.grads_at(k)
            call_op(opt, params, grads, states, steps, INDICES, {**options, "stochastic_rounding": stochastic})
            call_op(opt, params32, [g.float() for g in grads], states32, steps32, INDICES, options)
            params32 = [p.float() for p in _rounded(params32, dtype, stochastic, SEED, steps32, INDICES)]
            what = f"isa={isa} step={k + 1}"
            _assert_bitwise(params, [p.to(dtype) for p in params32], f"params {what}")
            _assert_bitwise([t for s in states for t in s.values()], [t for s in states32 for t in s.values()],
                            f"fp32 state {what}")
            assert all(t.dtype == torch.float32 for s in states for t in s.values())


@pytest.mark.parametrize("stochastic", [False, True])
def test_every_bf16_value_is_a_fixed_point(stochastic, isas, use_isa):
    """SGD with lr = 0 stores every one of the 65536 bf16 bit patterns back unchanged (a NaN as 0x7FC0), with
    or without stochastic rounding: bits(θ) + u never carries when θ's low half is 0."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    nan = bits.view(torch.bfloat16).isnan()
    want = torch.where(nan, torch.tensor(0x7FC0, dtype=torch.int16), bits)
    for isa in isas:
        use_isa(isa)
        p = bits.clone().view(torch.bfloat16)
        OPS.sgd_([p], [torch.zeros_like(p)], [], [torch.tensor(0.0)], [5], lr=0.0, stochastic_rounding=stochastic,
                 grad_mask_seed=SEED)
        if stochastic:
            assert torch.equal(p.view(torch.int16), want), isa
        else:  # round to nearest: ATen's conversion, whose NaN bits differ between ISAs
            assert torch.equal(p.view(torch.int16)[~nan], want[~nan]), isa
            assert p[nan].isnan().all(), isa


def test_special_values_round_as_the_reference(isas, use_isa):
    """θ + d for bf16 θ and d whose float32 sum is exact but not a bf16 value: past the largest finite bf16
    (may round to inf), binade edges, subnormals, signs, infinities and NaNs; stochastically rounded on
    every ISA, the bits are the reference's."""
    big = 3.3895313892515355e38  # the largest finite bf16
    pairs = [(1.0, 2**-9 + 2**-12), (-1.5, -3 * 2**-12), (2 - 2**-7, 2**-9), (-(2 - 2**-7), -(2**-9)),
             (big, big * 2**-9), (-big, -big * 2**-9), (2**-133, 2**-135), (-(2**-133), -(2**-136)),
             (0.0, 0.0), (-0.0, 0.0), (float("inf"), 1.0), (float("-inf"), 1.0), (float("inf"), float("-inf")),
             (float("nan"), 1.0), (1e-3, 2**-20), (65504.0, 3.0)]
    theta = torch.tensor([a for a, _ in pairs] * 41, dtype=torch.bfloat16)  # whole vectors and a partial one
    d = torch.tensor([b for _, b in pairs] * 41, dtype=torch.bfloat16)
    x = theta.float() + d.float()
    finite = x.isfinite()
    assert torch.equal(x[finite].double(), theta.double()[finite] + d.double()[finite])  # exact sums
    expect = ref.round_stochastic(x, SEED, 5, 9).view(torch.int16)
    for isa in isas:
        use_isa(isa)
        p = theta.clone()
        OPS.sgd_([p], [-d], [], [torch.tensor(4.0)], [9], lr=1.0, stochastic_rounding=True, grad_mask_seed=SEED)
        assert torch.equal(p.view(torch.int16), expect), isa
    assert expect.view(torch.bfloat16).isinf().any()  # the sums past the largest bf16 did round up somewhere


N = 10**6
ULP = 2.0**-7  # of bf16 in [1, 2)


@pytest.mark.parametrize("start, d", [(1.0, 5 * 2**-11), (-1.5, -3 * 2**-12), (1.0, -2**-12)])
def test_stochastic_rounding_is_unbiased(start, d):
    """10^6 parameters take updates of d (a fraction of an ulp, exact in float32) for 8 steps. Stochastic
    rounding: the mean rounding error is zero within 5 standard errors after every step. Round to nearest:
    the same check fails by far (every update below half an ulp is lost), so the test can tell them apart."""
    for stochastic in (True, False):
        p = torch.full((N,), start, dtype=torch.bfloat16)
        step = torch.tensor(0.0)
        g = torch.full((N,), -d, dtype=torch.bfloat16)  # SGD, lr = 1: θ ← θ + d
        assert g.float()[0].item() == -d
        for t in range(1, 9):
            OPS.sgd_([p], [g], [], [step], [0], lr=1.0, stochastic_rounding=stochastic, grad_mask_seed=SEED)
            err = p.double() - (start + t * d)  # exact in float64
            # each step adds an independent error of variance <= ulp²/4
            bound = 5 * math.sqrt(t * ULP**2 / 4 / N)
            if stochastic:
                assert abs(err.mean().item()) < bound, (t, err.mean().item(), bound)
                assert p.unique().numel() > 1  # both neighbours occur
            elif t == 8:
                assert abs(err.mean().item()) > 20 * bound


def test_rounding_draws_differ_per_step_parameter_and_seed():
    """The bits come from offset 2^63 + t·2^24 + j keyed by grad_mask_seed: other step, parameter or seed,
    other rounding; the same, the same bits."""
    def run(seed, step, index):
        p = torch.ones(4099, dtype=torch.bfloat16)
        OPS.sgd_([p], [torch.full_like(p, -2**-9)], [], [torch.tensor(float(step))], [index], lr=1.0,
                 stochastic_rounding=True, grad_mask_seed=seed)
        return p.view(torch.int16)
    base = run(SEED, 3, 4)
    assert torch.equal(base, run(SEED, 3, 4))
    for other in [run(SEED + 1, 3, 4), run(SEED, 4, 4), run(SEED, 3, 5)]:
        assert not torch.equal(base, other)
    one = torch.ones(1, dtype=torch.bfloat16).view(torch.int16)
    assert 0.15 < (base != one).float().mean() < 0.35  # 1 + ulp/4 rounds up a quarter of the time


def test_rounding_and_mask_streams_are_separate():
    """A masked, stochastically rounded step: the mask is the mask of Note [Gradient mask stream] and the
    rounding bits those of Note [Rounding stream], both keyed by one seed."""
    n, keep, seed, t, j = 70001, 0.5, SEED, 2, 6
    p = torch.ones(n, dtype=torch.bfloat16)
    g = torch.full((n,), -2**-10, dtype=torch.bfloat16)
    OPS.sgd_([p], [g], [], [torch.tensor(float(t - 1))], [j], lr=1.0, stochastic_rounding=True,
             grad_keep_prob=keep, grad_mask_seed=seed)
    m = torch.from_numpy(ref.keep_mask(seed, t * 2**24 + j, n, keep))
    x = torch.where(m, torch.tensor(1.0 + 2**-10 / keep), torch.tensor(1.0))
    assert torch.equal(p.view(torch.int16), ref.round_stochastic(x, seed, t, j).view(torch.int16))


# The optimizers.

def _model(dtype, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(13, 29), torch.nn.Tanh(), torch.nn.Linear(29, 5)).to(dtype)


def _grads(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


OPTIMIZERS = {
    "sgd": lambda ps, **kw: fusedopt.SGD(ps, lr=0.05, momentum=0.9, **kw),
    "adagrad": lambda ps, **kw: fusedopt.Adagrad(ps, lr=0.05, initial_accumulator_value=0.1, **kw),
    "rmsprop": lambda ps, **kw: fusedopt.RMSprop(ps, lr=0.01, centered=True, momentum=0.5, **kw),
    "adam": lambda ps, **kw: fusedopt.Adam(ps, lr=0.01, amsgrad=True, **kw),
    "adamw": lambda ps, **kw: fusedopt.AdamW(ps, lr=0.01, **kw),
}


@pytest.mark.parametrize("kind", KINDS, ids=_kind_id)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_steps_the_fp32_step_rounded(name, kind):
    """state_dtype=torch.float32 (and bf16_stochastic_rounding): float32 buffers, and the params of three
    steps equal a float32 optimizer's on the upcast params, rounded after each step (parameter j's rounding
    stream at step t)."""
    dtype, stochastic = kind
    model, model32 = _model(dtype), _model(torch.float32)
    with torch.no_grad():
        for p, q in zip(model.parameters(), model32.parameters()):
            q.copy_(p.float())
    opt = OPTIMIZERS[name](model.parameters(), state_dtype=torch.float32, bf16_stochastic_rounding=stochastic,
                           grad_mask_seed=SEED)
    opt32 = OPTIMIZERS[name](model32.parameters(), grad_mask_seed=SEED)
    for t in range(1, 4):
        _grads(model, t)
        for p, q in zip(model.parameters(), model32.parameters()):
            q.grad = p.grad.float()
        opt.step()
        opt32.step()
        with torch.no_grad():
            for j, (p, q) in enumerate(zip(model.parameters(), model32.parameters())):
                q.copy_(ref.round_stochastic(q, SEED, t, j) if stochastic else q.to(dtype))
                assert torch.equal(p.view(torch.int16), q.to(dtype).view(torch.int16)), (name, t, j)
    for p, q in zip(model.parameters(), model32.parameters()):
        for key, buf in opt.state[p].items():
            if key != "step":
                assert buf.dtype == torch.float32
                assert torch.equal(buf, opt32.state[q][key]), key


def test_state_dtype_leaves_other_params_and_torch_interchange():
    """float32 params in a state_dtype=float32 group keep float32 state, a float64 param float64, and
    bf16_stochastic_rounding passes them through unrounded; a torch.optim.Adam state_dict (bf16 buffers)
    loads as float32 buffers, and a fusedopt float32-state state_dict loads back bit for bit (not through
    bf16, where torch's load_state_dict would cast it)."""
    w = torch.nn.Parameter(torch.randn(40, dtype=torch.bfloat16))
    b = torch.nn.Parameter(torch.randn(7))
    d = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = fusedopt.Adam([w, b, d], lr=1e-3, state_dtype=torch.float32, bf16_stochastic_rounding=True)
    for p in (w, b, d):
        p.grad = torch.randn_like(p)
    b_plain, d_plain = b.detach().clone(), d.detach().clone()
    opt.step()
    assert [opt.state[p]["exp_avg"].dtype for p in (w, b, d)] == [torch.float32, torch.float32, torch.float64]
    ref_opt = fusedopt.Adam([torch.nn.Parameter(b_plain), torch.nn.Parameter(d_plain)], lr=1e-3)
    for q, p in zip(ref_opt.param_groups[0]["params"], (b, d)):
        q.grad = p.grad.clone()
    ref_opt.step()
    assert torch.equal(ref_opt.param_groups[0]["params"][0], b)
    assert torch.equal(ref_opt.param_groups[0]["params"][1], d)

    sd = opt.state_dict()
    again = fusedopt.Adam([torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(b.detach().clone()),
                           torch.nn.Parameter(d.detach().clone())], lr=1e-3, state_dtype=torch.float32)
    again.load_state_dict(sd)
    for q, p in zip(again.param_groups[0]["params"], (w, b, d)):
        for key in ("exp_avg", "exp_avg_sq"):
            assert again.state[q][key].dtype == opt.state[p][key].dtype
            assert torch.equal(again.state[q][key], opt.state[p][key])
    assert again.param_groups[0]["state_dtype"] is torch.float32
    assert again.param_groups[0]["bf16_stochastic_rounding"] is True  # saved with the group

    t = torch.nn.Parameter(w.detach().clone())
    torch_opt = torch.optim.Adam([t], lr=1e-3)
    t.grad = torch.randn_like(t)
    torch_opt.step()
    ours = fusedopt.Adam([torch.nn.Parameter(t.detach().clone())], lr=1e-3, state_dtype=torch.float32)
    ours.load_state_dict(torch_opt.state_dict())
    q = ours.param_groups[0]["params"][0]
    assert ours.state[q]["exp_avg"].dtype == torch.float32
    assert torch.equal(ours.state[q]["exp_avg"], torch_opt.state[t]["exp_avg"].float())
    q.grad = torch.randn_like(q)
    ours.step()  # continues with float32 state
    torch_opt.load_state_dict(ours.state_dict())  # and back: torch casts to the param's dtype
    assert torch_opt.state[t]["exp_avg"].dtype == torch.bfloat16


def test_changing_state_dtype_converts_the_buffers():
    w = torch.nn.Parameter(torch.randn(10, dtype=torch.float16))
    opt = fusedopt.RMSprop([w], lr=1e-3)
    w.grad = torch.randn_like(w)
    opt.step()
    assert opt.state[w]["square_avg"].dtype == torch.float16
    opt.param_groups[0]["state_dtype"] = torch.float32
    opt.step()
    assert opt.state[w]["square_avg"].dtype == torch.float32


@pytest.mark.parametrize("bad", [dict(state_dtype=torch.float16), dict(state_dtype=torch.float64),
                                 dict(state_dtype="float32"), dict(bf16_stochastic_rounding=1)])
def test_invalid_options(bad):
    with pytest.raises(ValueError, match="state_dtype|bf16_stochastic_rounding"):
        fusedopt.Adam([torch.nn.Parameter(torch.randn(3))], **bad)


def test_stochastic_rounding_draws_its_seed():
    """Without an explicit grad_mask_seed, stochastic rounding draws one from torch's generator (so
    torch.manual_seed reproduces a run and two optimizers round differently)."""
    torch.manual_seed(5)
    a = fusedopt.SGD([torch.nn.Parameter(torch.randn(3))], bf16_stochastic_rounding=True)
    b = fusedopt.SGD([torch.nn.Parameter(torch.randn(3))], bf16_stochastic_rounding=True)
    torch.manual_seed(5)
    c = fusedopt.SGD([torch.nn.Parameter(torch.randn(3))], bf16_stochastic_rounding=True)
    seeds = [o.param_groups[0]["grad_mask_seed"] for o in (a, b, c)]
    assert seeds[0] != seeds[1] and seeds[0] == seeds[2]


def test_bf16_training_with_stochastic_rounding_keeps_learning():
    """A bf16 linear model with a small learning rate: round to nearest loses most updates and stalls far
    above the float32 run's loss; stochastic rounding (with float32 state) follows the float32 run."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=gen)
    y = x @ torch.randn(16, 1, generator=gen) + 3.0
    losses = {}
    for name, dtype, kw in [("fp32", torch.float32, {}), ("rne", torch.bfloat16, {}),
                            ("sr", torch.bfloat16, dict(state_dtype=torch.float32, bf16_stochastic_rounding=True))]:
        torch.manual_seed(1)
        model = torch.nn.Linear(16, 1).to(dtype)
        with torch.no_grad():
            model.bias.fill_(8.0)  # far from 3: bf16's ulp at 8 is 2^-4, the updates ~1e-3
        opt = fusedopt.SGD(model.parameters(), lr=2e-4, momentum=0.9, grad_mask_seed=SEED, **kw)
        for _ in range(300):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y)
            loss.backward()
            opt.step()
        losses[name] = torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y).item()
    assert losses["sr"] < 1.5 * losses["fp32"] + 0.05, losses
    assert losses["rne"] > 2 * losses["sr"], losses
