"""The CUDA ops on a GPU: parity with fusedopt.reference, bitwise equality with the CPU ops on thousands of
random configurations, every dtype, AMP tensors read on the device (graph-capturable: no host sync),
64-bit offsets, the current stream, and the errors of mixed-device calls.

Skipped without a GPU (CI runs the same kernel bodies on the host: tests/test_gridemu.py). Where a GPU is
present the extension must have been built with its CUDA kernels; a CPU-only build fails here.
"""
import itertools
import random
import zlib

import numpy as np
import pytest
import torch

import fusedopt
import fusedopt._ext
import fusedopt.reference as ref
from test_gridemu import (DECAYS, DTYPES, EXTRAS, SEED, STATE_LISTS, VARIANTS, Case, _assert_bitwise, _call_with,
                          _dt)
from test_shards import check_shards

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

OPS = torch.ops.fusedopt
CUDA = "cuda"
REF_KEYS = {"momentum_buffers": "momentum_buffer", "state_sums": "sum", "square_avgs": "square_avg",
            "grad_avgs": "grad_avg", "exp_avgs": "exp_avg", "exp_avg_sqs": "exp_avg_sq",
            "max_exp_avg_sqs": "max_exp_avg_sq"}
REF_STEP = {"sgd": ref.sgd_step, "adagrad": ref.adagrad_step, "rmsprop": ref.rmsprop_step, "adam": ref.adam_step}


def to_cpu(state):
    tensors, steps = state
    return {k: [t.cpu() for t in v] for k, v in tensors.items()}, [s.cpu() for s in steps]


def run_devices(case, steps=1, **amp):
    """`steps` chained calls of the CPU op and of the CUDA op on copies of the case; CUDA results on the CPU."""
    cpu, dev = case.clone(), case.clone(CUDA)
    dev_amp = {k: v.to(CUDA) for k, v in amp.items()}
    for _ in range(steps):
        case.call(case.opt + "_", *cpu, **amp)
        case.call(case.opt + "_", *dev, **dev_amp)
    return to_cpu(dev), cpu


def test_every_op_has_a_cuda_kernel():
    assert fusedopt._ext.HAS_CUDA_KERNELS, "fusedopt was built without its CUDA kernels"
    for op in ["sgd_", "adagrad_", "rmsprop_", "adam_", "stream_"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedopt::{op}", "CUDA"), op


# Parity with the reference (float64 spec) for every optimizer × option; fp64 tight, fp32 to fp32 noise.

# (rtol, atol relative to the tensor's largest magnitude). fp32 allows 10 ulp-sized steps of the largest
# element: centered RMSprop's √(v − a²) cancels and amplifies fp32 rounding. The tight fp32 check is the
# bitwise equality with the CPU op below.
TOL = {torch.float64: (1e-12, 1e-14), torch.float32: (1e-5, 1e-5)}


def reference_run(case, steps):
    """The reference's result of `steps` steps from the case's inputs, in float64."""
    opt, o = case.opt, dict(case.options)
    if opt == "adam":
        o["betas"] = (o.pop("beta1", 0.9), o.pop("beta2", 0.999))
    out = {k: [] for k in case.tensors}
    for j in range(len(case.tensors["params"])):
        p = case.tensors["params"][j].double().clone()
        state = {"step": int(case.steps[j].item())}
        if state["step"]:  # at step 0 the reference creates its buffers (SGD: b = g on the first step)
            for name in case.lists:
                state[REF_KEYS[name]] = case.tensors[name][j].double().clone()
        for _ in range(steps):
            REF_STEP[opt](p, case.tensors["grads"][j].double().clone(), state, index=case.indices[j], **o)
        out["params"].append(p)
        out["grads"].append(case.tensors["grads"][j].double())
        for name in case.lists:
            out[name].append(state[REF_KEYS[name]])
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=_dt)
@pytest.mark.parametrize("opt, variant", [(o, i) for o in VARIANTS for i in range(len(VARIANTS[o]))],
                         ids=[f"{o}{i}" for o in VARIANTS for i in range(len(VARIANTS[o]))])
