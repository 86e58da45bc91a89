"""Checkpoints: a run saved with torch.save and resumed in a fresh Python process continues bitwise as the
uninterrupted run (every optimizer, gradient masking, fusedopt.nn.Dropout); a state_dict that does not fit
the optimizer is refused with a clear error before anything changes (Note [Checked state_dict])."""
import copy
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fusedopt
import fusedopt.nn

ROOT = Path(__file__).resolve().parent.parent
MASK = dict(grad_keep_prob=0.7)
CASES = {
    "SGD-momentum": (fusedopt.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    "Adagrad": (fusedopt.Adagrad, dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1)),
    "RMSprop-centered-momentum": (fusedopt.RMSprop, dict(lr=0.01, momentum=0.9, centered=True)),
    "Adam-amsgrad": (fusedopt.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.01, l1_decay=0.001)),
    "AdamW": (fusedopt.AdamW, dict(lr=0.01, weight_decay=0.05)),
}
FIRST, THEN = 4, 5  # steps before the checkpoint, steps after it


def make(case):
    """The model (with fusedopt.nn.Dropout) and its optimizer, two groups; the mask seed is drawn from torch's
    default generator, as by default."""
    cls, options = CASES[case]
    model = nn.Sequential(nn.Linear(6, 32), fusedopt.nn.Dropout(0.3), nn.Tanh(), nn.Linear(32, 3))
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    groups = [dict(params=weights), dict(params=biases, lr=options["lr"] / 2)]
    return model, cls(groups, **options, **MASK)


