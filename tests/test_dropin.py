"""fusedopt as a drop-in torch.optim: the same program with torch.optim.X (foreach=False) and fusedopt.X gives the
same parameters and behaviour: LR schedulers (also those that cycle momentum or betas) and their state_dicts, SWA,
hooks, changes to param_groups and to the state between steps, named parameters, odd gradients."""
import collections
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as S
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.optim.swa_utils import SWALR, AveragedModel

import fusedopt

TORCH = {fusedopt.SGD: torch.optim.SGD, fusedopt.Adagrad: torch.optim.Adagrad, fusedopt.RMSprop: torch.optim.RMSprop,
         fusedopt.Adam: torch.optim.Adam, fusedopt.AdamW: torch.optim.AdamW}
OPTIONS = {fusedopt.SGD: dict(lr=0.05, momentum=0.9), fusedopt.Adagrad: dict(lr=0.1),
           fusedopt.RMSprop: dict(lr=0.01, momentum=0.5, centered=True), fusedopt.Adam: dict(lr=0.01, amsgrad=True),
           fusedopt.AdamW: dict(lr=0.01)}
OPTIMIZERS = list(OPTIONS)
TOL = dict(rtol=1e-5, atol=1e-6)  # fp32 against torch.optim, as tests/test_optim.py


def _ids(classes):
    return [c.__name__ for c in classes]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def _loss(model, k):
    gen = torch.Generator().manual_seed(100 + k)
    x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)
    return nn.functional.mse_loss(model(x), y)


def _step(model, opt, k):
    opt.zero_grad()
    loss = _loss(model, k)
    loss.backward()
    opt.step()
    return loss.item()


def _make(cls, lib, params, **options):
    return (cls if lib == "fusedopt" else TORCH[cls])(params, foreach=False, **{**OPTIONS[cls], **options})


def _both(run):
    """run(lib) for torch.optim and fusedopt; returns the two results."""
    return run("torch"), run("fusedopt")


def _assert_same(theirs, ours):
    assert len(theirs) == len(ours)
    torch.testing.assert_close(ours, theirs, **TOL)


# LR schedulers and SWA.

SCHEDULERS = {
    "StepLR": lambda o, cls: S.StepLR(o, 2, 0.5),
    "MultiStepLR": lambda o, cls: S.MultiStepLR(o, [1, 3], 0.3),
    "ExponentialLR": lambda o, cls: S.ExponentialLR(o, 0.9),
    "CosineAnnealingLR": lambda o, cls: S.CosineAnnealingLR(o, 5),
    "CosineAnnealingWarmRestarts": lambda o, cls: S.CosineAnnealingWarmRestarts(o, 2, 2),
    "LambdaLR": lambda o, cls: S.LambdaLR(o, lambda e: 1 / (e + 1)),
    "LinearLR": lambda o, cls: S.LinearLR(o, 0.2, 1.0, 4),
    # cycle_momentum edits 'momentum' (SGD, RMSprop) or 'betas' (Adam, AdamW) in the param groups
    "OneCycleLR": lambda o, cls: S.OneCycleLR(o, 2 * OPTIONS[cls]["lr"], total_steps=20,
                                              cycle_momentum=cls is not fusedopt.Adagrad),
    "CyclicLR": lambda o, cls: S.CyclicLR(o, OPTIONS[cls]["lr"] / 10, 2 * OPTIONS[cls]["lr"], step_size_up=3,
                                          cycle_momentum=cls is not fusedopt.Adagrad),
    "ReduceLROnPlateau": lambda o, cls: S.ReduceLROnPlateau(o, patience=0, factor=0.5),
    "SequentialLR": lambda o, cls: S.SequentialLR(o, [S.LinearLR(o, 0.2, 1.0, 2), S.ExponentialLR(o, 0.8)], [2]),
    "ChainedScheduler": lambda o, cls: S.ChainedScheduler([S.LinearLR(o, 0.2, 1.0, 2), S.ExponentialLR(o, 0.8)]),
    "SWALR": lambda o, cls: SWALR(o, swa_lr=OPTIONS[cls]["lr"] / 2, anneal_epochs=3),
}