def test_matches_reference(opt, variant, dtype):
    rtol, atol = TOL[dtype]
    for (d, decay), (e, extra) in itertools.product(enumerate(DECAYS), enumerate(EXTRAS)):
        options = {**VARIANTS[opt][variant], **decay, **extra}
        # Fresh state (step 0) so the reference's lazily created buffers start where the op's do.
        case = Case(opt, options, dtype, [1, 7, 4099], steps0=[0, 0, 0], offsets={("grads", 1): 1},
                    seed=zlib.crc32(repr((opt, variant, d, e, str(dtype))).encode()))
        dev = case.clone(CUDA)
        for _ in range(3):
            case.call(opt + "_", *dev)
        got = to_cpu(dev)
        want = reference_run(case, 3)
        for name in ["params"] + case.lists:
            for j, (g, w) in enumerate(zip(got[0][name], want[name])):
                scale = max(w.abs().max().item(), 1.0) if w.numel() else 1.0
                torch.testing.assert_close(g.double(), w, rtol=rtol, atol=atol * scale,
                                           msg=lambda m: f"{options} {name}[{j}]: {m}")
        assert [s.item() for s in got[1]] == [3, 3, 3]


# CPU == CUDA, bit for bit.

@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("opt", list(VARIANTS))
def test_every_option_bitwise(opt, dtype):
    for variant, decay, extra in itertools.product(VARIANTS[opt], DECAYS, EXTRAS):
        options = {**variant, **decay, **extra}
        case = Case(opt, options, dtype, [1, 7, 64, 65, 4099, 0, 70001], steps0=[0, 1, 2, 5, 0, 3, 1000],
                    offsets={("grads", 1): 1, ("params", 6): 3}, seed=zlib.crc32(repr(options).encode()))
        _assert_bitwise(*run_devices(case, steps=3), f"{options} {_dt(dtype)}")


def _random_case(rnd, trial, dtype):
    opt = rnd.choice(list(VARIANTS))
    options = {**rnd.choice(VARIANTS[opt]), **rnd.choice(DECAYS), **rnd.choice(EXTRAS)}
    if "grad_keep_prob" in options:
        options["grad_keep_prob"] = rnd.choice([0.1, 0.5, 0.9, 0.999])
        options["grad_mask_seed"] = rnd.randrange(-2**63, 2**63)
    options["lr"] = options["lr"] * rnd.choice([0.1, 1.0, 3.0])
    n = rnd.randint(1, 8)
    sizes = [rnd.choice([0, 1, 3, 4, 5, 8, 17, 255, 256, 2049, 65535, 65536, 65537, rnd.randrange(1, 200000)])
             for _ in range(n)]
    lists = ["params", "grads"] + [name for name, used in STATE_LISTS[opt] if used(options)]
    offsets = {(name, j): rnd.randrange(8) for name in lists for j in range(n) if rnd.random() < 0.2}
    return Case(opt, options, dtype, sizes, offsets=offsets,
                steps0=[rnd.choice([0, 1, 2, 10, 12345]) for _ in sizes],
                step_dtype=rnd.choice([torch.float32, torch.float64]), seed=trial,
                indices=rnd.sample(range(2**24), n))


