"""fusedopt's optimizers against fusedopt.reference and torch.optim: update rules, state_dict interchange,
param groups, AMP, errors."""
import copy
import inspect
import io

import pytest
import torch
from torch import nn

import fusedopt
import fusedopt.reference as ref

OPTIMIZERS = [fusedopt.SGD, fusedopt.Adagrad, fusedopt.RMSprop, fusedopt.Adam, fusedopt.AdamW]
TORCH = {fusedopt.SGD: torch.optim.SGD, fusedopt.Adagrad: torch.optim.Adagrad, fusedopt.RMSprop: torch.optim.RMSprop,
         fusedopt.Adam: torch.optim.Adam, fusedopt.AdamW: torch.optim.AdamW}
REFERENCE = {fusedopt.SGD: ref.sgd_step, fusedopt.Adagrad: ref.adagrad_step, fusedopt.RMSprop: ref.rmsprop_step,
             fusedopt.Adam: ref.adam_step, fusedopt.AdamW: ref.adam_step}
COMMON_KEYS = ("weight_decay", "l1_decay", "decoupled_weight_decay", "maximize", "grad_keep_prob", "grad_mask_seed")
# fp32 kernels against the float64 reference; fp64 against it (different operation order and FMAs only).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-14)}
# against torch.optim in fp32 (its operation order differs from ours)
TORCH_TOL = dict(rtol=1e-5, atol=1e-6)
SHAPES = [(5, 7), (67,), (1,), (0,)]
STEPS = 4


def _reference_options(cls, group):
    """The reference rule's keyword arguments, read from an optimizer's param group (so defaults are checked too)."""
    names = [n for n, p in inspect.signature(REFERENCE[cls]).parameters.items() if p.kind is p.KEYWORD_ONLY]
    return {k: float(group[k]) if torch.is_tensor(group[k]) else group[k] for k in (*names, *COMMON_KEYS)}


def _params(shapes, dtype, gen):
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def _check_against_reference(opt, params, gen, steps=STEPS, skip=lambda t, j: False):
    """Runs opt and the reference side by side (the reference on float64 copies); gradients are random in the
    params' dtype and skipped (None) where skip(t, j). Compares params and state."""
    groups = {id(p): g for g in opt.param_groups for p in g["params"]}
    cls = type(opt)
    copies = [p.detach().double().clone() for p in params]
    states = [{} for _ in params]
    for t in range(steps):
        for j, (p, r, state) in enumerate(zip(params, copies, states)):
            if skip(t, j):
                p.grad = None
                continue
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            p.grad = g.clone()
            REFERENCE[cls](r, g.double(), state, index=j, **_reference_options(cls, groups[id(p)]))
        opt.step()
    for p, r, state in zip(params, copies, states):
        tol = TOL.get(p.dtype)
        torch.testing.assert_close(p.detach().double(), r, **tol)
        ours = opt.state[p]
        if not state:
            assert not ours
            continue
        assert ours["step"].item() == state["step"]
        assert set(ours) == set(state)
        for key in set(state) - {"step"}:
            assert ours[key].dtype == p.dtype and ours[key].shape == p.shape
            torch.testing.assert_close(ours[key].double(), state[key], **tol)


# (a) against the reference, every optimizer × rule options × common options, fp32 and fp64.

RULES = {
    fusedopt.SGD: [dict(lr=0.05), dict(lr=0.05, momentum=0.9), dict(lr=0.05, momentum=0.9, dampening=0.3),
                   dict(lr=0.05, momentum=0.9, nesterov=True), dict(lr=0.05, momentum=0.9, ema_momentum=True)],
    fusedopt.Adagrad: [dict(lr=0.1), dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.5)],
    fusedopt.RMSprop: [dict(lr=0.01), dict(lr=0.01, centered=True), dict(lr=0.01, momentum=0.9),
                       dict(lr=0.01, centered=True, momentum=0.9)],
    fusedopt.Adam: [dict(lr=0.01), dict(lr=0.01, amsgrad=True), dict(lr=0.01, eps_inside_sqrt=True, betas=(0.8, 0.99))],
    fusedopt.AdamW: [dict(lr=0.01), dict(lr=0.01, amsgrad=True)],
}
COMMON = [
    {},
    dict(weight_decay=0.1),
    dict(weight_decay=0.1, l1_decay=0.01),
    dict(weight_decay=0.1, l1_decay=0.05, decoupled_weight_decay=True),
    dict(maximize=True),
    dict(grad_keep_prob=0.7),
    dict(weight_decay=0.1, l1_decay=0.01, maximize=True, grad_keep_prob=0.7),
    dict(weight_decay=0.1, l1_decay=0.05, decoupled_weight_decay=True, grad_keep_prob=0.7),
]
CASES = [(cls, {**rule, **common}) for cls, rules in RULES.items() for rule in rules for common in COMMON]


def _case_id(cls, options):
    return cls.__name__ + "-" + "-".join(f"{k}={v}" for k, v in options.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("cls, options", CASES, ids=[_case_id(*c) for c in CASES])
def test_matches_reference(cls, options, dtype):
    gen = torch.Generator().manual_seed(0)
    params = _params(SHAPES, dtype, gen)
    opt = cls(params, grad_mask_seed=2024, **options)
    _check_against_reference(opt, params, gen)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)], ids=["bf16", "fp16"])