def _scheduled(cls, name, lib, epochs=6, resume_at=None):
    """Trains with the scheduler, two steps an epoch; at epoch resume_at, model, optimizer, scheduler and the
    averaged model are rebuilt (with other values) and loaded from their state_dicts. Returns the parameters,
    the averaged parameters and the schedule of the first group's (lr, momentum, betas) with the warnings."""
    model = _model()
    opt = _make(cls, lib, model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sched, swa = SCHEDULERS[name](opt, cls), AveragedModel(model)
        schedule = []
        for epoch in range(epochs):
            if epoch == resume_at:
                saved = copy.deepcopy([model.state_dict(), opt.state_dict(), sched.state_dict(), swa.state_dict()])
                model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
                opt = _make(cls, lib, model.parameters(), lr=0.5)
                sched, swa = SCHEDULERS[name](opt, cls), AveragedModel(model)
                for obj, state in zip([model, opt, sched, swa], saved):
                    obj.load_state_dict(state)
            loss = [_step(model, opt, 2 * epoch + k) for k in range(2)][-1]
            sched.step(loss) if name == "ReduceLROnPlateau" else sched.step()
            swa.update_parameters(model)
            group = opt.param_groups[0]
            schedule.append((group["lr"], group.get("momentum"), group.get("betas")))
    return [*model.parameters(), *swa.parameters()], schedule, [str(w.message) for w in caught]


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=_ids(OPTIMIZERS))
def test_lr_schedulers_match_torch(cls, name):
    theirs, ours = _both(lambda lib: _scheduled(cls, name, lib))
    assert ours[1] == theirs[1] and ours[2] == theirs[2]  # the same schedule, no warning of ours
    _assert_same(theirs[0], ours[0])


@pytest.mark.parametrize("name", ["OneCycleLR", "SequentialLR", "ReduceLROnPlateau", "CyclicLR"])
@pytest.mark.parametrize("cls", [fusedopt.SGD, fusedopt.AdamW], ids=["SGD", "AdamW"])
def test_resumed_schedule_is_bitwise_the_uninterrupted_one(cls, name):
    params, schedule, _ = _scheduled(cls, name, "fusedopt")
    resumed, resumed_schedule, _ = _scheduled(cls, name, "fusedopt", resume_at=3)
    assert resumed_schedule == schedule
    assert all(torch.equal(p, q) for p, q in zip(params, resumed))


# Hooks.

def _hooked(cls, lib):
    log = []
    model = _model()
    opt = _make(cls, lib, model.parameters())

    def renamed(_, sd):  # a checkpoint of another format, adapted by a pre-hook (torch checks it afterwards)
        sd = copy.deepcopy(sd)
        for state in sd["state"].values():
            for key in [k for k in state if k.startswith("old_")]:
                state[key[4:]] = state.pop(key)
        return sd

    handles = [
        opt.register_step_pre_hook(lambda o, args, kwargs: log.append(("pre", len(args), sorted(kwargs)))),
        opt.register_step_post_hook(lambda o, args, kwargs: log.append(("post", len(o.param_groups)))),
        opt.register_state_dict_pre_hook(lambda o: log.append("state_dict pre")),
        opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1}),
        opt.register_load_state_dict_pre_hook(lambda o, sd: log.append(("load pre", sorted(sd)))),
        opt.register_load_state_dict_pre_hook(renamed),
        opt.register_load_state_dict_post_hook(lambda o: log.append("load post")),
        register_optimizer_step_pre_hook(lambda o, args, kwargs: log.append(("global pre", type(o).__name__))),
        register_optimizer_step_post_hook(lambda o, args, kwargs: log.append("global post")),
    ]
    try:
        _step(model, opt, 0)
        saved = copy.deepcopy(opt.state_dict())
        log.append(sorted(saved))
        for state in saved["state"].values():
            key = next(k for k in state if k != "step")
            state["old_" + key] = state.pop(key)
        opt.load_state_dict(saved)
        opt.step(closure=lambda: _loss(model, 1))
    finally:
        for handle in handles:
            handle.remove()
    _step(model, opt, 2)  # no hook left
    return list(model.parameters()), log


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=_ids(OPTIMIZERS))
def test_hooks_as_torch(cls):
    theirs, ours = _both(lambda lib: _hooked(cls, lib))
    assert ours[1] == theirs[1]
    _assert_same(theirs[0], ours[0])


