"""fusedopt under torch.distributed on the CPU: DDP, ZeroRedundancyOptimizer and FSDP2 (fully_shard, also
with gradient masking and through torch.distributed.checkpoint), each run by 2 processes over gloo that the
test starts, and checked in the test's own process against single-process training.

Note [Distributed references]
Both ranks train on one batch of 8 rows, rank r on rows 4r..4r+3. DDP, and FSDP2's reduce-scatter, average
the two half-batch gradients g0, g1: a division by the world size (2: exact) and gloo's sum of two terms
(commutative: the same on both ranks). The result is bitwise (g0 + g1) / 2, so `_replay` computes g0 and g1
in one process, with one thread as the workers, and steps on (g0 + g1) / 2: the same elementwise op on the
same numbers, and the parameters must agree bitwise. Against training on the gradient of the full batch's
loss (`_train`) only the summation order differs (the matmul's 8 rows summed as 4 + 4), a few float32 ulps
per gradient element; carried through the steps below that stays within TOL (the parity suite's float32
tolerance, tests/test_optim.py; measured: at most 6e-8 apart after 6 steps), which the tests also check.
"""
import datetime
import os
import warnings
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fusedopt

WORLD = 2
STEPS = 6
RESUMED = 2  # steps after loading the state_dict (FSDP2)
TOL = dict(rtol=1e-5, atol=1e-6)
OPTIMIZERS = {
    "adam": (fusedopt.Adam, dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    # Gradient masking under DDP: every rank draws the same masks from the same grad_mask_seed.
    "sgd": (fusedopt.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, grad_keep_prob=0.7,
                               grad_mask_seed=5)),
}
ADAMW = dict(lr=0.01, weight_decay=0.1)
# Gradient masking under FSDP2: shards start off a Philox block (rank 1's bias of the second layer, from 2).
MASKED = dict(lr=0.01, grad_keep_prob=0.5, grad_mask_seed=1)
# Gradient masking under ZeRO: rank 0 steps the first weight, rank 1 the others (ZeroRedundancyOptimizer
# hands the largest parameters out first), so rank 1's local optimizer holds parameters 2, 1, 3 as its 0, 1, 2.
MASKED_ZERO = dict(grad_keep_prob=0.5, grad_mask_seed=3)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this torch build has no torch.distributed with gloo")


def _model():
    torch.manual_seed(0)
    # 16 x 6 and 3 x 16 weights: FSDP2 splits the second unevenly (2 + 1 rows).
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)


def _loss(model, rows=slice(None)):
    x, y = _batch()
    return nn.functional.mse_loss(model(x[rows]), y[rows])


def _half(rank):
    return slice(4 * rank, 4 * rank + 4)


def _replay(model, opt, steps):
    """Single-process training on (g0 + g1) / 2 (Note [Distributed references])."""
    for _ in range(steps):
        halves = []
        for rank in range(WORLD):
            model.zero_grad()
            _loss(model, _half(rank)).backward()
            halves.append([p.grad.clone() for p in model.parameters()])
        for p, g0, g1 in zip(model.parameters(), *halves):
            p.grad = (g0 + g1) / 2
        opt.step()


def _train(model, opt, steps):
    """Single-process training on the full batch's gradient."""
    for _ in range(steps):
        opt.zero_grad()
        _loss(model).backward()
        opt.step()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


# The workers, run by torch.multiprocessing.spawn: each returns what the test checks, saved to rank<r>.pt.

def _ddp(rank, name):
    from torch.nn.parallel import DistributedDataParallel
    cls, options = OPTIMIZERS[name]
    model = DistributedDataParallel(_model())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        opt = cls(model.parameters(), **options)
        cls(model.parameters(), **{**options, "grad_keep_prob": 0.5, "grad_mask_seed": None})
    for _ in range(STEPS):
        opt.zero_grad()
        _loss(model, _half(rank)).backward()
        opt.step()
    return dict(params=_params(model.module), state=opt.state_dict()["state"],
                warnings=[str(w.message) for w in seen])