def test_half_precision_smoke(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    params = _params([(9, 5), (3,)], dtype, gen)
    opt = fusedopt.AdamW(params, lr=0.01, l1_decay=0.01, grad_keep_prob=0.7, grad_mask_seed=5)
    copies = [p.detach().double().clone() for p in params]
    states = [{} for _ in params]
    for _ in range(3):
        for j, (p, r, state) in enumerate(zip(params, copies, states)):
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            ref.adam_step(r, p.grad.double(), state, index=j, **_reference_options(fusedopt.AdamW, opt.param_groups[0]))
        opt.step()
    for p, r in zip(params, copies):
        assert p.dtype == dtype and opt.state[p]["exp_avg"].dtype == dtype
        torch.testing.assert_close(p.detach().double(), r, rtol=tol, atol=tol)


# (b) against torch.optim (foreach=False) for the configurations torch has, fp32.

def _torch_cases():
    for wd, maximize in [(0.0, False), (0.1, False), (0.1, True)]:
        c = dict(weight_decay=wd, maximize=maximize)
        for m, d, n in [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.3, False), (0.9, 0.0, True)]:
            yield fusedopt.SGD, dict(c, lr=0.05, momentum=m, dampening=d, nesterov=n)
        yield fusedopt.Adagrad, dict(c, lr=0.1)
        yield fusedopt.Adagrad, dict(c, lr=0.1, lr_decay=0.01, initial_accumulator_value=0.5, eps=1e-6)
        for centered in [False, True]:
            for m in [0.0, 0.9]:
                yield fusedopt.RMSprop, dict(c, lr=0.01, centered=centered, momentum=m, alpha=0.9)
        for amsgrad in [False, True]:
            yield fusedopt.Adam, dict(c, lr=0.01, amsgrad=amsgrad, betas=(0.8, 0.99))
            yield fusedopt.Adam, dict(c, lr=0.01, amsgrad=amsgrad, decoupled_weight_decay=True)
            yield fusedopt.AdamW, dict(c, lr=0.01, amsgrad=amsgrad)


TORCH_CASES = list(_torch_cases())


def _run_pair(cls, options, torch_options=None, shapes=SHAPES, dtype=torch.float32, steps=STEPS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ours = _params(shapes, dtype, gen)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = cls(ours, **options)
    topt = TORCH[cls](theirs, foreach=False, **(options if torch_options is None else torch_options))
    for _ in range(steps):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
            q.grad = p.grad.clone()
        opt.step()
        topt.step()
    return ours, theirs, opt, topt


@pytest.mark.parametrize("cls, options", TORCH_CASES, ids=[_case_id(*c) for c in TORCH_CASES])
def test_matches_torch(cls, options):
    ours, theirs, opt, topt = _run_pair(cls, options)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, **TORCH_TOL)
        for key, value in topt.state[q].items():
            torch.testing.assert_close(opt.state[p][key], value, **TORCH_TOL)


# (c) state_dict interchange with torch.optim.

