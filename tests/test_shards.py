"""Shards of a parameter (Note [Shard offsets] in csrc/include/fusedopt/philox.h): an optimizer op given the
pieces of a parameter as separate tensors, each with the index of its first element (shard_offsets), must
update every element bit for bit as the op on the whole parameter does, its gradient mask and rounding bits
included, wherever the cuts fall: off a Philox block, off a CPU draw span, across chunks. Checked for the CPU
op and for the grid emulation of the CUDA bodies (tests/test_gridemu.py), and the mask of a shard far into a
parameter (a counter above 2^32) against the numpy reference. tests/test_cuda.py runs check_shards on a GPU.
"""
import numpy as np
import pytest
import torch

import fusedopt._ext  # noqa: F401  (registers torch.ops.fusedopt.*)
from fusedopt.reference import philox as ref

OPS = torch.ops.fusedopt
SEED = 0x0DDC_0FFE_E5EE_D5ED
INDEX = 3  # the parameter's number in its optimizer
# Element counts of the shards: cuts off every Philox block and draw-span boundary, a shard across a CPU chunk
# (2^15 elements), empty and one-element shards.
SHARDS = [1, 2, 5, 0, 58, 64, 127, 1, 4099, 32771, 301, 40000, 3]
CONFIGS = {
    "sgd": ([("momentum_buffers", 0.0)], dict(lr=0.05, momentum=0.9, dampening=0.1)),
    "adagrad": ([("state_sums", 0.0)], dict(lr=0.1, lr_decay=0.01)),
    "rmsprop": ([("square_avgs", 0.0), ("grad_avgs", 0.0), ("momentum_buffers", 0.0)],
                dict(lr=0.01, centered=True, momentum=0.5)),
    "adam": ([("exp_avgs", 0.0), ("exp_avg_sqs", 0.0), ("max_exp_avg_sqs", 0.0)], dict(lr=0.01, amsgrad=True)),
}
BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
        torch.bfloat16: torch.int16}


def _whole(opt, dtype, state_dtype):
    gen = torch.Generator().manual_seed(len(opt))
    n = sum(SHARDS)
    params = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    grads = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    states = [torch.full((n,), fill, dtype=state_dtype) for _, fill in CONFIGS[opt][0]]
    return [params, grads, *states]


def _step(op, opt, tensors, steps, offsets, options):
    """One call of `op` on tensors = [params, grads, *states], lists of one tensor per shard."""
    getattr(OPS, op)(*tensors, steps, [INDEX] * len(steps), **CONFIGS[opt][1], **options, grad_mask_seed=SEED,
                     shard_offsets=offsets)


def _bits(t):
    return t.view(BITS[t.dtype])


def check_shards(opt, kind, op, device="cpu"):
    """Three steps of `op` on the shards of a parameter (on `device`) against the CPU op on the whole."""
    rounding = "round" in kind
    options = dict(grad_keep_prob=0.6 if "mask" in kind else 1.0, stochastic_rounding=rounding)
    dtypes = [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)] if rounding else [
        (torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float16, torch.float32)]
    cuts = np.cumsum([0] + SHARDS).tolist()
    for dtype, state_dtype in dtypes:
        whole = _whole(opt, dtype, state_dtype)
        shards = [[t[a:b].to(device, copy=True) for a, b in zip(cuts, cuts[1:])] for t in whole]
        whole = [[t] for t in whole]
        whole_steps = [torch.tensor(0.0)]
        shard_steps = [torch.tensor(0.0, device=device) for _ in SHARDS]
        for _ in range(3):
            _step(opt + "_", opt, whole, whole_steps, None, options)
            _step(op, opt, shards, shard_steps, cuts[:-1], options)
        where = f"{op} on {device}, {kind} {dtype}/{state_dtype}"
        for k, (w, pieces) in enumerate(zip(whole, shards)):
            got = torch.cat(pieces).cpu()
            differ = (_bits(got) != _bits(w[0])).nonzero().flatten()[:5].tolist()
            assert not differ, f"{where}: list {k} differs from the whole parameter's step at {differ}"
        assert all(s.item() == 3 for s in shard_steps)


@pytest.mark.parametrize("emulated", [False, True], ids=["cpu", "gridemu"])
@pytest.mark.parametrize("kind", ["mask", "round", "mask+round"])
@pytest.mark.parametrize("opt", list(CONFIGS))
def test_shards_step_as_the_whole(opt, kind, emulated, monkeypatch):
    if emulated:  # small launches and chunks, so shards also split across launches
        monkeypatch.setenv("FUSEDOPT_GRIDEMU_PLAN", "5,7,256,32")
    check_shards(opt, kind, ("_gridemu_" if emulated else "") + opt + "_")


@pytest.mark.parametrize("emulated", [False, True], ids=["cpu", "gridemu"])
def test_shard_mask_far_into_a_parameter(emulated):
    """A shard 2^34 − 100 elements into its parameter: Philox counters cross into the high word within it.
    SGD with lr 1 on zero params and unit gradients leaves −1/r where kept and 0 where dropped."""
    n, keep = 5000, 0.5
    for start in [2**34 - 100, 2**34 + 5, 2**40 + 3]:
        params, grads = torch.zeros(n), torch.ones(n)
        getattr(OPS, ("_gridemu_" if emulated else "") + "sgd_")(
            [params], [grads], [], [torch.tensor(6.0)], [INDEX], lr=1.0, grad_keep_prob=keep, grad_mask_seed=SEED,
            shard_offsets=[start])
        want = ref.keep_mask(SEED, (7 << 24) + INDEX, n, keep, start=start)  # step 7 (Note [Gradient mask stream])
        assert np.array_equal(params.numpy() != 0, want), start
        assert set(params.unique().tolist()) == {0.0, -2.0}


def test_reference_words_from_a_start():
    """The reference's words from element `start` are those of the stream from 0, sliced."""
    all_words = ref.words(SEED, 99, 1000)
    for start in [0, 1, 3, 4, 257, 990]:
        assert np.array_equal(ref.words(SEED, 99, 1000 - start, start), all_words[start:])


@pytest.mark.parametrize("offsets, message", [
    ([0], "got 2 params but 1 shard_offsets"),
    ([0, -1], r"shard_offsets\[1\] must lie in \[0, 2\^62 - numel\], got -1"),
    ([0, 2**62 - 3], r"shard_offsets\[1\] must lie in"),
])
@pytest.mark.parametrize("emulated", [False, True], ids=["cpu", "gridemu"])
def test_bad_shard_offsets(offsets, message, emulated):
    params = [torch.zeros(4), torch.zeros(4)]
    with pytest.raises(RuntimeError, match=message):
        getattr(OPS, ("_gridemu_" if emulated else "") + "sgd_")(
            params, [torch.ones(4), torch.ones(4)], [], [torch.tensor(0.0), torch.tensor(0.0)], [0, 1], lr=1.0,
            grad_keep_prob=0.5, shard_offsets=offsets)
    assert all(not p.any() for p in params)