def _zero(rank, _):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel
    model = DistributedDataParallel(_model())
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=fusedopt.AdamW, **ADAMW)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = _loss(model, _half(rank))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    opt.consolidate_state_dict(to=0)
    return dict(params=_params(model.module), losses=losses, owned=len(opt.optim.param_groups[0]["params"]),
                local_type=type(opt.optim).__name__, state_dict=opt.state_dict() if rank == 0 else None)


def _zero_masked(rank, _):
    """Masked ZeRO training, with the local optimizers numbering the parameters as one process does (Note
    [ZeRO numbering] in fusedopt/optim/_base.py) and, for contrast, with their own numbering."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel
    result = {}
    for numbered in (True, False):
        model = DistributedDataParallel(_model())
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=fusedopt.AdamW, **ADAMW, **MASKED_ZERO)
        if numbered:
            fusedopt.zero_numbering(opt)
        for _ in range(STEPS):
            opt.zero_grad()
            _loss(model, _half(rank)).backward()
            opt.step()
        result[numbered] = _params(model.module)
    try:
        fusedopt.zero_numbering(ZeroRedundancyOptimizer(_model().parameters(), optimizer_class=torch.optim.AdamW))
        result["refused"] = None
    except TypeError as e:
        result["refused"] = str(e)
    return result


def _sharded(mesh):
    """_model() under FSDP2: each Linear, then the whole, fully_shard-ed over the mesh."""
    from torch.distributed.fsdp import fully_shard
    model = _model()
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _fsdp(rank, _):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    mesh = init_device_mesh("cpu", (WORLD,))
    model = _sharded(mesh)
    cls, options = OPTIMIZERS["adam"]
    opt = cls(model.parameters(), **options)
    for steps in (STEPS, RESUMED):
        for _ in range(steps):
            opt.zero_grad()
            _loss(model, _half(rank)).backward()
            assert all(isinstance(p, DTensor) and isinstance(p.grad, DTensor) for p in model.parameters())
            opt.step()
        if steps == STEPS:
            saved = opt.state_dict()
            state = {i: {k: (type(v).__name__, v.full_tensor() if isinstance(v, DTensor) else v.clone())
                         for k, v in s.items()} for i, s in saved["state"].items()}
            opt = cls(model.parameters(), **options)  # resumed from the DTensor state
            opt.load_state_dict(saved)
    params = [p.full_tensor() for p in model.parameters()]
    # Gradient masking on the shards: each draws the masks of its place in the whole parameter (Note [Shard
    # offsets] in csrc/include/fusedopt/philox.h), so the steps are those of unsharded training.
    masked = fusedopt.Adam(model.parameters(), **MASKED)
    for _ in range(STEPS):
        masked.zero_grad()
        _loss(model, _half(rank)).backward()
        masked.step()
    # A tensor-parallel Shard(1) shard is not one run of the parameter's elements: masking it is refused,
    # before the group listed first is stepped.
    from torch.distributed.tensor import Shard, distribute_tensor
    columns = nn.Parameter(distribute_tensor(torch.ones(4, 6), mesh, [Shard(1)]))
    columns.grad = distribute_tensor(torch.ones(4, 6), mesh, [Shard(1)])
    plain = nn.Parameter(torch.ones(3))
    plain.grad = torch.ones(3)
    try:
        fusedopt.Adam([{"params": [plain]}, {"params": [columns]}], **MASKED).step()
        refused = None
    except NotImplementedError as e:
        refused = str(e)
    assert torch.equal(plain, torch.ones(3)) and torch.equal(columns.to_local(), torch.ones(4, 3))
    return dict(params=params, masked=[p.full_tensor() for p in model.parameters()],
                shards=[tuple(p.to_local().shape) for p in model.parameters()], state=state, refused=refused)


def _fsdp_checkpoint(rank, path):
    """FSDP2's checkpoint path: torch.distributed.checkpoint saves the model and the optimizer state (as
    get_*_state_dict give them) after STEPS steps; a fresh sharded model and optimizer load it (set_*_state_dict)
    and take RESUMED steps, as the uninterrupted run does."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (WORLD,))
    cls, options = OPTIMIZERS["adam"]

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            _loss(model, _half(rank)).backward()
            opt.step()
        opt.zero_grad()

    model = _sharded(mesh)
    opt = cls(model.parameters(), **options)
    train(model, opt, STEPS)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)
    train(model, opt, RESUMED)
    resumed = _sharded(mesh)  # a fresh start: its optimizer's state is made by a zero-lr step, then replaced
    resumed_opt = cls(resumed.parameters(), **options)
    saved = {"model": get_model_state_dict(resumed), "optim": get_optimizer_state_dict(resumed, resumed_opt)}
    dcp.load(saved, checkpoint_id=path)
    set_model_state_dict(resumed, saved["model"])
    set_optimizer_state_dict(resumed, resumed_opt, saved["optim"])
    steps = [s["step"].item() for s in resumed_opt.state.values()]
    train(resumed, resumed_opt, RESUMED)
    return dict(params=[p.full_tensor() for p in model.parameters()], steps=steps,
                resumed=[p.full_tensor() for p in resumed.parameters()])