INTERCHANGE = [
    (fusedopt.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    (fusedopt.SGD, dict(lr=0.05)),
    (fusedopt.Adagrad, dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1)),
    (fusedopt.RMSprop, dict(lr=0.01, momentum=0.9, centered=True)),
    (fusedopt.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    (fusedopt.AdamW, dict(lr=0.01, amsgrad=True)),
]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def _groups(model, options):
    """Two groups with different learning rates: weights, then biases."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [dict(params=weights), dict(params=biases, lr=options["lr"] * 2)]


def _train(model, opt, steps):
    for k in steps:
        gen = torch.Generator().manual_seed(k)
        x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _assert_same_state_dict(ours, theirs, exact):
    """State: same params, keys (ours may add 'step' for SGD), shapes, dtypes, devices, values (bitwise when
    exact); param_groups: every torch key with the same value."""
    assert theirs["state"].keys() <= ours["state"].keys()
    for idx in ours["state"].keys() - theirs["state"].keys():
        assert set(ours["state"][idx]) == {"step"}  # SGD without momentum: torch keeps no state at all
    for idx, state in theirs["state"].items():
        extra = set(ours["state"][idx]) - set(state)
        assert extra <= {"step"}
        for key, value in state.items():
            mine = ours["state"][idx][key]
            assert (mine.shape, mine.dtype, mine.device) == (value.shape, value.dtype, value.device), key
            if exact:
                assert torch.equal(mine, value), key
            else:
                torch.testing.assert_close(mine, value, **TORCH_TOL)
    assert len(ours["param_groups"]) == len(theirs["param_groups"])
    for mine, group in zip(ours["param_groups"], theirs["param_groups"]):
        assert {k: mine[k] for k in group} == group


@pytest.mark.parametrize("cls, options", INTERCHANGE, ids=[_case_id(*c) for c in INTERCHANGE])
def test_state_dict_interchange_mid_training(cls, options):
    torch_cls = TORCH[cls]
    # Uninterrupted torch run.
    model = _model()
    topt = torch_cls(_groups(model, options), foreach=False, **options)
    _train(model, topt, range(6))
    expected = [p.detach().clone() for p in model.parameters()]
    expected_state = topt.state_dict()
    # torch for 2 steps, then fusedopt for 2, then torch again.
    model = _model()
    first = torch_cls(_groups(model, options), foreach=False, **options)
    _train(model, first, range(2))
    saved = first.state_dict()
    opt = cls(_groups(model, options), **options)
    opt.load_state_dict(saved)
    _assert_same_state_dict(opt.state_dict(), saved, exact=True)  # a pure round trip changes nothing
    _train(model, opt, range(2, 4))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, map_location="cpu")
    last = torch_cls(_groups(model, options), foreach=False, **options)
    last.load_state_dict(reloaded)
    _assert_same_state_dict(reloaded, last.state_dict(), exact=True)
    _train(model, last, range(4, 6))
    torch.testing.assert_close(list(model.parameters()), expected, **TORCH_TOL)
    _assert_same_state_dict(last.state_dict(), expected_state, exact=False)


@pytest.mark.parametrize("cls, options", INTERCHANGE, ids=[_case_id(*c) for c in INTERCHANGE])
def test_state_dict_layout_matches_torch(cls, options):
    model, tmodel = _model(), _model()
    opt = cls(_groups(model, options), foreach=False, **options)
    topt = TORCH[cls](_groups(tmodel, options), foreach=False, **options)
    _train(model, opt, range(3))
    _train(tmodel, topt, range(3))
    ours = opt.state_dict()
    _assert_same_state_dict(ours, topt.state_dict(), exact=False)
    for state in ours["state"].values():
        assert state["step"].item() == 3 and state["step"].dtype == torch.float32 and state["step"].device.type == "cpu"
    # The fusedopt options travel in the param groups.
    for group in ours["param_groups"]:
        assert {"l1_decay", "decoupled_weight_decay", "grad_keep_prob", "grad_mask_seed"} <= set(group)


def test_step_dtype_follows_default_dtype_as_torch():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for cls in OPTIMIZERS[1:]:  # torch's SGD keeps no step
            p, q = torch.randn(3, dtype=torch.float32, requires_grad=True), torch.randn(3, requires_grad=True)
            ours, theirs = cls([p], lr=0.1), TORCH[cls]([q], lr=0.1)
            p.grad, q.grad = torch.ones(3, dtype=torch.float32), torch.ones(3)
            ours.step()
            theirs.step()
            assert ours.state[p]["step"].dtype == theirs.state[q]["step"].dtype == torch.float64
            assert ours.state[p]["step"].item() == 1
    finally:
        torch.set_default_dtype(previous)


def test_deepcopy_and_pickle():
    model = _model()
    opt = fusedopt.AdamW(model.parameters(), lr=0.01, grad_mask_seed=5)
    _train(model, opt, range(2))
    clone = copy.deepcopy(opt)
    assert clone.param_groups[0]["grad_mask_seed"] == 5 and clone.param_groups[0]["decoupled_weight_decay"]
    for p, q in zip(opt.param_groups[0]["params"], clone.param_groups[0]["params"]):
        assert torch.equal(opt.state[p]["exp_avg"], clone.state[q]["exp_avg"])
    pickled = torch.load(io.BytesIO(_saved(opt)), weights_only=False)
    assert type(pickled) is fusedopt.AdamW and pickled.param_groups[0]["grad_mask_seed"] == 5


def _saved(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_fusedopt_checkpoint_resumes_in_fusedopt():
    options = dict(lr=0.01, l1_decay=0.01, grad_keep_prob=0.8, grad_mask_seed=11, amsgrad=True)
    model = _model()
    opt = fusedopt.AdamW(model.parameters(), **options)
    _train(model, opt, range(5))
    expected = [p.detach().clone() for p in model.parameters()]
    model = _model()
    opt = fusedopt.AdamW(model.parameters(), **options)
    _train(model, opt, range(2))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed = fusedopt.AdamW(model.parameters(), lr=0.5, grad_mask_seed=99)  # everything comes from the checkpoint
    resumed.load_state_dict(torch.load(buffer, map_location="cpu"))
    assert resumed.param_groups[0]["grad_mask_seed"] == 11 and resumed.param_groups[0]["lr"] == 0.01
    _train(model, resumed, range(2, 5))
    for p, q in zip(model.parameters(), expected):
        assert torch.equal(p, q)


def test_torch_checkpoint_keeps_fusedopt_options():
    model = _model()
    topt = torch.optim.Adam(model.parameters(), lr=0.01)
    _train(model, topt, range(2))
    opt = fusedopt.Adam(model.parameters(), lr=0.01, l1_decay=0.01, grad_keep_prob=0.9, grad_mask_seed=77,
                        eps_inside_sqrt=True)
    opt.load_state_dict(topt.state_dict())
    group = opt.param_groups[0]
    assert (group["l1_decay"], group["grad_keep_prob"], group["grad_mask_seed"], group["eps_inside_sqrt"]) == \
        (0.01, 0.9, 77, True)


def test_adamw_stays_decoupled_after_loading_adam_state():
    model = _model()
    topt = torch.optim.Adam(model.parameters(), lr=0.01)
    _train(model, topt, range(1))
    opt = fusedopt.AdamW(model.parameters(), lr=0.01)
    opt.load_state_dict(topt.state_dict())
    assert opt.param_groups[0]["decoupled_weight_decay"] is True  # as torch.optim.AdamW does


def test_sgd_state_from_torch_continues_momentum():
    """torch's SGD keeps no step: the loaded buffer must be updated, not re-seeded with g."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(10, generator=gen, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    topt = torch.optim.SGD([p], lr=0.1, momentum=0.9, dampening=0.5)
    grads = [torch.randn(10, generator=gen) for _ in range(3)]
    for g in grads:
        p.grad = g.clone()
        topt.step()
    sgd = torch.optim.SGD([q], lr=0.1, momentum=0.9, dampening=0.5)
    q.grad = grads[0].clone()
    sgd.step()
    opt = fusedopt.SGD([q], lr=0.1, momentum=0.9, dampening=0.5)
    opt.load_state_dict(sgd.state_dict())
    assert "step" not in opt.state[q]
    for g in grads[1:]:
        q.grad = g.clone()
        opt.step()
    assert opt.state[q]["step"].item() == 3
    torch.testing.assert_close(q, p, **TORCH_TOL)


# (d) groups, None grads, closures, zero_grad, schedulers, tensor lr, mixed dtypes, complex, sparse, errors.

def test_param_groups_with_different_hyperparameters():
    gen = torch.Generator().manual_seed(0)
    params = _params([(4, 3), (5,), (2, 2), (7,)], torch.float64, gen)
    opt = fusedopt.Adam([dict(params=params[:2], lr=0.1, weight_decay=0.1),
                         dict(params=params[2:], amsgrad=True, l1_decay=0.01, decoupled_weight_decay=True,
                              grad_keep_prob=0.6)], lr=0.01, grad_mask_seed=3)
    # indices continue across groups: params[2] is number 2 of the mask stream
    _check_against_reference(opt, params, gen)


def test_param_groups_match_torch():
    shapes = [(4, 3), (5,), (2, 2)]
    gen = torch.Generator().manual_seed(0)
    ours = _params(shapes, torch.float32, gen)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    groups = lambda ps: [dict(params=ps[:1], lr=0.1, momentum=0.5), dict(params=ps[1:], nesterov=True)]  # noqa: E731
    opt = fusedopt.SGD(groups(ours), lr=0.01, momentum=0.9, weight_decay=0.01)
    topt = torch.optim.SGD(groups(theirs), lr=0.01, momentum=0.9, weight_decay=0.01, foreach=False)
    for _ in range(STEPS):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        topt.step()
    torch.testing.assert_close(ours, theirs, **TORCH_TOL)


def test_none_grads_are_skipped_and_mask_indices_stay():
    gen = torch.Generator().manual_seed(0)
    params = _params([(6,), (9,), (4, 4)], torch.float64, gen)
    opt = fusedopt.RMSprop(params, lr=0.01, momentum=0.9, grad_keep_prob=0.5, grad_mask_seed=8)
    # params[1] has no gradient at steps 1 and 2; params[2] keeps its stream number 2 throughout.
    _check_against_reference(opt, params, gen, steps=4, skip=lambda t, j: j == 1 and t in (1, 2))
    assert opt.state[params[1]]["step"].item() == 2 and opt.state[params[0]]["step"].item() == 4


def test_none_grad_leaves_param_and_state_untouched():
    params = [torch.randn(5, requires_grad=True), torch.randn(3, requires_grad=True)]
    opt = fusedopt.Adam(params, lr=0.1)
    params[0].grad = torch.randn(5)
    params[1].grad = torch.randn(3)
    opt.step()
    before = params[1].detach().clone()
    state = {k: v.clone() for k, v in opt.state[params[1]].items()}
    params[0].grad = torch.randn(5)
    params[1].grad = None
    opt.step()
    assert torch.equal(params[1], before)
    assert all(torch.equal(opt.state[params[1]][k], v) for k, v in state.items())


def test_closure_and_zero_grad():
    model, tmodel = _model(), _model()
    opt = fusedopt.Adam(model.parameters(), lr=0.01)
    topt = torch.optim.Adam(tmodel.parameters(), lr=0.01, foreach=False)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    for m, o in [(model, opt), (tmodel, topt)]:
        for _ in range(3):
            def closure(m=m, o=o):
                o.zero_grad()
                assert torch.is_grad_enabled()
                loss = nn.functional.mse_loss(m(x), y)
                loss.backward()
                return loss
            loss = o.step(closure)
            assert loss is not None and loss.requires_grad
    torch.testing.assert_close(list(model.parameters()), list(tmodel.parameters()), **TORCH_TOL)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    fresh = fusedopt.Adam(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    fresh.step()  # no gradients: nothing happens, no state appears
    assert len(fresh.state) == 0 and all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_step_runs_without_grad_mode():
    p = torch.randn(4, requires_grad=True)
    p.grad = torch.randn(4)
    fusedopt.SGD([p], lr=0.1).step()
    assert p.grad_fn is None and p.is_leaf


def test_lr_scheduler_matches_torch():
    model, tmodel = _model(), _model()
    opt = fusedopt.Adam(model.parameters(), lr=0.05)
    topt = torch.optim.Adam(tmodel.parameters(), lr=0.05, foreach=False)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt, topt)]
    for epoch in range(5):
        _train(model, opt, [epoch])
        _train(tmodel, topt, [epoch])
        for s in scheds:
            s.step()
    assert opt.param_groups[0]["lr"] == topt.param_groups[0]["lr"] == 0.05 * 0.5**2
    torch.testing.assert_close(list(model.parameters()), list(tmodel.parameters()), **TORCH_TOL)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=[c.__name__ for c in OPTIMIZERS])