def train(model, opt, steps):
    """Data from a generator per step; the dropout masks from torch's default generator."""
    model.train()
    for k in steps:
        gen = torch.Generator().manual_seed(1000 + k)
        x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def resume(folder):
    """Run by the fresh process, for every case: build anew (drawing another mask seed), load, continue, save."""
    torch.set_num_threads(int(os.environ["CHECKPOINT_THREADS"]))
    for case in CASES:
        torch.manual_seed(12345)  # the checkpoint, not this, must decide everything
        model, opt = make(case)
        saved = torch.load(Path(folder) / f"{case}.pt")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])
        train(model, opt, range(FIRST, FIRST + THEN))
        torch.save(dict(model=model.state_dict(), optimizer=opt.state_dict(), fusedopt=fusedopt.__file__),
                   Path(folder) / f"{case}.resumed.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """case -> (the uninterrupted run's model and optimizer state_dicts, what the fresh process saved). One
    fresh process resumes every case (a Python start is most of the time)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    uninterrupted = {}
    for case in CASES:
        torch.manual_seed(0)
        model, opt = make(case)
        train(model, opt, range(FIRST))
        torch.save(dict(model=model.state_dict(), optimizer=opt.state_dict(), rng=torch.get_rng_state()),
                   folder / f"{case}.pt")
        train(model, opt, range(FIRST, FIRST + THEN))
        uninterrupted[case] = (model.state_dict(), opt.state_dict())
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import test_checkpoint as t; " \
           f"t.resume({str(folder)!r})"
    # The child imports the fusedopt this process tests, whatever is installed.
    package_root = str(Path(fusedopt.__file__).resolve().parent.parent)
    env = dict(os.environ, CHECKPOINT_THREADS=str(torch.get_num_threads()),
               PYTHONPATH=os.pathsep.join([package_root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return {case: (*uninterrupted[case], torch.load(folder / f"{case}.resumed.pt")) for case in CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_in_a_fresh_process_is_bitwise(case, runs):
    model, expected, resumed = runs[case]
    assert resumed["fusedopt"] == fusedopt.__file__
    for key, value in model.items():
        assert torch.equal(resumed["model"][key], value), key
    got = resumed["optimizer"]
    assert expected["param_groups"] == got["param_groups"]  # lr, mask seed, ...: from the checkpoint
    assert expected["state"].keys() == got["state"].keys()
    for i, state in expected["state"].items():
        assert state.keys() == got["state"][i].keys()
        for key, value in state.items():
            assert value.dtype == got["state"][i][key].dtype and torch.equal(value, got["state"][i][key]), (i, key)
        assert state["step"].item() == FIRST + THEN


def test_resumed_masks_depend_on_the_checkpoint():
    """The comparison above can fail: resuming with the mask seed the fresh optimizer drew gives other
    parameters."""
    torch.manual_seed(0)
    model, opt = make("AdamW")
    train(model, opt, range(FIRST))
    saved = copy.deepcopy(dict(model=model.state_dict(), optimizer=opt.state_dict(), rng=torch.get_rng_state()))
    train(model, opt, range(FIRST, FIRST + THEN))
    other, other_opt = make("AdamW")
    other.load_state_dict(saved["model"])
    seed = other_opt.param_groups[0]["grad_mask_seed"]
    assert seed != saved["optimizer"]["param_groups"][0]["grad_mask_seed"]
    other_opt.load_state_dict(saved["optimizer"])
    for group in other_opt.param_groups:
        group["grad_mask_seed"] = seed
    torch.set_rng_state(saved["rng"])
    train(other, other_opt, range(FIRST, FIRST + THEN))
    assert not torch.equal(other[0].weight, model[0].weight)


# Mismatched state_dicts.

def _trained(case, seed):
    torch.manual_seed(seed)
    model, opt = make(case)
    train(model, opt, range(2))
    return opt


@functools.cache
def _saved(case):
    """A state_dict of the case after two steps (deep-copy before changing it)."""
    return _trained(case, 0).state_dict()


def _snapshot(opt):
    return copy.deepcopy(([p.detach().clone() for g in opt.param_groups for p in g["params"]],
                          {id(p): s for p, s in opt.state.items()},
                          [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]))


def _assert_unchanged(opt, before):
    params, state, groups = before
    now = [p for g in opt.param_groups for p in g["params"]]
    assert all(torch.equal(p, q) for p, q in zip(now, params))
    assert {id(p) for p in opt.state} == set(state)
    for p, s in opt.state.items():
        assert s.keys() == state[id(p)].keys()
        assert all(torch.equal(v, state[id(p)][k]) for k, v in s.items())
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups


def _first_buffer(case):
    return {"SGD-momentum": "momentum_buffer", "Adagrad": "sum", "RMSprop-centered-momentum": "grad_avg",
            "Adam-amsgrad": "max_exp_avg_sq", "AdamW": "exp_avg_sq"}[case]


def _corruptions(case):
    """(what, change to a saved state_dict, message)."""
    key = _first_buffer(case)

    def state(i):
        return lambda sd: sd["state"][i]

    def setitem(i, k, make_value):
        return lambda sd: sd["state"][i].__setitem__(k, make_value(sd["state"][i]))

    return [
        ("shape", setitem(0, key, lambda s: torch.zeros(s[key].shape[0] + 1, s[key].shape[1])), "shape"),
        ("transposed", setitem(0, key, lambda s: s[key].t().contiguous()), "shape"),
        ("fewer rows", setitem(1, key, lambda s: s[key][:-1].clone()), "shape"),
        ("missing buffer", lambda sd: state(1)(sd).pop(key), "lacks"),
        ("int buffer", setitem(0, key, lambda s: s[key].to(torch.int64)), "dtype"),
        ("complex buffer", setitem(0, key, lambda s: s[key].to(torch.complex64)), "dtype"),
        ("not a tensor", setitem(0, key, lambda s: s[key].tolist()), "must be a tensor"),
        ("unknown key", setitem(0, "exp_avg_sqq", lambda s: s[key].clone()), "does not keep"),
        ("fractional step", setitem(0, "step", lambda s: torch.tensor(2.5)), "whole number"),
        ("negative step", setitem(0, "step", lambda s: -1.0), "whole number"),
        ("int step tensor", setitem(0, "step", lambda s: torch.tensor(2)), "float32/float64"),
        ("two-element step", setitem(0, "step", lambda s: torch.tensor([2.0, 2.0])), "one-element"),
        ("state of no parameter", lambda sd: sd["state"].__setitem__(99, dict(sd["state"][0])), "none of its"),
        ("fewer groups", lambda sd: sd["param_groups"].pop(), "parameter groups"),
        ("more groups", lambda sd: sd["param_groups"].append(copy.deepcopy(sd["param_groups"][1])),
         "parameter groups"),
        ("fewer params", lambda sd: sd["param_groups"][0]["params"].pop(), "has 1 parameters"),
        ("more params", lambda sd: sd["param_groups"][1]["params"].append(7), "has 3 parameters"),
        ("no state", lambda sd: sd.pop("state"), "'state' and 'param_groups'"),
    ] + ([("missing step", lambda sd: state(0)(sd).pop("step"), "lacks")] if case != "SGD-momentum" else [])


CORRUPTIONS = [(case, *c) for case in CASES for c in _corruptions(case)]


@pytest.mark.parametrize("case, what, change, match", CORRUPTIONS, ids=[f"{c[0]}-{c[1]}" for c in CORRUPTIONS])
def test_mismatched_state_dict_is_refused_before_any_change(case, what, change, match):
    good = copy.deepcopy(_saved(case))
    bad = copy.deepcopy(good)
    change(bad)
    opt = _trained(case, 1)
    opt.param_groups[0]["lr"] = 0.123  # a group option that a successful load would overwrite
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    _assert_unchanged(opt, before)
    opt.load_state_dict(good)  # and the good one still loads
    assert opt.param_groups[0]["lr"] == good["param_groups"][0]["lr"]


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_of_another_optimizer_is_refused(case):
    other = "Adagrad" if case != "Adagrad" else "AdamW"
    opt = _trained(case, 1)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match="does not keep|lacks"):
        opt.load_state_dict(copy.deepcopy(_saved(other)))
    _assert_unchanged(opt, before)


def test_torch_checkpoints_still_load():
    """What torch's own optimizers save passes the checks: SGD without a step, RMSprop without grad_avg when
    not centered, a float64 buffer (cast, as torch casts), an empty state."""
    p = nn.Parameter(torch.randn(4, 3))
    for torch_cls, cls, options in [(torch.optim.SGD, fusedopt.SGD, dict(lr=0.1, momentum=0.9)),
                                    (torch.optim.RMSprop, fusedopt.RMSprop, dict(lr=0.1, momentum=0.5)),
                                    (torch.optim.Adam, fusedopt.Adam, dict(lr=0.1))]:
        topt = torch_cls([p], **options)
        p.grad = torch.randn(4, 3)
        topt.step()
        saved = topt.state_dict()
        opt = cls([p], **options)
        opt.load_state_dict(saved)
        for key, value in saved["state"][0].items():
            assert torch.equal(opt.state[p][key], value)
        doubled = copy.deepcopy(saved)
        for key in doubled["state"][0]:
            if key != "step":
                doubled["state"][0][key] = doubled["state"][0][key].double()
        opt.load_state_dict(doubled)
        assert all(v.dtype == torch.float32 for k, v in opt.state[p].items() if k != "step")
        opt.load_state_dict({**saved, "state": {0: {}}})
        assert not opt.state[p]


def test_error_messages_name_the_parameter_and_key():
    saved = copy.deepcopy(_saved("Adam-amsgrad"))
    saved["state"][2]["exp_avg"] = torch.zeros(5)
    with pytest.raises(ValueError) as err:
        _trained("Adam-amsgrad", 1).load_state_dict(saved)
    assert str(err.value) == ("Adam.load_state_dict: state 'exp_avg' of parameter 2 has shape (5,), the parameter "
                              "(32,)")
