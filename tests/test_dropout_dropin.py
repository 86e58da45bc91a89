"""fusedopt.nn.Dropout / functional.dropout / bias_dropout_add as drop-ins for torch's: the module API (isinstance,
state_dict, copies, p), input kinds and autograd contexts, torch.func transforms (grad, jvp, vmap and its randomness
flag, also under torch.compile), forward-mode AD, torch.fx, TorchScript, torch.export and activation checkpointing.
The masks differ from torch's by design; each test compares semantics, or our results with themselves."""
import copy
import io
import pickle

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap
from torch.utils.checkpoint import checkpoint

import fusedopt.nn as fnn
import fusedopt.nn.functional as F

RANDOMNESS_ERROR = "called random operation while in randomness error mode"


def mask(shape, p, seed, dtype=torch.float32):
    """keep / (1 - p) or 0 per element: what dropout(ones, p, seed=seed) multiplies by."""
    return F.dropout(torch.ones(shape, dtype=dtype), p, seed=seed)


# ---------------------------------------------------------------------------------------------------------------
# The module.

def test_module_is_a_torch_dropout_with_no_state():
    d, t = fnn.Dropout(0.3, inplace=True), nn.Dropout(0.3, inplace=True)
    assert isinstance(d, nn.Dropout)  # code that finds dropouts by type (MC dropout, setting p) finds ours
    assert (repr(d), d.extra_repr(), d.p, d.inplace, vars(d).keys()) == (repr(t), t.extra_repr(), t.p, t.inplace,
                                                                          vars(t).keys())
    assert d.state_dict() == {} and not list(d.buffers())
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.3), nn.Linear(4, 2))
    ours = copy.deepcopy(ref)
    ours[1] = fnn.Dropout(0.3)
    assert repr(ours) == repr(ref)
    ours.load_state_dict(ref.state_dict())  # strict, both ways
    ref.load_state_dict(ours.state_dict())
    buf = io.BytesIO()
    torch.save(ours, buf)
    x = torch.randn(3, 4)
    for m in [copy.deepcopy(ours), pickle.loads(pickle.dumps(ours)), torch.load(io.BytesIO(buf.getvalue()),
                                                                                  weights_only=False)]:
        assert type(m[1]) is fnn.Dropout and repr(m) == repr(ref)
        assert torch.equal(m.eval()(x), ref.eval()(x))


def test_swap_dropout_makes_a_library_layer_draw_fusedopt_masks():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.25, batch_first=True)
    layer.self_attn.dropout = 0.0  # a function's dropout_p, which no swap reaches
    ref = copy.deepcopy(layer)  # torch's dropouts
    twin = copy.deepcopy(layer)  # fusedopt's, put in by hand
    for name in ("dropout", "dropout1", "dropout2"):
        setattr(twin, name, fnn.Dropout(0.25))
    calls = []
    layer.dropout1.register_forward_hook(lambda *_: calls.append(1))
    kept = layer.dropout1
    assert fnn.swap_dropout(layer) == 3
    assert layer.dropout1 is kept and type(kept) is fnn.Dropout and kept.p == 0.25 and not kept.inplace
    x = torch.randn(2, 5, 16)
    torch.manual_seed(3)
    y = layer(x)
    assert calls == [1]
    torch.manual_seed(3)
    assert torch.equal(y, twin(x))
    torch.manual_seed(3)
    assert not torch.equal(y, ref(x))  # torch's masks differ
    layer.eval()
    assert torch.equal(layer(x), ref.eval()(x))  # identity in eval
    assert fnn.swap_dropout(layer) == 0  # already swapped
    bad = nn.Sequential(nn.Dropout(0.5), nn.Dropout(0.5), nn.Dropout2d(0.5))
    bad[1].p = 2.0
    with pytest.raises(ValueError, match="between 0 and 1"):
        fnn.swap_dropout(bad)
    assert [type(m) for m in bad] == [nn.Dropout, nn.Dropout, nn.Dropout2d]  # nothing swapped
    bad[1].p = 0.5
    assert fnn.swap_dropout(bad) == 2 and [type(m) for m in bad] == [fnn.Dropout, fnn.Dropout, nn.Dropout2d]
    module = nn.Dropout(0.1)
    assert fnn.swap_dropout(module) == 1 and type(module) is fnn.Dropout


