"""A Tensor lr changed by an LR scheduler, and Adam's tensor betas changed by hand, under
torch.compile(opt.step, fullgraph=True): one compilation, results bitwise equal to eager.

step() hands a tensor lr to the ops' `.tensor_lr` overloads (Note [Tensor lr] in csrc/include/fusedopt/calls.h), and
tensor betas to adam_'s `.tensor_betas` (Note [Tensor betas]), so under dynamo they are graph inputs rather than
specialized floats.
"""
import torch
from torch._dynamo.testing import CompileCounter

import fusedopt

SHAPES = [(3, 5), (7,)]


def test_tensor_lr_scheduler_compiles_once():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    eager = [torch.randn(s, generator=gen, requires_grad=True) for s in SHAPES]
    compiled = [p.detach().clone().requires_grad_() for p in eager]
    opts = [fusedopt.Adam(ps, lr=torch.tensor(0.01), weight_decay=0.1, grad_mask_seed=7) for ps in (eager, compiled)]
    counter = CompileCounter()
    # Compiled before the scheduler exists: a scheduler replaces opt.step by a wrapper (which marks the
    # step as called) that dynamo refuses to trace, for torch.optim's optimizers as for these.
    step = torch.compile(opts[1].step, fullgraph=True, backend=counter)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in opts]
    lrs = []
    for k in range(6):
        grads = [torch.randn(s, generator=gen) for s in SHAPES]
        for e, c, g in zip(eager, compiled, grads):
            e.grad, c.grad = g.clone(), g.clone()
        opts[0].step()
        # The first step runs eagerly: it creates the state, after which a compiled step would retrace anyway.
        (step if k else opts[1].step)()
        for e, c in zip(eager, compiled):
            assert torch.equal(e, c)
        for s in schedulers:
            s.step()
        lrs.append(opts[1].param_groups[0]["lr"].item())
    assert lrs == [torch.tensor(0.01).item() * 0.5 ** k for k in range(1, 7)]  # halving is exact
    assert counter.frame_count == 1


def test_tensor_betas_schedule_compiles_once():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    eager = [torch.randn(s, generator=gen, requires_grad=True) for s in SHAPES]
    compiled = [p.detach().clone().requires_grad_() for p in eager]
    opts = [fusedopt.AdamW(ps, lr=0.01, betas=(torch.tensor(0.9), torch.tensor(0.999)), amsgrad=True)
            for ps in (eager, compiled)]
    counter = CompileCounter()
    step = torch.compile(opts[1].step, fullgraph=True, backend=counter)
    for k in range(6):
        grads = [torch.randn(s, generator=gen) for s in SHAPES]
        for e, c, g in zip(eager, compiled, grads):
            e.grad, c.grad = g.clone(), g.clone()
        opts[0].step()
        (step if k else opts[1].step)()  # the first step creates the state eagerly, as above
        for e, c in zip(eager, compiled):
            assert torch.equal(e, c)
        for o in opts:  # a beta1 warm-up schedule
            o.param_groups[0]["betas"][0].fill_(0.9 - 0.1 * 0.5 ** k)
    assert counter.frame_count == 1