def test_tensor_lr(cls):
    a, b = _model(), _model()
    opts = [cls(a.parameters(), lr=torch.tensor(0.01)), cls(b.parameters(), lr=0.01)]
    _train(a, opts[0], range(3))
    _train(b, opts[1], range(3))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [fusedopt.Adam, fusedopt.AdamW], ids=["Adam", "AdamW"])
def test_tensor_betas(cls):
    """Tensor betas (Note [Tensor betas]): the bits of float betas of the same values, new values in the
    tensors used by the next step, and torch's own optimizer with the same tensor betas within fp32 tolerance."""
    a, b, t = _model(), _model(), _model()
    betas = (torch.tensor(0.8), torch.tensor(0.99, dtype=torch.float64))
    opts = [cls(a.parameters(), lr=0.01, betas=betas),
            cls(b.parameters(), lr=0.01, betas=tuple(x.item() for x in betas)),
            TORCH[cls](t.parameters(), lr=0.01, betas=tuple(x.clone() for x in betas), foreach=False)]
    for epoch in range(4):
        for model, opt in zip((a, b, t), opts):
            _train(model, opt, [epoch])
        if epoch == 1:  # a beta schedule: the same tensors, new values
            for opt in (opts[0], opts[2]):
                opt.param_groups[0]["betas"][0].fill_(0.6)
            opts[1].param_groups[0]["betas"] = tuple(x.item() for x in opts[0].param_groups[0]["betas"])
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    torch.testing.assert_close(list(a.parameters()), list(t.parameters()), **TORCH_TOL)


