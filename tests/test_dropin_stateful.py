"""A random training script run twice, with torch.optim (foreach=False) and with fusedopt: hypothesis draws a
sequence of steps and of the edits scripts make between steps (hyper-parameters, param groups added, params
replaced or given new storage, state deleted, replaced or loaded, grads None, strided or expanded, steps
under a GradScaler with and without inf grads), and after every step the parameters, the state and the scale
of the two runs must agree. It probes what fusedopt caches between steps (Note [Step plans] in
fusedopt/optim/_base.py), which the fixed scenarios of tests/test_dropin.py cover one at a time."""
import collections
import copy

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

import fusedopt

TORCH = {fusedopt.SGD: torch.optim.SGD, fusedopt.Adagrad: torch.optim.Adagrad, fusedopt.RMSprop: torch.optim.RMSprop,
         fusedopt.Adam: torch.optim.Adam, fusedopt.AdamW: torch.optim.AdamW}
CONFIGS = [
    (fusedopt.SGD, dict(lr=0.05)),
    (fusedopt.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    (fusedopt.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)),
    (fusedopt.Adagrad, dict(lr=0.1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1)),
    (fusedopt.RMSprop, dict(lr=0.01, weight_decay=0.01)),
    (fusedopt.RMSprop, dict(lr=0.01, momentum=0.5, centered=True)),
    (fusedopt.Adam, dict(lr=0.01)),
    (fusedopt.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.01, maximize=True)),
    (fusedopt.AdamW, dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
]
SHAPES = [(1,), (3,), (4, 5), (7, 1), (2, 3, 4)]
HYPER = {"lr": [0.0, 0.003, 0.02], "weight_decay": [0.0, 0.05]}
LIBS = ("torch", "fusedopt")
TOL = dict(rtol=1e-5, atol=1e-6)  # fp32 against torch.optim, as tests/test_dropin.py