@pytest.mark.parametrize("p", [torch.tensor(0.25), np.float32(0.25), np.float64(0.25)])
def test_p_as_tensor_or_numpy_scalar_is_accepted_like_torch(p):
    x = torch.ones(1000)
    assert torch.equal(F.dropout(x, p, seed=3), F.dropout(x, 0.25, seed=3))
    assert torch.equal(nn.functional.dropout(x, p, training=False), x)  # torch takes it too
    d = fnn.Dropout(p)
    assert repr(d) == repr(nn.Dropout(p))
    torch.manual_seed(1)
    y = d(x)
    torch.manual_seed(1)
    assert torch.equal(y, F.dropout(x, 0.25))
    with pytest.raises(TypeError):
        F.dropout(x, torch.tensor([0.25]))  # as torch: only a 0-d tensor
    with pytest.raises(ValueError, match="between 0 and 1"):
        fnn.Dropout(torch.tensor(1.5))  # at construction, as torch


# ---------------------------------------------------------------------------------------------------------------
# Inputs and autograd contexts: torch's shape, dtype and grad requirement; kept elements scaled, the gradient the
# forward's mask.

def _check_like_torch(make, p=0.4):
    x = make()
    ours, theirs = F.dropout(x, p), nn.functional.dropout(make(), p)
    assert (ours.shape, ours.dtype, ours.requires_grad) == (theirs.shape, theirs.dtype, theirs.requires_grad)
    keep = ours != 0
    t = torch.float64 if x.dtype == torch.float64 else torch.float32  # the kernels' op math
    want = (x.detach().to(t) * torch.tensor(1 / (1 - p), dtype=t)).to(x.dtype)
    assert torch.equal(ours[keep], want[keep])
    assert torch.is_inference(ours) == torch.is_inference(theirs)


@pytest.mark.parametrize("make", [
    lambda: torch.tensor(3.0), lambda: torch.empty(0, 5), lambda: torch.rand(6, 40).add(1).t(),
    lambda: torch.rand(1, 50).add(1).expand(6, 50), lambda: torch.rand(2, 3, 4, 5).add(1).to(
        memory_format=torch.channels_last), lambda: torch.rand(300, dtype=torch.float64).add(1),
    lambda: torch.rand(300).add(1).half(), lambda: torch.rand(300).add(1).bfloat16()],
    ids=["0d", "empty", "transposed", "expanded", "channels_last", "float64", "float16", "bfloat16"])
def test_input_kinds(make):
    _check_like_torch(make)