def test_load_state_dict_pre_hook_may_fit_the_groups():
    """A pre-hook fits a checkpoint of one group to an optimizer of two (what torch's docs suggest pre-hooks for);
    fusedopt checks the state_dict as the hooks leave it."""
    def split(_, sd):
        group = sd["param_groups"][0]
        halves = group["params"][:2], group["params"][2:]
        return {**sd, "param_groups": [dict(group, params=half) for half in halves]}

    def run(lib):
        model = _model()
        opt = _make(fusedopt.Adam, lib, model.parameters())
        for k in range(2):
            _step(model, opt, k)
        saved = copy.deepcopy(opt.state_dict())
        opt = _make(fusedopt.Adam, lib, [dict(params=list(model[0].parameters())),
                                         dict(params=list(model[2].parameters()), lr=0.5)])
        opt.register_load_state_dict_pre_hook(split)
        opt.load_state_dict(saved)
        for k in range(2, 4):
            _step(model, opt, k)
        return list(model.parameters()) + [torch.tensor(g["lr"]) for g in opt.param_groups]

    _assert_same(*_both(run))


# The state and the param groups changed between steps.

def _reset_all(opt):
    opt.state = collections.defaultdict(dict)


def _replace_buffers(opt):
    for state in opt.state.values():
        for key in [k for k in state if k != "step"]:
            state[key] = torch.zeros_like(state[key])


STATE_CHANGES = {
    "state = defaultdict(dict)": _reset_all,
    "state.clear()": lambda opt: opt.state.clear(),
    "del state[p]": lambda opt: opt.state.pop(opt.param_groups[0]["params"][0]),
    "state[p] = {}": lambda opt: opt.state.__setitem__(opt.param_groups[0]["params"][2], {}),
    "state[p][buffer] = zeros": _replace_buffers,
    "state[p]['step'] = tensor": lambda opt: [s.__setitem__("step", torch.tensor(10.0)) for s in opt.state.values()],
}


@pytest.mark.parametrize("change", list(STATE_CHANGES))
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=_ids(OPTIMIZERS))
def test_state_changed_between_steps_is_used(cls, change):
    """A reset of the optimizer (or of some parameters' state) between steps takes effect, as in torch: the next
    step does not go on with the tensors it used before."""
    def run(lib):
        model = _model()
        opt = _make(cls, lib, model.parameters())
        for k in range(5):
            _step(model, opt, k)
            if k == 1:
                STATE_CHANGES[change](opt)
        return list(model.parameters())

    _assert_same(*_both(run))


EDITS = {
    fusedopt.SGD: [("momentum", 0.5), ("momentum", 0.0), ("dampening", 0.3), ("nesterov", True), ("weight_decay", 0.1),
                   ("maximize", True)],
    fusedopt.Adagrad: [("lr_decay", 0.1), ("eps", 1e-3), ("weight_decay", 0.1)],
    fusedopt.RMSprop: [("alpha", 0.9), ("momentum", 0.0), ("centered", False), ("eps", 1e-3), ("weight_decay", 0.1)],
    fusedopt.Adam: [("betas", (0.5, 0.9)), ("eps", 1e-3), ("weight_decay", 0.1), ("maximize", True)],
    fusedopt.AdamW: [("betas", (0.5, 0.9)), ("eps", 1e-3), ("weight_decay", 0.1), ("lr", torch.tensor(0.003))],
}
EDIT_CASES = [(cls, key, value) for cls, edits in EDITS.items() for key, value in edits]


@pytest.mark.parametrize("cls, key, value", EDIT_CASES, ids=[f"{c.__name__}-{k}" for c, k, _ in EDIT_CASES])
def test_hyperparameter_edited_between_steps(cls, key, value):
    def run(lib):
        model = _model()
        opt = _make(cls, lib, model.parameters())
        for k in range(4):
            _step(model, opt, k)
            if k == 1:
                for group in opt.param_groups:
                    group[key] = value
        return list(model.parameters())

    _assert_same(*_both(run))


PARAM_SWAPS = {
    "params[0] = other": lambda group, other: group["params"].__setitem__(0, other[0]),
    "params = others": lambda group, other: group.__setitem__("params", other),
}