def test_mixed_dtypes_one_call_per_dtype(monkeypatch):
    calls = []
    op = fusedopt.Adam._op

    def counting(params, *args, **kwargs):
        calls.append([p.dtype for p in params])
        op(params, *args, **kwargs)

    monkeypatch.setattr(fusedopt.Adam, "_op", staticmethod(counting))
    gen = torch.Generator().manual_seed(0)
    params = _params([(5, 3)], torch.float32, gen) + _params([(7,)], torch.float64, gen) + \
        _params([(4,)], torch.float32, gen)
    opt = fusedopt.Adam(params, lr=0.01, weight_decay=0.1, grad_keep_prob=0.8, grad_mask_seed=4)
    _check_against_reference(opt, params, gen, steps=3)
    assert calls == [[torch.float32, torch.float32], [torch.float64]] * 3


def test_non_contiguous_params():
    gen = torch.Generator().manual_seed(0)
    transposed = torch.randn(6, 5, generator=gen, dtype=torch.float64).t().requires_grad_()
    conv = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64).to(memory_format=torch.channels_last)
    params = [transposed, conv.requires_grad_()]
    assert not any(p.is_contiguous() for p in params)
    opt = fusedopt.Adam(params, lr=0.01, weight_decay=0.1, grad_keep_prob=0.7, grad_mask_seed=1)
    _check_against_reference(opt, params, gen)
    for p in params:
        assert opt.state[p]["exp_avg"].stride() == p.stride()  # state keeps the parameter's layout


COMPLEX = [
    (fusedopt.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.1)),
    (fusedopt.Adagrad, dict(lr=0.1, initial_accumulator_value=0.2)),
    (fusedopt.RMSprop, dict(lr=0.01, centered=True, momentum=0.9)),
    (fusedopt.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    (fusedopt.AdamW, dict(lr=0.01, maximize=True)),
]


@pytest.mark.parametrize("cls, options", COMPLEX, ids=[_case_id(*c) for c in COMPLEX])
def test_complex_params_match_torch(cls, options):
    ours, theirs, opt, topt = _run_pair(cls, options, shapes=[(3, 4), (5,)], dtype=torch.complex64)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, **TORCH_TOL)
        for key, value in topt.state[q].items():
            assert opt.state[p][key].dtype == value.dtype
            torch.testing.assert_close(opt.state[p][key], value, **TORCH_TOL)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=[c.__name__ for c in OPTIMIZERS])
def test_sparse_grad_is_a_clear_error(cls):
    emb = nn.Embedding(10, 3, sparse=True)
    opt = cls(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


P = lambda: [torch.zeros(2, requires_grad=True)]  # noqa: E731
TORCH_ERRORS = [
    (fusedopt.SGD, dict(lr=-0.1)), (fusedopt.SGD, dict(lr=torch.tensor([0.1, 0.2]))),
    (fusedopt.SGD, dict(momentum=-0.5)), (fusedopt.SGD, dict(weight_decay=-1.0)),
    (fusedopt.SGD, dict(nesterov=True)), (fusedopt.SGD, dict(momentum=0.9, dampening=0.1, nesterov=True)),
    (fusedopt.Adagrad, dict(lr=-0.1)), (fusedopt.Adagrad, dict(lr_decay=-1.0)),
    (fusedopt.Adagrad, dict(weight_decay=-1.0)), (fusedopt.Adagrad, dict(initial_accumulator_value=-1.0)),
    (fusedopt.Adagrad, dict(eps=-1.0)), (fusedopt.Adagrad, dict(lr=torch.tensor([0.1, 0.2]))),
    (fusedopt.RMSprop, dict(lr=-0.1)), (fusedopt.RMSprop, dict(eps=-1.0)), (fusedopt.RMSprop, dict(momentum=-1.0)),
    (fusedopt.RMSprop, dict(weight_decay=-1.0)), (fusedopt.RMSprop, dict(alpha=-1.0)),
    (fusedopt.Adam, dict(lr=-0.1)), (fusedopt.Adam, dict(eps=-1.0)), (fusedopt.Adam, dict(betas=(1.0, 0.999))),
    (fusedopt.Adam, dict(betas=(0.9, 1.0))), (fusedopt.Adam, dict(betas=(-0.1, 0.999))),
    (fusedopt.Adam, dict(weight_decay=-1.0)), (fusedopt.Adam, dict(betas=(0.9, torch.tensor(0.999)))),
    (fusedopt.Adam, dict(lr=torch.tensor(0.1), foreach=True)),
    (fusedopt.Adam, dict(betas=(torch.tensor(0.9), torch.tensor(0.99)), foreach=True)),
    (fusedopt.Adam, dict(betas=(torch.tensor([0.9, 0.9]), torch.tensor(0.99)))),
    (fusedopt.AdamW, dict(lr=-0.1)), (fusedopt.AdamW, dict(betas=(0.9, 1.5))), (fusedopt.AdamW, dict(eps=-1e-8)),
    (fusedopt.AdamW, dict(weight_decay=-0.1)),
]


@pytest.mark.parametrize("cls, options", TORCH_ERRORS, ids=[_case_id(*c) for c in TORCH_ERRORS])
def test_errors_as_torch(cls, options):
    """Every bad value torch refuses (a ValueError, but for a 2-element beta tensor), refused alike."""
    with pytest.raises((ValueError, RuntimeError)) as theirs:
        TORCH[cls](P(), **options)
    with pytest.raises(theirs.type) as ours:
        cls(P(), **options)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=[c.__name__ for c in OPTIMIZERS])