def test_no_grad_inference_mode_and_autocast():
    with torch.no_grad():
        _check_like_torch(lambda: torch.rand(100, requires_grad=True).add(1))
    with torch.inference_mode():
        _check_like_torch(lambda: torch.rand(100).add(1))
        x = torch.ones(100)
        assert F.dropout(x, 0.5, inplace=True) is x and torch.is_inference(x)
    lin = nn.Linear(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(torch.randn(4, 8))
        assert F.dropout(h, 0.5).dtype == nn.functional.dropout(h, 0.5).dtype == torch.bfloat16
        assert F.dropout(torch.ones(4), 0.5).dtype == torch.float32  # not an autocast op, as torch's


def test_integer_and_bool_inputs_raise_in_training_and_pass_in_eval_like_torch():
    for dtype in [torch.int64, torch.bool]:
        x = torch.ones(5, dtype=dtype)
        for f in [F.dropout, nn.functional.dropout]:
            with pytest.raises(RuntimeError):
                f(x, 0.5)
            assert f(x, 0.5, training=False) is x


def test_gradient_is_the_forward_mask_and_inplace_rules_follow_torch():
    x = torch.randn(500, requires_grad=True)
    y = F.dropout(x, 0.3)
    g = torch.randn(500)
    (gx,) = torch.autograd.grad(y, x, g, retain_graph=True)
    assert torch.equal(gx, torch.where(y != 0, g * torch.tensor(1 / 0.7), 0.0))
    (gx2,) = torch.autograd.grad(y, x, g)  # retain_graph: the same mask again
    assert torch.equal(gx2, gx)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        F.dropout(x, 0.5, inplace=True)
    base = torch.ones(4, 300)
    v = base[1]
    assert F.dropout(v, 0.5, inplace=True) is v  # in place through a view
    assert base[0].eq(1).all() and base[1].eq(1).sum() == 0 and set(base[1].unique().tolist()) <= {0.0, 2.0}
    t = torch.ones(3)
    assert F.dropout(t, 0.5, training=False, inplace=True) is t and t.eq(1).all()


def test_bias_dropout_add_gradients_whichever_inputs_require_grad():
    m = mask((3, 4, 5), 0.4, 7)
    for rx, rb, rr in [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]:
        x, b, r = torch.randn(3, 4, 5), torch.randn(5), torch.randn(3, 4, 5)
        x.requires_grad_(rx), b.requires_grad_(rb), r.requires_grad_(rr)
        y = F.bias_dropout_add(x, b, r, 0.4, seed=7)
        torch.testing.assert_close(y, r + (x + b) * m)
        g = torch.randn(3, 4, 5)
        y.backward(g)
        for t, want in [(x, g * m), (b, (g * m).sum((0, 1))), (r, g)]:
            if t.requires_grad:
                torch.testing.assert_close(t.grad, want)
            else:
                assert t.grad is None


# ---------------------------------------------------------------------------------------------------------------
# torch.func and forward-mode AD: the ops' registered autograd supports neither, so under them dropout is x·mask
# with the op's mask. Was: func.grad raised, jvp and forward AD returned zero or no tangent, vmap gave every sample
# one mask whatever its randomness flag.

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_jvp_vjp_and_forward_ad_are_the_eager_dropout_bit_for_bit(dtype):
    x, t = torch.randn(1000, dtype=dtype), torch.randn(1000, dtype=dtype)
    f = lambda a: F.dropout(a, 0.3, seed=5, offset=2)  # noqa: E731
    want, want_t = f(x), f(t)
    y, yt = jvp(f, (x,), (t,))
    y2, pullback = vjp(f, x)
    assert all(torch.equal(a, b) for a, b in [(y, want), (yt, want_t), (y2, want), (pullback(t)[0], want_t)])
    with torch.autograd.forward_ad.dual_level():
        d = torch.autograd.forward_ad.make_dual(x, t)
        primal, tangent = torch.autograd.forward_ad.unpack_dual(F.dropout(d, 0.3, seed=5, offset=2))
    assert torch.equal(primal, want) and tangent is not None and torch.equal(tangent, want_t)
    b, r = torch.randn(1000, dtype=dtype), torch.randn(1000, dtype=dtype)
    g = lambda a: F.bias_dropout_add(a.view(10, 100), b[:100], r.view(10, 100), 0.3, seed=5)  # noqa: E731
    assert torch.equal(jvp(g, (x,), (t,))[0], g(x))


def test_grad_jacrev_and_hessian():
    x = torch.randn(50)
    m = mask(50, 0.5, 1)
    assert torch.equal(grad(lambda a: F.dropout(a, 0.5, seed=1).sum())(x), m)
    assert torch.equal(jacrev(lambda a: F.dropout(a, 0.5, seed=1))(x), torch.diag(m))
    torch.manual_seed(0)
    j = jacrev(lambda a: F.dropout(a, 0.5))(x)  # a drawn mask: jacrev's vmap replays it, no randomness error
    assert torch.equal(j, torch.diag(j.diag())) and set(j.diag().tolist()) == {0.0, 2.0}
    h = torch.func.hessian(lambda a: F.dropout(a, 0.5, seed=1).square().sum())(x)
    assert torch.equal(h, torch.diag(2 * m * m))
    b, r = torch.randn(5), torch.randn(10, 5)
    xs = torch.randn(10, 5)
    gs = grad(lambda *a: F.bias_dropout_add(*a, 0.4, seed=3).square().sum(), argnums=(0, 1, 2))(xs, b, r)
    leaves = [t.clone().requires_grad_() for t in (xs, b, r)]
    F.bias_dropout_add(*leaves, 0.4, seed=3).square().sum().backward()
    for a, t in zip(gs, leaves):
        torch.testing.assert_close(a, t.grad)


def test_vmap_follows_the_randomness_flag():
    x = torch.randn(3, 4, 50)
    for f in [lambda t: F.dropout(t, 0.5), lambda t: F.bias_dropout_add(t, t[0], t, 0.5)]:
        with pytest.raises(RuntimeError, match=RANDOMNESS_ERROR):
            vmap(f)(x)
    torch.manual_seed(2)
    want = F.dropout(x, 0.5)  # "different": sample i takes stretch i of one draw over the batch
    torch.manual_seed(2)
    assert torch.equal(vmap(lambda t: F.dropout(t, 0.5), randomness="different")(x), want)
    torch.manual_seed(2)
    assert torch.equal(vmap(lambda t: F.dropout(t, 0.5), randomness="different", in_dims=1)(x.transpose(0, 1)), want)
    for randomness in ["same", "error"]:  # an explicit seed is no random op: every sample gets the seed's mask
        y = vmap(lambda t: F.dropout(t, 0.5, seed=9), randomness=randomness)(x)
        assert torch.equal(y, x * mask((4, 50), 0.5, 9))
    torch.manual_seed(4)
    y = vmap(lambda t: F.dropout(t, 0.5), randomness="same")(x)
    torch.manual_seed(4)
    assert torch.equal(y, x * F.dropout(torch.ones(4, 50), 0.5))


def test_p_0_p_1_and_empty_inputs_take_nothing_from_the_generator_like_torch():
    x = torch.randn(5, 7)
    for f in (torch.nn.functional.dropout, F.dropout):
        assert f(x, 0.0) is x and f(x, 0.0, inplace=True) is x  # torch returns the input itself
        empty = torch.randn(0, 3)
        assert f(empty, 0.5) is empty
    for p in (0.0, 1.0):
        torch.manual_seed(5)
        ys = [F.dropout(x, p), F.dropout(x.clone(), p, inplace=True), F.bias_dropout_add(x, x[0], x, p)]
        after = torch.rand(3)
        torch.manual_seed(5)
        assert torch.equal(after, torch.rand(3))  # nothing drawn
        want = x * (1.0 - p)
        assert torch.equal(ys[0], want) and torch.equal(ys[1], want)
        assert torch.equal(ys[2], x + (x + x[0]) * (1.0 - p))
        torch.testing.assert_close(vmap(lambda t: F.dropout(t, p))(x), want, rtol=0, atol=0)  # no random op
    torch.manual_seed(5)
    F.dropout(x, 0.5)
    assert not torch.equal(torch.rand(3), after)  # 0 < p < 1 draws


def test_a_random_mask_is_refused_while_a_cuda_graph_is_captured(monkeypatch):
    """The draw is read on the host, so a captured graph would replay its capture's mask: a random draw for a
    CUDA input is refused while the current stream captures; a given seed (a fixed mask on purpose), p = 0 or 1
    (no mask) and CPU inputs are not. (No GPU here: the capture state is faked, the draw is all that runs.)"""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    cuda = torch.device("cuda")
    with pytest.raises(RuntimeError, match="capturing a graph.*pass seed="):
        F._draw(None, None, 0.5, cuda)
    assert F._draw(7, 3, 0.5, cuda).tolist() == [7, 3]
    assert F._draw(None, None, 1.0, cuda).tolist() == [0, 0]
    x = torch.ones(64)
    assert not torch.equal(F.dropout(x, 0.5), F.dropout(x, 0.5))  # the CPU draws as ever
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert F._draw(None, None, 0.5, cuda).shape == (2,)


def test_per_sample_gradients_through_a_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 40), fnn.Dropout(0.5))
    params = {k: v.detach() for k, v in model.named_parameters()}
    xs = torch.randn(4, 1, 6)
    loss = lambda p, x: functional_call(model, p, (x,)).sum()  # noqa: E731
    for randomness in ["different", "same"]:
        torch.manual_seed(1)
        gs = vmap(grad(loss), in_dims=(None, 0), randomness=randomness)(params, xs)
        keep = gs["0.bias"] != 0  # d loss / d bias = the sample's mask
        assert set(gs["0.bias"].unique().tolist()) == {0.0, 2.0}
        assert torch.equal(gs["0.weight"], gs["0.bias"].unsqueeze(-1) * xs)  # the forward's mask in the weight's
        assert torch.equal(keep[0], keep[1]) == (randomness == "same")