@pytest.mark.parametrize("swap", list(PARAM_SWAPS))
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=_ids(OPTIMIZERS))
def test_parameters_swapped_between_steps(cls, swap):
    """A group's parameters replaced between steps (with the same gradient pattern): the next step updates the
    new ones, as torch's does, not those it stepped before."""
    def run(lib):
        model, other = _model(), nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
        with torch.no_grad():
            for p in other.parameters():
                p.mul_(0.5)
        opt = _make(cls, lib, model.parameters())
        for k in range(2):
            _step(model, opt, k)
        PARAM_SWAPS[swap](opt.param_groups[0], list(other.parameters()))
        for k in range(2, 4):
            _step(other, opt, k)
        return list(model.parameters()) + list(other.parameters())

    _assert_same(*_both(run))


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=_ids(OPTIMIZERS))
def test_add_param_group_after_steps(cls):
    def run(lib):
        model = _model()
        opt = _make(cls, lib, model[0].parameters())
        for k in range(2):
            _step(model, opt, k)
        opt.add_param_group(dict(params=model[2].parameters(), lr=OPTIONS[cls]["lr"] / 2))
        for k in range(2, 5):
            _step(model, opt, k)
        return list(model.parameters())

    _assert_same(*_both(run))


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=_ids(OPTIMIZERS))
def test_named_parameters(cls):
    """torch 2.13 takes (name, parameter) pairs and keeps 'param_names' in the groups and the state_dict; a
    fusedopt state_dict loads into torch.optim and continues there."""
    def run(lib):
        model = _model()
        opt = _make(cls, lib, [dict(params=list(model[0].named_parameters())),
                               dict(params=list(model[2].named_parameters()), lr=0.003)])
        for k in range(2):
            _step(model, opt, k)
        saved = copy.deepcopy(opt.state_dict())
        after = _make(cls, "torch", [dict(params=list(model[0].named_parameters())),
                                     dict(params=list(model[2].named_parameters()))])
        after.load_state_dict(saved)
        for k in range(2, 4):
            _step(model, after, k)
        return list(model.parameters()), [g["param_names"] for g in saved["param_groups"]]

    theirs, ours = _both(run)
    assert ours[1] == theirs[1] == [["weight", "bias"]] * 2
    _assert_same(theirs[0], ours[0])


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=_ids(OPTIMIZERS))
def test_generator_frozen_and_clipped(cls):
    """Parameters as a generator, one of them frozen, an empty group, clip_grad_norm_, zero_grad(set_to_none=False)."""
    def run(lib):
        model = _model()
        model[0].bias.requires_grad_(False)
        opt = _make(cls, lib, [dict(params=(p for p in model.parameters())), dict(params=[])])
        for k in range(3):
            opt.zero_grad(set_to_none=False)
            _loss(model, k).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            opt.step()
        return list(model.parameters())

    _assert_same(*_both(run))


# Odd gradients and parameter lists.

@pytest.mark.parametrize("cls", OPTIMIZERS, ids=_ids(OPTIMIZERS))
def test_strided_and_expanded_grads(cls):
    """Gradients that are transposed, sliced or expanded (stride 0, which cannot be written to) are read as
    torch reads them and left as they were; strided parameters too."""
    def run(lib):
        torch.manual_seed(0)
        params = [torch.randn(5, 4).t().requires_grad_(), torch.randn(12, 5)[::2].requires_grad_(),
                  torch.randn(2, 3, 3, 3).to(memory_format=torch.channels_last).requires_grad_()]
        opt = _make(cls, lib, params, weight_decay=0.1)
        grads = []
        for k in range(3):
            gen = torch.Generator().manual_seed(k)
            params[0].grad = torch.randn(5, 4, generator=gen).t()
            params[1].grad = torch.randn(6, 10, generator=gen)[:, ::2]
            params[2].grad = torch.full((1,), 0.5 + k).expand(params[2].shape)
            grads += [p.grad.clone() for p in params]
            opt.step()
            grads += [p.grad for p in params]
        return params + grads

    _assert_same(*_both(run))


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=_ids(OPTIMIZERS))
def test_duplicate_parameters_are_refused(cls):
    """Twice in one group: torch warns (and steps the parameter twice), fusedopt refuses it when the group is
    added; in two groups both refuse it alike."""
    p, q = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    with pytest.warns(UserWarning, match="duplicate"), pytest.raises(ValueError, match="more than once"):
        cls([p, q, p], lr=0.1)
    opt = cls([p], lr=0.1)
    with pytest.warns(UserWarning, match="duplicate"), pytest.raises(ValueError, match="more than once"):
        opt.add_param_group(dict(params=[q, q]))
    assert len(opt.param_groups) == 1
    for lib in (TORCH[cls], cls):
        with pytest.raises(ValueError, match="more than one parameter group"):
            lib([dict(params=[p, q]), dict(params=[q])], lr=0.1)