def test_empty_params_and_fused_foreach_errors_as_torch(cls):
    for args, options, error in [(([],), {}, ValueError)] + \
            ([((P(),), dict(fused=True, foreach=True), RuntimeError)] if cls is not fusedopt.RMSprop else []):
        with pytest.raises(error) as theirs:
            TORCH[cls](*args, **options)
        with pytest.raises(error) as ours:
            cls(*args, **options)
        assert str(ours.value) == str(theirs.value)


OUR_ERRORS = [
    (dict(l1_decay=-0.1), "l1_decay"), (dict(grad_keep_prob=0.0), "grad_keep_prob"),
    (dict(grad_keep_prob=1.5), "grad_keep_prob"), (dict(grad_mask_seed=-1), "grad_mask_seed"),
    (dict(grad_mask_seed=2**64), "grad_mask_seed"), (dict(grad_mask_seed=1.5), "grad_mask_seed"),
    (dict(differentiable=True), "differentiable=True"),
]


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=[c.__name__ for c in OPTIMIZERS])
@pytest.mark.parametrize("options, match", OUR_ERRORS, ids=[m + str(o) for o, m in OUR_ERRORS])
def test_our_value_errors(cls, options, match):
    with pytest.raises(ValueError, match=match):
        cls(P(), **options)


@pytest.mark.parametrize("options", [dict(momentum=0.9, dampening=0.1, ema_momentum=True),
                                     dict(momentum=0.9, nesterov=True, ema_momentum=True)])
def test_ema_momentum_errors(options):
    with pytest.raises(ValueError, match="ema_momentum"):
        fusedopt.SGD(P(), **options)


def test_options_are_stored_like_torch():
    opt = fusedopt.Adam(P(), foreach=False, fused=True, capturable=True)
    topt = torch.optim.Adam(P(), foreach=False, fused=True, capturable=True)
    assert {k: opt.defaults[k] for k in topt.defaults} == topt.defaults
    assert fusedopt.AdamW(P()).defaults["weight_decay"] == 1e-2
    assert fusedopt.AdamW(P()).defaults["decoupled_weight_decay"] is True
    assert fusedopt.Adam(P()).defaults["decoupled_weight_decay"] is False
    for cls in OPTIMIZERS:
        theirs = inspect.signature(TORCH[cls]).parameters
        ours = inspect.signature(cls).parameters
        assert list(ours)[:len(theirs)] == list(theirs), cls  # torch's arguments, in torch's order
        for name, p in theirs.items():
            assert (ours[name].kind, ours[name].default) == (p.kind, p.default), (cls, name)
        assert all(ours[n].kind is inspect.Parameter.KEYWORD_ONLY for n in list(ours)[len(theirs):])


# (e) param_groups.

def test_param_groups_excludes_biases_and_norms():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.conv = nn.Conv1d(4, 4, 3)
            self.bn = nn.BatchNorm1d(4)
            self.ln = nn.LayerNorm(4)
            self.gn = nn.GroupNorm(2, 4)
            self.rms = nn.RMSNorm(4)
            self.fc = nn.Linear(4, 10)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight  # tied
            self.scale = nn.Parameter(torch.ones(1))
            self.frozen = nn.Linear(2, 2)
            self.frozen.requires_grad_(False)

    net = Net()
    decayed, undecayed = fusedopt.param_groups(net, weight_decay=0.1, l1_decay=1e-3, lr=0.5)
    ids = lambda ps: sorted(id(p) for p in ps)  # noqa: E731
    assert ids(decayed["params"]) == ids([net.emb.weight, net.conv.weight, net.fc.weight])
    assert ids(undecayed["params"]) == ids([net.conv.bias, net.bn.weight, net.bn.bias, net.ln.weight, net.ln.bias,
                                            net.gn.weight, net.gn.bias, net.rms.weight, net.fc.bias, net.scale])
    assert (decayed["weight_decay"], decayed["l1_decay"], decayed["lr"]) == (0.1, 1e-3, 0.5)
    assert (undecayed["weight_decay"], undecayed["l1_decay"], undecayed["lr"]) == (0.0, 0.0, 0.5)
    # Default coefficients come from the optimizer.
    opt = fusedopt.AdamW(fusedopt.param_groups(net))
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-2, 0.0]


