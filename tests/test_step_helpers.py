"""The C++ helpers of the optimizers' step (csrc/module.cpp): _grads and _contiguous give what Python gives,
and a step leaves no reference behind (its op calls borrow the tensors: Note [Direct calls])."""
import pytest
import torch

import fusedopt
from _modes import Counting, Sub
from fusedopt import _C


def _tensors():
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    t = torch.randn(2, 2).t()  # strided, with a strided gradient
    t.grad = torch.randn(2, 2).t()
    s = torch.randn(4).as_subclass(Sub)
    s.grad = torch.randn(4)
    return [p, t, torch.randn(5), s]  # torch.randn(5): no gradient


def test_grads_are_python_grads():
    ts = _tensors()
    got = _C._grads(ts)
    assert type(got) is list and len(got) == len(ts)
    assert all(g is t.grad for g, t in zip(got, ts))
    assert got[2] is None
    assert _C._grads([]) == []
    with pytest.raises(AttributeError, match="grad"):
        _C._grads([ts[0], 1])


def test_contiguous_is_python_contiguous():
    ts = _tensors()
    for tensors in ([], ts[:1], ts[2:], ts, [ts[0].grad, ts[1].grad], [ts[1].grad]):
        assert _C._contiguous(tensors) is all(t.is_contiguous() for t in tensors)
    with pytest.raises(AttributeError, match="is_contiguous"):
        _C._contiguous([ts[0], "x"])


def test_torch_function_mode_sees_the_reads():
    """Under a torch function mode the helpers take Python's way, so the mode sees every read, as it would see
    [p.grad for p in params]."""
    ts = _tensors()
    with Counting() as mode:
        expected = [t.grad for t in ts]
        python_calls = mode.calls
        mode.calls = 0
        assert all(g is e for g, e in zip(_C._grads(ts), expected))
        assert mode.calls == python_calls > 0


@pytest.mark.parametrize("cls", [fusedopt.SGD, fusedopt.Adagrad, fusedopt.RMSprop, fusedopt.Adam])
def test_step_leaves_no_reference(cls):
    """A step takes no reference to a tensor that it does not give back."""
    params = [torch.randn(s, requires_grad=True) for s in [(5,), (3, 4), (1,)]]
    opt = cls(params, lr=0.1, **({"momentum": 0.9} if cls is fusedopt.SGD else {}))
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    tensors = params + [v for state in opt.state.values() for v in state.values()]
    assert all(t._use_count() == 1 for t in tensors)