class Twins(RuleBasedStateMachine):
    """One optimizer per library over equal parameters; every rule does the same to both."""

    @initialize(config=st.integers(0, len(CONFIGS) - 1), shapes=st.lists(st.sampled_from(SHAPES), min_size=1,
                                                                         max_size=4), split=st.booleans())
    def setup(self, config, shapes, split):
        self.cls, self.options = CONFIGS[config]
        self.gen = torch.Generator().manual_seed(config)
        values = [self._randn(s) for s in shapes]
        self.opt = {}
        for lib in LIBS:
            params = [v.clone().requires_grad_() for v in values]
            groups = [dict(params=params)]
            if split and len(params) > 1:  # a second group with its own lr
                groups = [dict(params=params[:1]), dict(params=params[1:], lr=self.options["lr"] / 2)]
            cls = TORCH[self.cls] if lib == "torch" else self.cls
            self.opt[lib] = cls(groups, **self.options, **({"foreach": False} if lib == "torch" else {}))
        self.scaler = {lib: torch.amp.GradScaler("cpu", init_scale=16.0, growth_interval=2) for lib in LIBS}
        for scaler in self.scaler.values():
            scaler.scale(torch.ones(()))  # (it makes its scale tensor on first use)

    def _randn(self, shape):
        return torch.randn(shape, generator=self.gen)

    def _params(self, lib):
        return [p for g in self.opt[lib].param_groups for p in g["params"]]

    @rule(data=st.data(), amp=st.sampled_from(["off", "scaler", "unscale_ first"]), inf=st.booleans())
    def step(self, data, amp, inf):
        """A step, or under a GradScaler (the grads scaled; an inf in one of them with `inf`): torch's for-loop
        step is unscaled by the scaler, fusedopt's gets grad_scale and found_inf (_step_supports_amp_scaling)."""
        kinds = data.draw(st.lists(st.sampled_from(["none", "dense", "strided", "expanded"]),
                                   min_size=len(self._params("torch")), max_size=len(self._params("torch"))))
        if amp != "off" and set(kinds) == {"none"}:
            kinds[0] = "dense"  # a scaler's step wants a grad to check
        scale = 1.0 if amp == "off" else self.scaler["torch"].get_scale()  # a power of 2: exact
        for p_theirs, p_ours, kind in zip(self._params("torch"), self._params("fusedopt"), kinds):
            if kind == "expanded" and amp != "off":  # unscaling writes into the grad, as torch's scaler does
                kind = "dense"
            shape, dims = p_theirs.shape, tuple(reversed(range(p_theirs.dim())))
            base = {"none": None, "dense": shape, "strided": tuple(reversed(shape)),
                    "expanded": (1,) * len(shape)}[kind]
            base = None if base is None else self._randn(base) * scale
            if base is not None and inf and amp != "off":
                base.view(-1)[0], inf = float("inf"), False
            for p in (p_theirs, p_ours):  # each run its own copy, of the same values and strides
                p.grad = (None if base is None else base.clone() if kind == "dense" else
                          base.clone().permute(*dims) if kind == "strided" else base.clone().expand(shape))
        for lib in LIBS:
            if amp == "off":
                self.opt[lib].step()
                continue
            if amp == "unscale_ first":
                self.scaler[lib].unscale_(self.opt[lib])
            self.scaler[lib].step(self.opt[lib])
            self.scaler[lib].update()

    @rule(set_to_none=st.booleans())
    def zero_grad(self, set_to_none):
        for lib in LIBS:
            self.opt[lib].zero_grad(set_to_none=set_to_none)

    @rule(data=st.data(), key=st.sampled_from(sorted(HYPER)))
    def set_hyper(self, data, key):
        gi = data.draw(st.integers(0, len(self.opt["torch"].param_groups) - 1))
        value = data.draw(st.sampled_from(HYPER[key]))
        for lib in LIBS:
            self.opt[lib].param_groups[gi][key] = value

    @rule(shape=st.sampled_from(SHAPES))
    def add_param_group(self, shape):
        value = self._randn(shape)
        for lib in LIBS:
            self.opt[lib].add_param_group(dict(params=[value.clone().requires_grad_()]))

    @rule(data=st.data(), how=st.sampled_from(["new parameter", "new storage", "new dtype and back"]))
    def replace_param(self, data, how):
        gi = data.draw(st.integers(0, len(self.opt["torch"].param_groups) - 1))
        j = data.draw(st.integers(0, len(self.opt["torch"].param_groups[gi]["params"]) - 1))
        for lib in LIBS:
            params = self.opt[lib].param_groups[gi]["params"]
            if how == "new parameter":  # its state, if any, stays with the old one
                params[j] = params[j].detach().clone().requires_grad_()
            elif how == "new storage":  # p.data = ..., as module.to() does
                params[j].data = params[j].data.clone()
            else:
                params[j].data = params[j].data.double().float()

    @rule(data=st.data())
    def del_state(self, data):
        j = data.draw(st.integers(0, len(self._params("torch")) - 1))
        for lib in LIBS:
            self.opt[lib].state.pop(self._params(lib)[j], None)

    @rule()
    def reset_state(self):
        for lib in LIBS:
            self.opt[lib].state = collections.defaultdict(dict)

    @rule(data=st.data())
    def replace_buffer(self, data):
        """A state tensor replaced by an equal new one, as a script that casts or moves state does."""
        j = data.draw(st.integers(0, len(self._params("torch")) - 1))
        for lib in LIBS:
            state = self.opt[lib].state.get(self._params(lib)[j], {})
            for key in sorted(state):
                if key != "step":
                    state[key] = state[key].clone()

    @precondition(lambda self: set(self.opt["torch"].state) <= set(self._params("torch")))  # else torch's raises
    @rule()
    def load_torch_state(self):
        """fusedopt continues from torch's state_dict: the runs then hold the same state."""
        # A copy, as from a checkpoint: load_state_dict keeps tensors that fit as they are (torch's does too), so
        # the live state_dict would share them between the runs.
        self.opt["fusedopt"].load_state_dict(copy.deepcopy(self.opt["torch"].state_dict()))

    @invariant()
    def same_params_and_state(self):
        if not hasattr(self, "opt"):
            return
        assert self.scaler["fusedopt"].get_scale() == self.scaler["torch"].get_scale()
        theirs, ours = self._params("torch"), self._params("fusedopt")
        torch.testing.assert_close(ours, theirs, **TOL)
        for p_theirs, p_ours in zip(theirs, ours):
            s_theirs, s_ours = self.opt["torch"].state.get(p_theirs, {}), self.opt["fusedopt"].state.get(p_ours, {})
            if not s_theirs and float(s_ours.get("step", 0)) == 0:
                continue  # made for a step a GradScaler skipped, as torch's fused optimizers make it: fresh state
            # fusedopt's SGD also counts steps (Note [Step tensors]), unless it loaded torch's state, which has none
            assert set(s_ours) - ({"step"} if self.cls is fusedopt.SGD else set()) == set(s_theirs)
            for key in s_theirs:
                torch.testing.assert_close(s_ours[key], s_theirs[key], **TOL)


def test_random_scripts_match_torch():
    run_state_machine_as_test(Twins, settings=settings(max_examples=150, stateful_step_count=25, deadline=None,
                                                       database=None, derandomize=True,
                                                       suppress_health_check=list(HealthCheck)))