def test_param_groups_leave_biases_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    opt = fusedopt.SGD(fusedopt.param_groups(model, weight_decay=0.5, l1_decay=0.1), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        if n == "0.weight":
            expected = before[n] - 0.1 * (0.5 * before[n] + 0.1 * before[n].sign())
            torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(p, before[n]), n


# (f) grad_mask_seed.

def test_seed_is_drawn_from_torch_and_travels():
    torch.manual_seed(123)
    a = fusedopt.Adam(P(), grad_keep_prob=0.5)
    torch.manual_seed(123)
    b = fusedopt.Adam(P(), grad_keep_prob=0.5)
    c = fusedopt.Adam(P(), grad_keep_prob=0.5)
    seed = a.param_groups[0]["grad_mask_seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**63
    assert b.param_groups[0]["grad_mask_seed"] == seed != c.param_groups[0]["grad_mask_seed"]
    assert a.state_dict()["param_groups"][0]["grad_mask_seed"] == seed
    a.add_param_group(dict(params=P()))
    assert a.param_groups[1]["grad_mask_seed"] == seed


def _masked_run(seed, steps=3):
    model = _model()
    opt = fusedopt.SGD(model.parameters(), lr=0.1, grad_keep_prob=0.5, grad_mask_seed=seed)
    _train(model, opt, range(steps))
    return [p.detach().clone() for p in model.parameters()]


def test_fixed_seed_is_reproducible():
    first, again, other = _masked_run(42), _masked_run(42), _masked_run(43)
    assert all(torch.equal(p, q) for p, q in zip(first, again))
    assert not all(torch.equal(p, q) for p, q in zip(first, other))


def test_seed_above_2_63():
    gen = torch.Generator().manual_seed(0)
    params = _params([(33,)], torch.float64, gen)
    opt = fusedopt.SGD(params, lr=0.1, grad_keep_prob=0.5, grad_mask_seed=2**64 - 5)
    _check_against_reference(opt, params, gen, steps=2)


def test_masked_elements_do_not_move():
    p = torch.randn(1000, requires_grad=True)
    before = p.detach().clone()
    p.grad = torch.ones(1000)
    fusedopt.SGD([p], lr=0.1, grad_keep_prob=0.25, grad_mask_seed=6).step()
    keep = torch.from_numpy(ref.keep_mask(6, 1 * 2**24 + 0, 1000, 0.25))
    assert torch.equal(p.detach()[~keep], before[~keep])
    torch.testing.assert_close(p.detach()[keep], before[keep] - 0.1 / 0.25)


# (g) AMP: GradScaler on the CPU drives the fused path.

def _amp_step(model, opt, scaler, k, unscale_first=False, poison=False):
    gen = torch.Generator().manual_seed(k)
    x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 2, generator=gen)
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    scaler.scale(nn.functional.mse_loss(out.float(), y)).backward()
    if poison:
        model[0].weight.grad[0, 0] = float("inf")
    if unscale_first:
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(opt)
    scaler.update()


def test_grad_scaler_bf16_autocast(monkeypatch):
    seen = []
    op = fusedopt.Adam._op

    def recording(*args, grad_scale=None, found_inf=None, **kwargs):
        seen.append((None if grad_scale is None else grad_scale.item(), found_inf.item()))
        op(*args, grad_scale=grad_scale, found_inf=found_inf, **kwargs)

    monkeypatch.setattr(fusedopt.Adam, "_op", staticmethod(recording))
    model, tmodel = _model(), _model()
    opt = fusedopt.Adam(model.parameters(), lr=0.01)
    topt = torch.optim.Adam(tmodel.parameters(), lr=0.01, foreach=False)
    scaler, tscaler = (torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2))
    for k in range(3):
        _amp_step(model, opt, scaler, k, unscale_first=k == 2)
        _amp_step(tmodel, topt, tscaler, k, unscale_first=k == 2)
        for p, q in zip(model.parameters(), tmodel.parameters()):
            assert torch.equal(p.grad, q.grad)  # the op wrote the unscaled gradient back, as torch unscales
    assert seen == [(2.0**10, 0.0), (2.0**10, 0.0), (None, 0.0)]  # after unscale_() the grads come unscaled
    torch.testing.assert_close(list(model.parameters()), list(tmodel.parameters()), **TORCH_TOL)
    # An overflowing step changes nothing: params, state, steps.
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    _amp_step(model, opt, scaler, 3, poison=True)
    assert seen[-1] == (2.0**10, 1.0)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    for idx, s in opt.state_dict()["state"].items():
        assert all(torch.equal(v, state[idx][k]) for k, v in s.items())
        assert s["step"].item() == 3
    assert scaler.get_scale() == 2.0**9


@pytest.mark.parametrize("dampening", [0.0, 0.3])
def test_grad_scaler_skipping_the_first_momentum_step(dampening):
    """An overflow on the very first step (routine at fp16's large initial scale) leaves SGD's momentum fresh:
    the next step seeds it from the gradient as the for-loop SGD does. (torch 2.13's fused CPU SGD keeps an
    uninitialized momentum buffer there, and its parameters blow up on the next step.)"""
    model, tmodel = _model(), _model()
    opt = fusedopt.SGD(model.parameters(), lr=0.05, momentum=0.9, dampening=dampening)
    topt = torch.optim.SGD(tmodel.parameters(), lr=0.05, momentum=0.9, dampening=dampening, foreach=False)
    scaler, tscaler = (torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2))
    for k in range(3):
        _amp_step(model, opt, scaler, k, poison=k == 0)
        _amp_step(tmodel, topt, tscaler, k, poison=k == 0)
    assert scaler.get_scale() == tscaler.get_scale() == 2.0**9
    torch.testing.assert_close(list(model.parameters()), list(tmodel.parameters()), **TORCH_TOL)
    for p, q in zip(model.parameters(), tmodel.parameters()):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], topt.state[q]["momentum_buffer"], **TORCH_TOL)


