"""fusedopt.reference against torch.optim (foreach=False) and against the formulas of DESIGN.md §4 and §6."""
import copy
import itertools
import math

import numpy as np
import pytest
import torch

import fusedopt.reference as ref

TOL = dict(rtol=1e-12, atol=1e-14)
SHAPES = [(5, 7), (13,), (1,)]
STEPS = 4


def _configs():
    """(torch class, reference step, options) for every torch-compatible option combination."""
    common = [dict(maximize=mx, weight_decay=wd) for mx, wd in itertools.product([False, True], [0.0, 0.1])]
    for c, momentum, dampening, nesterov in itertools.product(common, [0.0, 0.9], [0.0, 0.3], [False, True]):
        if not nesterov or (momentum > 0 and dampening == 0):
            yield torch.optim.SGD, ref.sgd_step, dict(c, lr=0.05, momentum=momentum, dampening=dampening,
                                                      nesterov=nesterov)
    for c, lr_decay, init in itertools.product(common, [0.0, 0.01], [0.0, 0.5]):
        yield torch.optim.Adagrad, ref.adagrad_step, dict(c, lr=0.1, lr_decay=lr_decay,
                                                          initial_accumulator_value=init)
    for c, centered, momentum in itertools.product(common, [False, True], [0.0, 0.9]):
        yield torch.optim.RMSprop, ref.rmsprop_step, dict(c, lr=0.01, centered=centered, momentum=momentum)
    for c, amsgrad in itertools.product(common, [False, True]):
        yield torch.optim.Adam, ref.adam_step, dict(c, lr=0.01, amsgrad=amsgrad)
        yield torch.optim.AdamW, ref.adam_step, dict(c, lr=0.01, amsgrad=amsgrad, decoupled_weight_decay=True)


CONFIGS = list(_configs())


@pytest.mark.parametrize("torch_cls, step, options", CONFIGS,
                         ids=[c.__name__ + "-" + "-".join(f"{k}={v}" for k, v in o.items()) for c, _, o in CONFIGS])
def test_matches_torch(torch_cls, step, options):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    ours = [p.clone() for p in params]
    states = [{} for _ in ours]
    torch_options = {k: v for k, v in options.items() if k != "decoupled_weight_decay"}
    opt = torch_cls(params, foreach=False, **torch_options)
    for _ in range(STEPS):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for j, (p, g, state) in enumerate(zip(ours, grads, states)):
            step(p, g.clone(), state, index=j, **options)
    for p, q, state in zip(params, ours, states):
        torch.testing.assert_close(q, p, **TOL)
        assert state["step"] == STEPS
        torch_state = opt.state[p]
        assert set(state) - {"step"} == set(torch_state) - {"step"}
        for key, value in torch_state.items():
            if key == "step":
                assert value.item() == STEPS
            else:
                torch.testing.assert_close(state[key], value, **TOL)


# Philox and the keep mask (§6).

