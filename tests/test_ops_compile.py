"""torch.library.opcheck on every fusedopt op, and torch.compile(fullgraph=True) of optimizer steps."""
import pytest
import torch

import fusedopt
from fusedopt import ops  # noqa: F401  (registers the fakes)

SHAPES = [(3, 5), (7,), (1,)]


def _lists(n_states, dtype=torch.float32, step=0.0):
    """params, grads, n_states state lists, steps for SHAPES; state buffers start positive (sqrt-safe)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]
    grads = [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]
    states = [[torch.rand(s, generator=gen, dtype=dtype) + 0.5 for s in SHAPES] for _ in range(n_states)]
    steps = [torch.tensor(step) for _ in SHAPES]
    return params, grads, states, steps, list(range(len(SHAPES)))


def _amp(kind):
    if kind == "scale":
        return dict(grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(0.0))
    if kind == "inf":
        return dict(grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(1.0))
    return {}


COMMON = [
    {},
    dict(weight_decay=0.1, l1_decay=0.01),
    dict(weight_decay=0.1, l1_decay=0.01, decoupled_weight_decay=True, maximize=True),
    dict(grad_keep_prob=0.7, grad_mask_seed=1234),
    # shards of larger parameters (Note [Shard offsets]); one per shape of _lists
    dict(grad_keep_prob=0.7, grad_mask_seed=1234, shard_offsets=[0, 13, 2**33 + 1]),
]

# (op, used state lists out of the op's state lists, rule options)
CASES = [
    ("sgd_", [False], {}),
    ("sgd_", [True], dict(momentum=0.9, dampening=0.1)),
    ("sgd_", [True], dict(momentum=0.9, nesterov=True)),
    ("sgd_", [True], dict(momentum=0.9, ema_momentum=True)),
    ("adagrad_", [True], dict(lr_decay=0.01, eps=1e-10)),
    ("rmsprop_", [True, False, False], {}),
    ("rmsprop_", [True, True, False], dict(centered=True)),
    ("rmsprop_", [True, True, True], dict(centered=True, momentum=0.9)),
    ("adam_", [True, True, False], {}),
    ("adam_", [True, True, True], dict(amsgrad=True)),
    ("adam_", [True, True, False], dict(eps_inside_sqrt=True, beta1=0.8, beta2=0.99)),
]


def _id(case):
    return case[0] + "-".join(f"{k}={v}" for k, v in case[2].items())


# Every case with every set of common options, and with AMP (scaled, and a skipped step) once.
OPCHECKS = [(case, common, "none") for case in CASES for common in range(len(COMMON))]
OPCHECKS += [(case, 1, amp) for case in CASES for amp in ("scale", "inf")]


@pytest.mark.parametrize("case, common, amp", OPCHECKS, ids=[f"{_id(c)}-common{k}-{a}" for c, k, a in OPCHECKS])
def test_opcheck_optimizer_ops(case, common, amp):
    name, used, options = case
    params, grads, states, steps, indices = _lists(len(used), step=2.0)
    states = [s if u else [] for s, u in zip(states, used)]
    kwargs = dict(lr=0.01, **options, **COMMON[common], **_amp(amp))
    op = getattr(torch.ops.fusedopt, name).default
    torch.library.opcheck(op, (params, grads, *states, steps, indices), kwargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_opcheck_other_dtypes(dtype):
    params, grads, states, steps, indices = _lists(3, dtype=dtype)
    torch.library.opcheck(torch.ops.fusedopt.adam_.default, (params, grads, *states, steps, indices),
                          dict(lr=0.01, amsgrad=True, weight_decay=0.1))


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_opcheck_fp32_state_of_bf16_params(case, stochastic):
    """float32 state lists for bf16 params (Note [State dtype]), with and without stochastic rounding."""
    name, used, options = case
    params, grads, states, steps, indices = _lists(len(used), dtype=torch.bfloat16, step=2.0)
    states = [[t.float() for t in s] if u else [] for s, u in zip(states, used)]
    torch.library.opcheck(getattr(torch.ops.fusedopt, name).default, (params, grads, *states, steps, indices),
                          dict(lr=0.01, stochastic_rounding=stochastic, grad_mask_seed=3, **options))


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_opcheck_tensor_lr(case):
    """The `.tensor_lr` overloads (Note [Tensor lr]): schema, fake, and the float op's result bit for bit."""
    name, used, options = case
    params, grads, states, steps, indices = _lists(len(used), step=2.0)
    states = [s if u else [] for s, u in zip(states, used)]
    op = getattr(torch.ops.fusedopt, name)
    lr = torch.tensor(0.01)
    torch.library.opcheck(op.tensor_lr, (params, grads, *states, steps, indices), dict(lr=lr, **options))
    copies = [[t.clone() for t in ts] for ts in (params, grads, *states, steps)]
    op.tensor_lr(params, grads, *states, steps, indices, lr=lr, **options)
    op.default(*copies, indices, lr=lr.item(), **options)
    for got, want in zip((params, grads, *states, steps), copies):
        for g, w in zip(got, want):  # centered RMSprop on random state may take √ of a negative: NaN
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("common", range(len(COMMON)))
def test_opcheck_tensor_betas(common):
    """adam_.tensor_betas (Note [Tensor betas]): schema, fake, and the float op's result bit for bit."""
    params, grads, states, steps, indices = _lists(3, step=2.0)
    scalars = dict(lr=torch.tensor(0.01), beta1=torch.tensor(0.8), beta2=torch.tensor(0.99, dtype=torch.float64))
    options = dict(amsgrad=True, **COMMON[common])
    op = torch.ops.fusedopt.adam_
    torch.library.opcheck(op.tensor_betas, (params, grads, *states, steps, indices), dict(**scalars, **options))
    copies = [[t.clone() for t in ts] for ts in (params, grads, *states, steps)]
    op.tensor_betas(params, grads, *states, steps, indices, **scalars, **options)
    op.default(*copies, indices, **{k: v.item() for k, v in scalars.items()}, **options)
    for got, want in zip((params, grads, *states, steps), copies):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_wrapper_takes_empty_lists():
    fusedopt.ops.adam_([], [], [], [], [], [], [], lr=0.01)  # the bare op would find no kernel to dispatch to