@pytest.mark.parametrize("dampening", [0.0, 0.3])
def test_unseeded_momentum_is_saved_as_none(dampening):
    """A momentum that no step has seeded (GradScaler skipped SGD's first step) is saved as None, torch.optim.SGD's
    own mark of it: torch resumes from fusedopt's checkpoint seeding b = g as fusedopt does, and so does a
    fusedopt.SGD that loads it. (Saved as the zeros it holds, torch would continue with (1 − dampening)·g.)"""
    options = dict(lr=0.05, momentum=0.9, dampening=dampening)
    model = _model()
    opt = fusedopt.SGD(model.parameters(), **options)
    _amp_step(model, opt, torch.amp.GradScaler("cpu", init_scale=2.0**10), 0, poison=True)
    saved = opt.state_dict()
    assert saved["state"] and all(s["momentum_buffer"] is None and s["step"] == 0 for s in saved["state"].values())
    assert all(torch.is_tensor(s["momentum_buffer"]) for s in opt.state.values())  # the live state keeps its buffers
    resumed, tmodel = _model(), _model()
    resumed_opt = fusedopt.SGD(resumed.parameters(), **options)
    resumed_opt.load_state_dict(copy.deepcopy(saved))
    topt = torch.optim.SGD(tmodel.parameters(), **options, foreach=False)
    topt.load_state_dict(copy.deepcopy(saved))
    for k in range(1, 4):
        for m, o in [(model, opt), (resumed, resumed_opt), (tmodel, topt)]:
            _amp_step(m, o, torch.amp.GradScaler("cpu", enabled=False), k)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))
    torch.testing.assert_close(list(model.parameters()), list(tmodel.parameters()), **TORCH_TOL)


def test_checkpoint_with_none_momentum_loads():
    """torch.optim.SGD before 2.3 saved momentum_buffer None for every parameter when momentum was 0; and a
    None momentum with momentum > 0 is one the next step seeds. Both load and step as torch does."""
    for options in [dict(lr=0.05), dict(lr=0.05, momentum=0.9, dampening=0.3)]:
        model, tmodel = _model(), _model()
        opt = fusedopt.SGD(model.parameters(), **options)
        topt = torch.optim.SGD(tmodel.parameters(), **options, foreach=False)
        saved = topt.state_dict()
        saved["state"] = {i: {"momentum_buffer": None} for i in range(len(list(model.parameters())))}
        opt.load_state_dict(copy.deepcopy(saved))
        topt.load_state_dict(saved)
        for k in range(3):
            for m, o in [(model, opt), (tmodel, topt)]:
                _amp_step(m, o, torch.amp.GradScaler("cpu", enabled=False), k)
        torch.testing.assert_close(list(model.parameters()), list(tmodel.parameters()), **TORCH_TOL)


# CUDA (run on a lent GPU; skipped here).

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("cls, options", [
    (fusedopt.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.1, l1_decay=0.01, grad_keep_prob=0.7)),
    (fusedopt.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, grad_keep_prob=0.7)),
], ids=["Adam", "SGD"])
def test_cuda_matches_cpu_bitwise(cls, options):
    gen = torch.Generator().manual_seed(0)
    cpu = _params([(5, 7), (4099,), (1,)], torch.float32, gen)
    dev = [p.detach().cuda().requires_grad_() for p in cpu]
    opts = [cls(cpu, grad_mask_seed=9, **options), cls(dev, grad_mask_seed=9, **options)]
    for _ in range(3):
        for p, q in zip(cpu, dev):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.cuda()
        for o in opts:
            o.step()
    for p, q in zip(cpu, dev):
        assert torch.equal(p, q.cpu())
        assert opts[1].state[q]["step"].device == q.device
        for key, value in opts[0].state[p].items():
            assert torch.equal(value, opts[1].state[q][key].cpu()), key


@pytest.mark.cuda
@cuda
def test_cuda_resumes_from_cpu_mapped_checkpoint():
    model = _model().cuda()
    opt = fusedopt.Adam(model.parameters(), lr=0.01)

    def train(m, o, steps):
        for k in steps:
            gen = torch.Generator().manual_seed(k)
            x, y = torch.randn(8, 4, generator=gen).cuda(), torch.randn(8, 2, generator=gen).cuda()
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            o.step()

    train(model, opt, range(2))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    expected = copy.deepcopy(model)
    expected_opt = fusedopt.Adam(expected.parameters(), lr=0.01)
    expected_opt.load_state_dict(opt.state_dict())
    train(expected, expected_opt, range(2, 4))
    resumed = fusedopt.Adam(model.parameters(), lr=0.01)
    resumed.load_state_dict(torch.load(buffer, map_location="cpu"))
    train(model, resumed, range(2, 4))
    for p, q in zip(model.parameters(), expected.parameters()):
        assert torch.equal(p, q)
        assert resumed.state[p]["step"].device == p.device and resumed.state[p]["step"].item() == 4


def test_no_masking_draws_no_random_number():
    torch.manual_seed(7)
    fusedopt.Adam(P())
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(torch.rand(3), after)


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW"])
def test_step_bumps_versions_like_torch(name):
    """Note [Optimizer ops under autograd]: a step bumps the parameters' version counters as torch.optim's
    in-place updates do, so autograd refuses a backward through a parameter stepped after the forward."""
    for make in (getattr(torch.optim, name), getattr(fusedopt, name)):
        w = torch.randn(4, 3, requires_grad=True)
        w.grad = torch.randn(4, 3)
        opt = make([w], lr=0.1)
        loss = (w * w).sum()  # saves w for backward
        v = w._version
        opt.step()
        assert w._version > v
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_op_under_grad_mode_refuses_params_that_require_grad():
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="call it under torch.no_grad"):
        torch.ops.fusedopt.sgd_([w], [torch.randn(3)], [], [torch.zeros(())], [0], lr=0.1)
    assert w.grad is None