@pytest.mark.parametrize("part", range(8))
def test_fp32_bitwise_random_configurations(part):
    """2000 random calls in 8 parts (optimizer, options, AMP, 1-8 tensors of random sizes, offsets, steps,
    indices): the CUDA op gives the CPU op's bits, two chained steps."""
    rnd = random.Random(20261128 + part)
    tensors = 0
    for trial in range(250 * part, 250 * (part + 1)):
        case = _random_case(rnd, trial, torch.float32)
        tensors += len(case.steps)
        amp = rnd.choice([{}, {}, dict(grad_scale=torch.tensor([rnd.choice([1.0, 0.5, 3.0, 65536.0])]),
                                       found_inf=torch.zeros(1))])
        if amp:
            for g in case.tensors["grads"]:
                g.mul_(amp["grad_scale"])
        _assert_bitwise(*run_devices(case, steps=2, **amp),
                        f"trial {trial}: {case.opt} {case.options} sizes={[t.numel() for t in case.steps]}")
    assert tensors > 1000


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=_dt)
def test_other_dtypes_bitwise_random_configurations(dtype):
    rnd = random.Random(zlib.crc32(str(dtype).encode()))
    for trial in range(200):
        case = _random_case(rnd, trial, dtype)
        _assert_bitwise(*run_devices(case, steps=2), f"trial {trial}: {case.opt} {case.options}")