def test_opcheck_stream():
    a, b = torch.randn(1000), torch.randn(1000)
    torch.library.opcheck(torch.ops.fusedopt.stream_.default, (a, b, 0.5))


def test_fake_checks_lengths():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        p = [torch.empty(3)]
        with pytest.raises(RuntimeError, match="grads"):
            torch.ops.fusedopt.sgd_(p, [], [], [torch.empty(())], [0], lr=0.1)
        with pytest.raises(RuntimeError, match="state list"):
            torch.ops.fusedopt.adam_(p, [torch.empty(3)], [torch.empty(3), torch.empty(3)], [torch.empty(3)], [],
                                     [torch.empty(())], [0], lr=0.1)


def test_wrappers_call_the_ops():
    params, grads, (bufs,), steps, indices = _lists(1)
    expected = [p - 0.1 * g for p, g in zip(params, grads)]
    fusedopt.ops.sgd_(params, grads, [], steps, indices, lr=0.1)
    torch.testing.assert_close(params, expected, rtol=0, atol=0)
    assert [s.item() for s in steps] == [1.0] * len(steps)
    a, b = torch.ones(5), torch.arange(5.0)
    fusedopt.ops.stream_(a, b, 2.0)
    assert torch.equal(a, 1 + 2 * torch.arange(5.0))


# torch.compile(opt.step, fullgraph=True) against eager.

COMPILED = [
    (fusedopt.Adam, dict(lr=0.01, weight_decay=0.1, l1_decay=1e-3, grad_keep_prob=0.7, amsgrad=True)),
    (fusedopt.AdamW, dict(lr=0.01)),
    (fusedopt.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)),
    (fusedopt.Adagrad, dict(lr=0.1, lr_decay=0.01)),
    (fusedopt.RMSprop, dict(lr=0.01, centered=True, momentum=0.9)),
]


@pytest.mark.parametrize("cls, options", COMPILED, ids=[c.__name__ for c, _ in COMPILED])
def test_compiled_step_matches_eager(cls, options):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    eager = [torch.randn(s, generator=gen, requires_grad=True) for s in SHAPES]
    compiled = [p.detach().clone().requires_grad_() for p in eager]
    eager_opt = cls(eager, grad_mask_seed=7, **options)
    compiled_opt = cls(compiled, grad_mask_seed=7, **options)
    step = torch.compile(compiled_opt.step, fullgraph=True)
    for _ in range(3):
        grads = [torch.randn(s, generator=gen) for s in SHAPES]
        for e, c, g in zip(eager, compiled, grads):
            e.grad, c.grad = g.clone(), g.clone()
        eager_opt.step()
        step()
        # The same kernel runs in both: bitwise equal.
        for e, c in zip(eager, compiled):
            assert torch.equal(e, c)
    for e, c in zip(eager, compiled):
        es, cs = eager_opt.state[e], compiled_opt.state[c]
        assert es.keys() == cs.keys()
        for key in es:
            assert torch.equal(es[key], cs[key]), key
        assert cs["step"].item() == 3


def test_compiled_training_loop_fullgraph():
    """A whole compiled function: zero_grad, forward, backward, step (the step is fullgraph inside)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [fusedopt.AdamW(m.parameters(), lr=0.01, grad_mask_seed=3) for m in models]
    compiled_step = torch.compile(opts[1].step, fullgraph=True)
    x, y = torch.randn(16, 6), torch.randn(16, 1)
    for _ in range(3):
        for m, o, step in zip(models, opts, [opts[0].step, compiled_step]):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