def _worker(rank, port, out, run, arg):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(run(rank, arg), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # Note [Worker exit]: a gloo worker thread may still be dropping a finished collective (ZeRO's
    # broadcast_object_list) whose tensors own Python objects. If that happens during interpreter
    # finalization, taking the GIL ends the thread with a forced unwind, and std::terminate aborts a
    # rank that did all its work (seen in 2 of 14 ZeRO runs). Its result is saved, so skip finalization.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(run, arg, tmp_path, monkeypatch):
    """Runs run(rank, arg) on WORLD gloo ranks; returns their results by rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the workers before they import torch
    mp.spawn(_worker, args=(port, str(tmp_path), run, arg), nprocs=WORLD)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _single():
    """A single-process run's model (one thread, as the workers: Note [Distributed references])."""
    torch.set_num_threads(1)  # tests/conftest.py restores it
    return _model()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_ddp(name, tmp_path, monkeypatch):
    ranks = _spawn(_ddp, name, tmp_path, monkeypatch)
    cls, options = OPTIMIZERS[name]
    model = _single()
    opt = cls(model.parameters(), **options)
    _replay(model, opt, STEPS)
    for result in ranks:
        assert all(torch.equal(p, q) for p, q in zip(result["params"], model.parameters()))
        for i, p in enumerate(model.parameters()):
            for key, value in opt.state[p].items():
                assert torch.equal(result["state"][i][key], value), key
        # A masking optimizer whose grad_mask_seed each rank drew itself warns; the one given a seed does not.
        assert len(result["warnings"]) == 1 and "pass the same grad_mask_seed" in result["warnings"][0]
    full = _model()
    _train(full, cls(full.parameters(), **options), STEPS)
    torch.testing.assert_close(ranks[0]["params"], _params(full), **TOL)
    assert not all(torch.equal(p, q) for p, q in zip(ranks[0]["params"], _model().parameters()))  # it trained


def test_zero_redundancy_optimizer(tmp_path, monkeypatch):
    ranks = _spawn(_zero, None, tmp_path, monkeypatch)
    # Each rank's fusedopt.AdamW steps its own share of the 4 parameters; the loss falls on both.
    assert [r["local_type"] for r in ranks] == ["AdamW"] * WORLD
    assert min(r["owned"] for r in ranks) > 0 and sum(r["owned"] for r in ranks) == 4
    for result in ranks:
        assert result["losses"][-1] < 0.9 * result["losses"][0], result["losses"]
    model = _single()
    opt = fusedopt.AdamW(model.parameters(), **ADAMW)
    _replay(model, opt, STEPS)
    for result in ranks:
        assert all(torch.equal(p, q) for p, q in zip(result["params"], model.parameters()))
    theirs = _model()
    torch_opt = torch.optim.AdamW(theirs.parameters(), **ADAMW)
    _replay(theirs, torch_opt, STEPS)
    torch.testing.assert_close(ranks[0]["params"], _params(theirs), **TOL)

    # The consolidated state_dict (global parameter numbering) holds the single-process state, and
    # torch.optim.AdamW loads it and continues as fusedopt.AdamW continues.
    saved = ranks[0]["state_dict"]
    assert sorted(saved["state"]) == [0, 1, 2, 3]
    for i, p in enumerate(model.parameters()):
        assert saved["state"][i].keys() == opt.state[p].keys()
        for key, value in opt.state[p].items():
            assert torch.equal(saved["state"][i][key], value), key
    resumed = _model()
    with torch.no_grad():
        for p, q in zip(resumed.parameters(), ranks[0]["params"]):
            p.copy_(q)
    resumed_opt = torch.optim.AdamW(resumed.parameters(), **ADAMW)
    resumed_opt.load_state_dict(saved)
    _replay(resumed, resumed_opt, 3)
    _replay(model, opt, 3)
    torch.testing.assert_close(_params(resumed), _params(model), **TOL)
    assert all(resumed_opt.state[p]["step"].item() == STEPS + 3 for p in resumed.parameters())


def test_zero_numbering_masks_as_one_process(tmp_path, monkeypatch):
    ranks = _spawn(_zero_masked, None, tmp_path, monkeypatch)
    model = _single()
    _replay(model, fusedopt.AdamW(model.parameters(), **ADAMW, **MASKED_ZERO), STEPS)
    for result in ranks:
        # Numbered as one process numbers them, the masks and so the parameters are those of one process.
        assert all(torch.equal(p, q) for p, q in zip(result[True], model.parameters()))
        # Numbered by each rank's own share, rank 1's parameters draw other masks (and through the loss every
        # parameter then moves otherwise).
        assert not any(torch.equal(p, q) for p, q in zip(result[False], model.parameters()))
        assert "whose optimizer_class is a fusedopt optimizer, got ZeroRedundancyOptimizer holding a AdamW" \
            in result["refused"]
    with pytest.raises(TypeError, match="got Adam$"):
        fusedopt.zero_numbering(fusedopt.Adam(model.parameters()))


def test_fsdp2_fully_shard(tmp_path, monkeypatch):
    ranks = _spawn(_fsdp, None, tmp_path, monkeypatch)
    # Dim-0 shards: (8 + 8, 6), (8 + 8,), (2 + 1, 16), (2 + 1,).
    assert [r["shards"] for r in ranks] == [[(8, 6), (8,), (2, 16), (2,)], [(8, 6), (8,), (1, 16), (1,)]]
    cls, options = OPTIMIZERS["adam"]
    model = _single()
    opt = cls(model.parameters(), **options)
    _replay(model, opt, STEPS)
    for result in ranks:
        # state_dict() keeps the buffers as DTensors (as torch's optimizers do), the step a plain tensor.
        for i, p in enumerate(model.parameters()):
            assert result["state"][i].keys() == opt.state[p].keys()
            for key, value in opt.state[p].items():
                kind, saved = result["state"][i][key]
                assert kind == ("Tensor" if key == "step" else "DTensor"), key
                assert torch.equal(saved, value), key
        assert "one run of its row-major elements" in result["refused"]
    _replay(model, opt, RESUMED)
    for result in ranks:
        assert all(torch.equal(p, q) for p, q in zip(result["params"], model.parameters()))
    _replay(model, fusedopt.Adam(model.parameters(), **MASKED), STEPS)
    for result in ranks:
        assert all(torch.equal(p, q) for p, q in zip(result["masked"], model.parameters()))
    full = _model()
    _train(full, cls(full.parameters(), **options), STEPS + RESUMED)
    torch.testing.assert_close(ranks[0]["params"], _params(full), **TOL)


def test_fsdp2_distributed_checkpoint(tmp_path, monkeypatch):
    ranks = _spawn(_fsdp_checkpoint, str(tmp_path / "checkpoint"), tmp_path, monkeypatch)
    model = _single()
    cls, options = OPTIMIZERS["adam"]
    _replay(model, cls(model.parameters(), **options), STEPS + RESUMED)
    for result in ranks:
        assert result["steps"] == [STEPS] * 4
        assert all(torch.equal(p, q) for p, q in zip(result["resumed"], result["params"]))
        assert all(torch.equal(p, q) for p, q in zip(result["params"], model.parameters()))