@pytest.mark.parametrize("kind", [(torch.float16, False), (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=["float16", "bfloat16", "bfloat16-sr"])
@pytest.mark.parametrize("opt", list(VARIANTS))
def test_fp32_state_and_stochastic_rounding_bitwise(opt, kind):
    """float32 state for half params (Note [State dtype]) and stochastic rounding of bf16 params (Note
    [Stochastic rounding]): the CUDA op gives the CPU op's bits, every variant, decays and masking."""
    dtype, stochastic = kind
    for variant, (decay, extra) in itertools.product(VARIANTS[opt], [(DECAYS[3], EXTRAS[2]), (DECAYS[6], EXTRAS[1])]):
        options = {**variant, **decay, **extra, "stochastic_rounding": stochastic, "grad_mask_seed": SEED}
        case = Case(opt, options, dtype, [1, 7, 64, 65, 4099, 0, 70001], steps0=[0, 1, 2, 5, 0, 3, 1000],
                    offsets={("grads", 1): 1, ("params", 6): 3}, seed=zlib.crc32(repr(options).encode()),
                    state_dtype=torch.float32)
        _assert_bitwise(*run_devices(case, steps=3), f"{options} {_dt(dtype)} fp32 state")


# AMP on the device, no host synchronisation.

@pytest.mark.parametrize("opt", list(VARIANTS))
def test_found_inf_and_grad_scale_on_device(opt):
    options = {**VARIANTS[opt][-1], "weight_decay": 0.1, "grad_keep_prob": 0.8, "grad_mask_seed": 5}
    case = Case(opt, options, torch.float32, [5, 70000, 64], steps0=[0, 4, 1], seed=8)
    dev = case.clone(CUDA)
    before = to_cpu(case.clone(CUDA))
    for inf in (1.0, float("inf"), float("nan")):
        case.call(opt + "_", *dev, grad_scale=torch.tensor([4.0], device=CUDA),
                  found_inf=torch.tensor([inf], device=CUDA))
        _assert_bitwise(to_cpu(dev), before, f"found_inf={inf}")
    for g in case.tensors["grads"]:
        g.mul_(512.0)
    _assert_bitwise(*run_devices(case, steps=2, grad_scale=torch.tensor([512.0]), found_inf=torch.zeros(1)),
                    "grad_scale")


@pytest.mark.parametrize("opt", list(VARIANTS))
def test_graph_capture_reads_amp_on_device(opt):
    """The op reads steps, grad_scale and found_inf on the device: it captures into a CUDA graph (a host
    sync would fail the capture), and replays with new grad_scale / found_inf values equal CPU calls
    with those values, bit for bit."""
    options = {**VARIANTS[opt][1 if len(VARIANTS[opt]) > 1 else 0], "grad_keep_prob": 0.5, "grad_mask_seed": 1}
    case = Case(opt, options, torch.float32, [3, 1000, 65537], steps0=[0, 2, 7], seed=9)
    dev = case.clone(CUDA)
    scale, inf = torch.ones(1, device=CUDA), torch.zeros(1, device=CUDA)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # load the kernel before capturing it
        case.call(opt + "_", *case.clone(CUDA), grad_scale=scale, found_inf=inf)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        case.call(opt + "_", *dev, grad_scale=scale, found_inf=inf)
    want = case.clone()
    for s, f in [(2.0, 0.0), (4.0, 0.0), (8.0, 1.0), (1.0, 0.0)]:
        for g, w, g0 in zip(dev[0]["grads"], want[0]["grads"], case.tensors["grads"]):
            g.copy_(g0 * s)
            w.copy_(g0 * s)
        scale.fill_(s)
        inf.fill_(f)
        graph.replay()
        case.call(opt + "_", *want, grad_scale=torch.tensor([s]), found_inf=torch.tensor([f]))
    torch.cuda.synchronize()
    _assert_bitwise(to_cpu(dev), want, "graph replay")
    assert [t.item() for t in want[1]] == [3, 5, 10]


@pytest.mark.parametrize("opt", list(VARIANTS))
def test_graph_replays_a_tensor_lr_on_device(opt):
    """Note [Tensor lr]: an lr on the device is read by the kernels; a captured step replays whatever the
    tensor holds, equal to the CPU op called with that value, bit for bit."""
    options = {**VARIANTS[opt][-1], "weight_decay": 0.1, "l1_decay": 0.01, "decoupled_weight_decay": True}
    case = Case(opt, options, torch.float32, [3, 1000, 65537], steps0=[0, 2, 7], seed=10)
    dev, want = case.clone(CUDA), case.clone()
    lr = torch.tensor(options["lr"], device=CUDA)
    op = getattr(OPS, opt + "_")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # load the kernel before capturing it
        _call_with(case, op.tensor_lr, *case.clone(CUDA), lr=lr)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _call_with(case, op.tensor_lr, *dev, lr=lr)
    for value in (options["lr"], options["lr"] / 4, 0.0, options["lr"] * 3):
        lr.fill_(value)
        graph.replay()
        _call_with(case, op.default, *want, lr=lr.item())
    torch.cuda.synchronize()
    _assert_bitwise(to_cpu(dev), want, "tensor lr replay")


def test_graph_replays_tensor_betas_on_device():
    """Note [Tensor betas]: lr and betas on the device are read by the kernels, which compute the bias
    corrections from them; a captured step replays whatever the tensors hold, equal to the CPU op called with
    those values, bit for bit."""
    options = dict(lr=0.01, amsgrad=True, weight_decay=0.1, grad_keep_prob=0.8, grad_mask_seed=SEED)
    case = Case("adam", options, torch.float32, [3, 1000, 65537], steps0=[0, 2, 7], seed=11)
    dev, want = case.clone(CUDA), case.clone()
    lr, beta1, beta2 = (torch.tensor(v, device=CUDA) for v in (0.01, 0.9, 0.999))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # load the kernel before capturing it
        _call_with(case, OPS.adam_.tensor_betas, *case.clone(CUDA), lr=lr, beta1=beta1, beta2=beta2)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _call_with(case, OPS.adam_.tensor_betas, *dev, lr=lr, beta1=beta1, beta2=beta2)
    for b1, b2 in [(0.9, 0.999), (0.5, 0.9), (0.0, 0.99)]:
        beta1.fill_(b1)
        beta2.fill_(b2)
        graph.replay()
        _call_with(case, OPS.adam_.default, *want, lr=lr.item(), beta1=beta1.item(), beta2=beta2.item())
    torch.cuda.synchronize()
    _assert_bitwise(to_cpu(dev), want, "tensor betas replay")


@pytest.mark.parametrize("tensor_betas", [False, True], ids=["float-betas", "device-betas"])
def test_optimizer_step_with_device_lr_captures(tensor_betas):
    """fusedopt.Adam with lr (and betas) tensors on the device: step() makes no host sync, so it captures into a
    CUDA graph; replays with new gradients and a scheduler-changed lr (and beta1) equal eager steps, bit for
    bit."""
    torch.manual_seed(0)
    shapes = [(64, 33), (33,), (7, 5)]
    eager = [torch.randn(s, device=CUDA) for s in shapes]
    graphed = [p.clone() for p in eager]
    opts = [fusedopt.Adam(ps, lr=torch.tensor(0.01, device=CUDA), weight_decay=0.1, grad_keep_prob=0.8,
                          grad_mask_seed=3,
                          betas=(torch.tensor(0.9, device=CUDA), torch.tensor(0.999, device=CUDA)) if tensor_betas
                          else (0.9, 0.999))
            for ps in (eager, graphed)]
    for ps in (eager, graphed):
        for p in ps:
            p.grad = torch.zeros_like(p)
    for o in opts:
        o.step()  # creates the state outside the capture
    torch.cuda.set_sync_debug_mode("error")
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            opts[1].step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            opts[1].step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    opts[0].step()  # the warm-up step above, for the eager twin
    for k in range(4):
        grads = [torch.randn(s, device=CUDA) for s in shapes]
        for e, g_, g in zip(eager, graphed, grads):
            e.grad.copy_(g)
            g_.grad.copy_(g)
        for o in opts:
            o.param_groups[0]["lr"].fill_(0.01 * 0.5 ** k)
            if tensor_betas:
                o.param_groups[0]["betas"][0].fill_(0.9 - 0.1 * 0.5 ** k)
        opts[0].step()
        graph.replay()
    torch.cuda.synchronize()
    for e, g in zip(eager, graphed):
        assert torch.equal(e, g)


def test_sync_debug_mode():
    case = Case("adam", dict(lr=0.01, amsgrad=True), torch.float32, [10, 100], steps0=[0, 3], seed=1)
    dev = case.clone(CUDA)
    torch.cuda.set_sync_debug_mode("error")
    try:
        case.call("adam_", *dev, grad_scale=torch.ones(1, device=CUDA), found_inf=torch.zeros(1, device=CUDA))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_current_stream():
    case = Case("sgd", dict(lr=0.1, momentum=0.9), torch.float32, [100000, 5], steps0=[1, 0], seed=3)
    cpu = case.clone()
    case.call("sgd_", *cpu)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        dev = case.clone(CUDA)
        case.call("sgd_", *dev)
        side.synchronize()
        _assert_bitwise(to_cpu(dev), cpu, "side stream")


def test_64bit_offsets():
    """2^31 + 4101 fp16 elements: elements past 2^31 are updated like any other (SGD has no per-element
    dependence on the index without a mask, so a slice run on the CPU is the reference)."""
    n = 2**31 + 4101
    gen = torch.Generator(device=CUDA).manual_seed(0)
    p = torch.randn(n, device=CUDA, dtype=torch.float16, generator=gen)
    g = torch.randn(n, device=CUDA, dtype=torch.float16, generator=gen)
    b = torch.randn(n, device=CUDA, dtype=torch.float16, generator=gen)
    pieces = [slice(0, 5000), slice(2**31 - 3000, 2**31 + 3000), slice(n - 5000, n)]
    want = [(p[s].cpu(), g[s].cpu(), b[s].cpu()) for s in pieces]
    opts = dict(lr=0.1, momentum=0.9, weight_decay=0.01)
    OPS.sgd_([p], [g], [b], [torch.ones((), device=CUDA)], [0], **opts)
    for s, (wp, wg, wb) in zip(pieces, want):
        OPS.sgd_([wp], [wg], [wb], [torch.ones(())], [0], **opts)
        assert torch.equal(p[s].cpu().view(torch.int16), wp.view(torch.int16)), s
        assert torch.equal(b[s].cpu().view(torch.int16), wb.view(torch.int16)), s
    del p, g, b
    torch.cuda.empty_cache()


def test_mask_matches_reference_on_device():
    """The gradient mask drawn on the device is the reference's Philox mask (SGD lr=1, g=1: θ moves by
    exactly m/r)."""
    n, r, seed, j, step0 = 100003, 0.5, SEED, 12, 6
    p = torch.zeros(n, device=CUDA)
    OPS.sgd_([p], [torch.ones(n, device=CUDA)], [], [torch.full((), float(step0), device=CUDA)], [j], lr=1.0,
             grad_keep_prob=r, grad_mask_seed=seed)
    mask = ref.keep_mask(seed, (step0 + 1) * 2**24 + j, n, r)
    assert np.array_equal(p.cpu().numpy(), -mask.astype(np.float32) / np.float32(r))


@pytest.mark.parametrize("kind", ["mask", "round", "mask+round"])
@pytest.mark.parametrize("opt", ["sgd", "adagrad", "rmsprop", "adam"])
def test_shards_step_as_the_whole(opt, kind):
    """Note [Shard offsets]: a parameter's shards stepped on the device, each at its offset, equal the whole
    parameter stepped on the CPU, bit for bit, masks and rounding bits included."""
    check_shards(opt, kind, opt + "_", CUDA)


# Errors.

def test_mixed_devices_raise():
    cpu, dev = torch.zeros(4), torch.zeros(4, device=CUDA)
    step_d, step_c = torch.zeros((), device=CUDA), torch.zeros(())
    calls = [
        lambda: OPS.sgd_([dev], [cpu], [], [step_d], [0], lr=0.1),
        lambda: OPS.sgd_([cpu], [dev], [], [step_c], [0], lr=0.1),
        lambda: OPS.sgd_([dev, cpu.clone()], [dev.clone(), dev.clone()], [], [step_d, step_d.clone()], [0, 1],
                         lr=0.1),
        lambda: OPS.sgd_([dev], [dev.clone()], [], [step_c], [0], lr=0.1),
        lambda: OPS.adam_([dev], [dev.clone()], [dev.clone()], [cpu], [], [step_d], [0], lr=0.1),
        lambda: OPS.sgd_([dev], [dev.clone()], [], [step_d], [0], lr=0.1, grad_scale=torch.ones(1)),
        lambda: OPS.sgd_([dev], [dev.clone()], [], [step_d], [0], lr=0.1, found_inf=torch.zeros(1)),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="share one device"):
            call()


def test_bad_input_raises_before_launch():
    dev = torch.zeros(4, device=CUDA)
    step = torch.zeros((), device=CUDA)
    with pytest.raises(RuntimeError, match="grads"):
        OPS.sgd_([dev], [torch.zeros(5, device=CUDA)], [], [step], [0], lr=0.1)
    with pytest.raises(RuntimeError, match="dtype"):
        OPS.sgd_([dev], [torch.zeros(4, device=CUDA, dtype=torch.float64)], [], [step], [0], lr=0.1)
    with pytest.raises(RuntimeError, match="contiguous"):
        OPS.sgd_([torch.zeros(4, 2, device=CUDA).t()], [torch.zeros(2, 4, device=CUDA)], [], [step], [0], lr=0.1)
    with pytest.raises(RuntimeError, match="momentum_buffers"):
        OPS.sgd_([dev], [dev.clone()], [], [step], [0], lr=0.1, momentum=0.9)


# stream_.

@pytest.mark.parametrize("n, off", [(1, 0), (3, 0), (4, 0), (1031, 0), (1031, 1), (2**20 + 3, 2)])
def test_stream_matches_cpu(n, off):
    a = torch.randn(n + off)[off:]
    b = torch.randn(n + off)[off:]
    want = a.clone()
    OPS.stream_(want, b, 0.37)
    da = torch.empty(n + off, device=CUDA)[off:].copy_(a)
    db = torch.empty(n + off, device=CUDA)[off:].copy_(b)
    OPS.stream_(da, db, 0.37)
    assert torch.equal(da.cpu().view(torch.int32), want.view(torch.int32))