KNOWN_ANSWERS = [
    ((0, 0, 0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 6, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("inputs, expected", KNOWN_ANSWERS)
def test_philox_known_answers(inputs, expected):
    words = ref.philox4x32_10(*inputs)
    assert all(w.dtype == np.uint32 for w in words)
    assert tuple(int(w) for w in words) == expected


def test_philox_vectorised():
    columns = np.array([inputs for inputs, _ in KNOWN_ANSWERS], dtype=np.uint32).T
    words = np.stack(ref.philox4x32_10(*columns), axis=-1)
    np.testing.assert_array_equal(words, np.array([e for _, e in KNOWN_ANSWERS], dtype=np.uint32))


def test_keep_threshold():
    assert ref.keep_threshold(0.0) == 0
    assert ref.keep_threshold(0.5) == 2**31
    assert ref.keep_threshold(1.0) == 2**32
    assert ref.keep_threshold(1 - 2**-40) == 2**32
    assert ref.keep_threshold(0.1) == 429496730  # round(429496729.6)
    with pytest.raises(ValueError):
        ref.keep_threshold(1.5)


def test_keep_mask_layout():
    """Element i is word i & 3 of counter (i >> 2, 0, offset lo, offset hi) under key (seed lo, seed hi)."""
    seed, offset, n, r = 0x0123456789ABCDEF, 0xFEDCBA9876543210, 103, 0.5
    words = [ref.philox4x32_10(i >> 2, 0, offset & 0xFFFFFFFF, offset >> 32, seed & 0xFFFFFFFF, seed >> 32)[i & 3]
             for i in range(n)]
    expected = np.array([int(w) < 2**31 for w in words])
    np.testing.assert_array_equal(ref.keep_mask(seed, offset, n, r), expected)


@pytest.mark.parametrize("r", [0.1, 0.5, 0.9])
def test_keep_rate(r):
    n = 200_003
    kept = int(ref.keep_mask(1234, 5678, n, r).sum())
    assert abs(kept - n * r) <= 5 * math.sqrt(n * r * (1 - r))


def test_keep_all_and_none():
    assert ref.keep_mask(7, 9, 1001, 1.0).all()
    assert not ref.keep_mask(7, 9, 1001, 0.0).any()
    assert ref.keep_mask(7, 9, 0, 0.5).shape == (0,)


def test_keep_mask_seed_and_offset_words():
    a, b = ref.keep_mask(3, 0xFFFFFFFF, 256, 0.5), ref.keep_mask(3, 0x1_0000_0000, 256, 0.5)
    assert (a != b).any()  # the offset's high word reaches the counter
    assert (ref.keep_mask(1 << 32, 0, 256, 0.5) != ref.keep_mask(0, 0, 256, 0.5)).any()  # so does the seed's
    np.testing.assert_array_equal(ref.keep_mask(-1, 5, 256, 0.5), ref.keep_mask(2**64 - 1, 5, 256, 0.5))


# The preamble (§4) and the course's own forms.

def _rand(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_grad_mask_in_adam():
    r, seed, index, beta1 = 0.5, 99, 3, 0.9
    param, grad, m0 = _rand(6, 11, seed=1), _rand(6, 11, seed=2), _rand(6, 11, seed=3)
    state = {"step": 2, "exp_avg": m0.clone(), "exp_avg_sq": torch.ones(6, 11, dtype=torch.float64)}
    ref.adam_step(param, grad, state, betas=(beta1, 0.999), grad_keep_prob=r, grad_mask_seed=seed, index=index)
    keep = torch.from_numpy(ref.keep_mask(seed, 3 * 2**24 + index, grad.numel(), r)).reshape(grad.shape)
    assert keep.any() and not keep.all()
    torch.testing.assert_close(state["exp_avg"][~keep], beta1 * m0[~keep], **TOL)
    torch.testing.assert_close(state["exp_avg"][keep], beta1 * m0[keep] + (1 - beta1) * grad[keep] / r, **TOL)
    assert state["step"] == 3


def test_grad_mask_differs_per_step_and_index():
    def updates(index, step):
        p = torch.zeros(64, dtype=torch.float64)
        ref.sgd_step(p, torch.ones(64, dtype=torch.float64), {"step": step}, lr=1.0, grad_keep_prob=0.5,
                     index=index)
        return p
    assert not torch.equal(updates(0, 0), updates(1, 0))
    assert not torch.equal(updates(0, 0), updates(0, 1))


def test_decoupled_l1_prox_gives_exact_zeros():
    lr, l1, wd = 0.1, 2.0, 0.5
    param, grad = _rand(200, seed=4), _rand(200, seed=5)
    expected = param * (1 - lr * wd) - lr * grad
    expected = torch.sign(expected) * torch.clamp(expected.abs() - lr * l1, min=0)
    ref.sgd_step(param, grad, {}, lr=lr, weight_decay=wd, l1_decay=l1, decoupled_weight_decay=True)
    torch.testing.assert_close(param, expected, **TOL)
    assert (param == 0).sum() > 20


def test_coupled_l1_and_l2():
    lr, l1, wd = 0.1, 0.3, 0.5
    param, grad = _rand(50, seed=6), _rand(50, seed=7)
    param[:5] = 0  # sign(0) = 0
    expected = param - lr * (grad + wd * param + l1 * torch.sign(param))
    ref.sgd_step(param, grad, {}, lr=lr, weight_decay=wd, l1_decay=l1)
    torch.testing.assert_close(param, expected, **TOL)


def test_zero_decay_keeps_inf_params():
    param = torch.tensor([math.inf, -math.inf, 1.0], dtype=torch.float64)
    ref.adam_step(param, torch.ones(3, dtype=torch.float64), {}, decoupled_weight_decay=True)
    assert param[0] == math.inf and param[1] == -math.inf


@pytest.mark.parametrize("step", [ref.sgd_step, ref.adagrad_step, ref.rmsprop_step, ref.adam_step])
def test_found_inf_changes_nothing(step):
    kw = dict(lr=0.1, momentum=0.9) if step is ref.sgd_step else {}
    param, grad, state = _rand(9, seed=8), _rand(9, seed=9), {}
    step(param, grad, state, **kw)
    before = copy.deepcopy((param, grad, state))
    step(param, grad, state, grad_scale=1024.0, found_inf=1.0, weight_decay=0.1, **kw)
    torch.testing.assert_close((param, grad, state), before, rtol=0, atol=0)
    assert state["step"] == 1


def test_grad_scale_unscales_and_writes_back():
    scale = 512.0
    param, grad = _rand(9, seed=10), _rand(9, seed=11)
    twin, twin_state, state = param.clone(), {}, {}
    ref.adam_step(twin, grad.clone(), twin_state)
    scaled = grad * scale
    ref.adam_step(param, scaled, state, grad_scale=scale, found_inf=0.0)
    torch.testing.assert_close(scaled, grad, **TOL)
    torch.testing.assert_close(param, twin, **TOL)
    torch.testing.assert_close(state, twin_state, **TOL)


def test_ema_momentum_is_the_course_formula():
    beta, lr = 0.8, 0.1
    theta = _rand(10, seed=12)
    param, state = theta.clone(), {}
    grads = [_rand(10, seed=13 + k) for k in range(3)]
    for g in grads:
        ref.sgd_step(param, g, state, lr=lr, momentum=beta, ema_momentum=True)
    v1 = (1 - beta) * grads[0]  # V_0 = 0
    v2 = beta * v1 + (1 - beta) * grads[1]
    v3 = beta * v2 + (1 - beta) * grads[2]
    torch.testing.assert_close(param, theta - lr * (v1 + v2 + v3), **TOL)
    torch.testing.assert_close(state["momentum_buffer"], v3, **TOL)
    with pytest.raises(ValueError):
        ref.sgd_step(param, grads[0], state, lr=lr, momentum=beta, dampening=0.1, ema_momentum=True)


def test_eps_inside_sqrt_is_the_course_formula():
    lr, (b1, b2), eps = 0.01, (0.9, 0.999), 1e-3
    theta, g1, g2 = _rand(10, seed=20), _rand(10, seed=21), _rand(10, seed=22)
    param, state = theta.clone(), {}
    for g in (g1, g2):
        ref.adam_step(param, g, state, lr=lr, betas=(b1, b2), eps=eps, eps_inside_sqrt=True)
    m1, s1 = (1 - b1) * g1, (1 - b2) * g1**2
    m2, s2 = b1 * m1 + (1 - b1) * g2, b2 * s1 + (1 - b2) * g2**2
    theta1 = theta - lr * (m1 / (1 - b1)) / torch.sqrt(s1 / (1 - b2) + eps)
    theta2 = theta1 - lr * (m2 / (1 - b1**2)) / torch.sqrt(s2 / (1 - b2**2) + eps)
    torch.testing.assert_close(param, theta2, **TOL)