def test_vmap_under_torch_compile():
    x = torch.ones(3, 200)
    f = torch.compile(lambda t: vmap(lambda u: F.dropout(u, 0.5), randomness="different")(t))
    torch.manual_seed(5)
    y = f(x)
    torch.manual_seed(5)
    assert torch.equal(y, F.dropout(x, 0.5))
    with pytest.raises(RuntimeError, match=RANDOMNESS_ERROR):
        torch.compile(lambda t: vmap(lambda u: F.dropout(u, 0.5))(t))(x)


# ---------------------------------------------------------------------------------------------------------------
# Tracing, scripting, export, checkpointing.

def test_fx_symbolic_trace_draws_at_run_time_and_keeps_the_module_a_leaf():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), fnn.Dropout(0.5), nn.Linear(64, 2))
    gm = torch.fx.symbolic_trace(model)
    assert [n.op for n in gm.graph.nodes][1:4] == ["call_module"] * 3  # as torch.nn.Dropout: a leaf
    x = torch.randn(4, 8)
    torch.manual_seed(1)
    y = gm(x)
    torch.manual_seed(1)
    assert torch.equal(y, model(x)) and not torch.equal(gm(x), gm(x))  # was: one mask baked in at trace time
    gm.eval()
    assert torch.equal(gm(x), model.eval()(x))  # was: the training mode baked in too

    class Net(nn.Module):
        def forward(self, a, b, r):
            return F.bias_dropout_add(F.dropout(a, 0.5), b, r, 0.5)

    gn = torch.fx.symbolic_trace(Net())
    assert [n.target for n in gn.graph.nodes if n.op == "call_function"] == [F.dropout, F.bias_dropout_add]
    a = torch.ones(4, 100)
    assert not torch.equal(gn(a, a[0], a), gn(a, a[0], a))
    root = torch.fx.symbolic_trace(fnn.Dropout(0.5))  # traced as the root, as torch's: the functional call
    assert not torch.equal(root(a), root(a))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), fnn.Dropout(0.5), nn.Linear(64, 2))
    scripted = torch.jit.script(model)  # was: NotSupportedError on functional.dropout's keyword-only arguments
    x = torch.randn(4, 8, requires_grad=True)
    h = model[0](x)
    d = torch.jit.script(fnn.Dropout(0.5))
    y = d(h)
    (g,) = torch.autograd.grad(y.sum(), h)
    assert torch.equal(g, torch.where(y != 0, 2.0, 0.0)) and torch.equal(y[y != 0], 2 * h[y != 0])
    assert not torch.equal(d(h), d(h))
    t = torch.ones(500)
    assert torch.jit.script(fnn.Dropout(0.5, inplace=True))(t) is t and set(t.unique().tolist()) == {0.0, 2.0}
    scripted.eval(), model.eval()
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    assert torch.equal(torch.jit.load(io.BytesIO(buf.getvalue()))(x), model(x))


def test_export_in_eval_is_dropout_free_and_in_training_draws():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), fnn.Dropout(0.5), nn.Linear(16, 2)).eval()
    x = torch.randn(4, 8)
    ep = torch.export.export(model, (x,))
    assert not [n for n in ep.graph.nodes if "fusedopt" in str(n.target)]
    assert torch.equal(ep.module()(x), model(x))
    ep = torch.export.export(model.train(), (x,))
    assert {"fusedopt.dropout_seed.default", "fusedopt.dropout.default"} <= {str(n.target) for n in ep.graph.nodes}


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_activation_checkpointing_recomputes_the_same_mask(reentrant, inplace):
    torch.manual_seed(0)
    lin, d, out = nn.Linear(16, 16), fnn.Dropout(0.5, inplace), nn.Linear(16, 4)
    f = lambda t: out(d(lin(t)))  # noqa: E731
    x = torch.randn(8, 16, requires_grad=True)
    torch.manual_seed(3)
    f(x).square().sum().backward()
    want = x.grad
    x.grad = None
    torch.manual_seed(3)
    checkpoint(f, x, use_reentrant=reentrant).square().sum().backward()
    assert torch.equal(x.grad, want)
