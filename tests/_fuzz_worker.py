"""Hypothesis over the surface of the CPU ops (optimizers with a float or a tensor lr, dropout, stream_), run by
tests/test_bad_input.py in a subprocess so that a crash fails that test instead of killing pytest.

    python tests/_fuzz_worker.py --examples 200 --isas DEFAULT,AVX2,AVX512 [--seed N] [--last-call FILE]

Each example builds a call from random list lengths, shapes, dtypes, layouts (contiguous, transposed,
strided, expanded, offset, sparse), aliasing, steps, indices, shard offsets, AMP tensors, ISA and scalars (NaN, ±inf,
negative, huge), makes an optimizer call through torch.ops or as fusedopt.ops makes it (directly from C++,
Note [Direct calls] in csrc/module.cpp), and accepts exactly two outcomes:
- RuntimeError / ValueError / TypeError, with every tensor passed keeping its bits;
- success, with every step advanced by one (none if found_inf was set and non-zero); for the dropout ops,
  outputs of the input's shape and the inputs unchanged (but dropout_'s own input).
Before each call its description is written to --last-call, so a crash can be traced to its input.
Prints "fuzzed <n> optimizer calls: ..." on success; a falsifying example makes hypothesis raise (exit 1).
"""
import argparse
import collections
import faulthandler
import math
import os
import sys

import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import fusedopt._ext  # noqa: F401  (registers torch.ops.fusedopt.*)
from fusedopt import _C

OPS = torch.ops.fusedopt
STATE_LISTS = {"sgd": 1, "adagrad": 1, "rmsprop": 3, "adam": 3}
GOOD_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
BAD_DTYPES = [torch.int32, torch.int64, torch.complex64, torch.bool, torch.uint8]
SPECIAL = [0.0, -0.0, 1e-3, 0.5, 0.9, 0.999, 1.0, 2.0, -1.0, -1e-8, math.nan, math.inf, -math.inf, 1e300, -1e300,
           5e-324, 1e-45, 3.4e38]
ALLOWED = (RuntimeError, ValueError, TypeError)

scalars = st.one_of(st.sampled_from(SPECIAL), st.floats(allow_nan=True, allow_infinity=True),
                    st.floats(min_value=0, max_value=1))
ints = st.one_of(st.sampled_from([0, 1, 5, -1, 2**24 - 1, 2**24, 2**31, 2**63 - 1, -(2**63)]),
                 st.integers(-(2**64), 2**64))
# Valid ranges of each float option (torch's), from which a well-formed call draws.
VALID = {"lr": (0, 1), "weight_decay": (0, 1), "l1_decay": (0, 1), "grad_keep_prob": (1e-3, 1),
         "momentum": (0, 0.99), "dampening": (0, 1), "lr_decay": (0, 1), "eps": (0, 1e-3), "alpha": (0, 1),
         "beta1": (0, 0.999), "beta2": (0, 0.999)}
FLOAT_OPTIONS = {"sgd": ["momentum", "dampening"], "adagrad": ["lr_decay", "eps"],
                 "rmsprop": ["alpha", "eps", "momentum"], "adam": ["beta1", "beta2", "eps"]}
BOOL_OPTIONS = {"sgd": ["nesterov", "ema_momentum"], "adagrad": [], "rmsprop": ["centered"],
                "adam": ["amsgrad", "eps_inside_sqrt"]}


def used_lists(opt, kw):
    """Which state lists this configuration uses (the rest must be empty)."""
    return {"sgd": [kw.get("momentum", 0) != 0], "adagrad": [True],
            "rmsprop": [True, kw.get("centered", False), kw.get("momentum", 0) > 0],
            "adam": [True, True, kw.get("amsgrad", False)]}[opt]


class Odd:
    """Draws whether to break something, at this example's rate (most examples break little or nothing)."""

    def __init__(self, draw):
        self.draw = draw
        self.rate = draw(st.sampled_from([0, 0, 0, 10, 30, 100, 300]))  # per mille

    def __call__(self):
        # hypothesis favours small integers, so the top of the range is the rare side
        return self.rate > 0 and self.draw(st.integers(0, 999)) >= 1000 - self.rate


def values(draw, shape, dtype):
    """Random normal values with some specials mixed in, in `dtype`."""
    t = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31))),
                    dtype=torch.float64)
    if t.numel() and draw(st.booleans()):
        flat = t.view(-1)
        for _ in range(draw(st.integers(1, 3))):
            flat[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(SPECIAL))
    if dtype.is_complex:
        return t.to(dtype)
    if dtype == torch.bool:
        return t > 0
    if not dtype.is_floating_point:
        return torch.nan_to_num(t, nan=0.0, posinf=7.0, neginf=-7.0).clamp(-100, 100).to(dtype)
    return t.to(dtype)


def tensor(draw, odd, numel, dtype, pool):
    """A tensor of `numel` elements; when odd, in some other layout, or a view of (or the same as) a pooled one."""
    kind = draw(st.sampled_from(["shape2d", "transposed", "strided", "expanded", "offset", "sparse", "alias",
                                 "view_of", "numel_off", "requires_grad", "dtype"])) if odd() else "contiguous"
    if kind == "alias" and pool:
        return draw(st.sampled_from(pool))
    if kind == "view_of" and pool:
        base = draw(st.sampled_from(pool))
        if base.layout == torch.strided and base.dim() == 1 and base.numel() > 1:
            start = draw(st.integers(0, base.numel() - 1))
            return base[start:start + draw(st.integers(0, base.numel()))]
    if kind == "numel_off":
        numel = max(0, numel + draw(st.sampled_from([-1, 1, 5])))
    if kind == "dtype":
        dtype = draw(st.sampled_from(GOOD_DTYPES + BAD_DTYPES))
    t = values(draw, (numel,), dtype)
    if kind == "shape2d" and numel % 5 == 0:  # legal: only the element count must agree
        t = t.view(5, numel // 5)
    elif kind == "transposed" and numel % 5 == 0 and numel > 5:
        t = t.view(numel // 5, 5).t()
    elif kind == "strided":
        t = values(draw, (2 * numel,), dtype)[::2]
    elif kind == "expanded" and numel > 0:
        t = t[:1].expand(numel)
    elif kind == "offset":  # legal: unaligned
        t = values(draw, (numel + 3,), dtype)[3:]
    elif kind == "sparse" and dtype != torch.bool:
        t = t.to_sparse()
    elif kind == "requires_grad" and (dtype.is_floating_point or dtype.is_complex):
        t.requires_grad_(True)
    return t


def tensor_list(draw, odd, numels, dtype, pool, used=True):
    n = len(numels)
    length = n if used else 0
    if odd():
        length = draw(st.sampled_from([max(n - 1, 0), n + 1, 0, n]))
    out = []
    for j in range(length):
        t = tensor(draw, odd, numels[j] if j < n else 3, dtype, pool)
        out.append(t)
        pool.append(t)
    if out and odd() and odd():
        out[draw(st.integers(0, len(out) - 1))] = None  # not a Tensor: the binding's TypeError
    return out


def step_tensor(draw, odd, pool):
    kind = draw(st.sampled_from(["dtype", "shape", "value", "alias"])) if odd() else "good"
    if kind == "alias" and pool:
        base = draw(st.sampled_from(pool))
        if base.layout == torch.strided and base.numel() >= 1 and base.dim() >= 1:
            return base.view(-1)[0] if base.is_contiguous() else base
    dtype = draw(st.sampled_from(GOOD_DTYPES + [torch.int64])) if kind == "dtype" else \
        draw(st.sampled_from([torch.float32, torch.float64]))
    shape = draw(st.sampled_from([(2,), (0,), (1, 1, 2)])) if kind == "shape" else draw(st.sampled_from([(), (1,)]))
    value = draw(st.sampled_from([-1.0, 0.5, math.nan, math.inf, 1e15, 1e20, 2.0**53])) if kind == "value" else \
        float(draw(st.sampled_from([0, 1, 2, 10, 1000, 2**24 + 1])))
    return torch.full(shape, value, dtype=torch.float64).to(dtype)


def amp_tensor(draw, odd):
    kind = draw(st.sampled_from(["none", "none", "good", "zero"]))
    if odd():
        kind = draw(st.sampled_from(["dtype", "shape", "special"]))
    if kind == "none":
        return None
    if kind == "zero":
        return torch.zeros(1)
    dtype = draw(st.sampled_from([torch.float64, torch.int32, torch.float16])) if kind == "dtype" else torch.float32
    shape = draw(st.sampled_from([(0,), (2,), (1, 2)])) if kind == "shape" else draw(st.sampled_from([(), (1,)]))
    value = draw(st.sampled_from(SPECIAL)) if kind == "special" else draw(st.sampled_from([1.0, 2.0**16, 3.0]))
    return torch.full(shape, value, dtype=torch.float64).to(dtype)


def optimizer_call(draw, isas):
    odd = Odd(draw)
    opt = draw(st.sampled_from(list(STATE_LISTS)))
    kw = {}
    for name in ["lr", "weight_decay", "l1_decay", "grad_keep_prob"] + FLOAT_OPTIONS[opt]:
        if name == "lr" or draw(st.booleans()):
            kw[name] = draw(scalars) if odd() else draw(st.floats(*VALID[name]))
    for name in ["decoupled_weight_decay", "maximize", "stochastic_rounding"] + BOOL_OPTIONS[opt]:
        if draw(st.booleans()):
            kw[name] = draw(st.booleans())
    if draw(st.booleans()):
        kw["grad_mask_seed"] = draw(ints) if odd() else draw(st.integers(-(2**63), 2**63 - 1))
    n = 0 if odd() else draw(st.integers(1, 4))
    numels = [draw(st.sampled_from([7, 35, 257, 1, 5, 70, 0])) for _ in range(n)]
    dtype = draw(st.sampled_from(BAD_DTYPES)) if odd() else draw(st.sampled_from(GOOD_DTYPES))
    pool = []
    params = tensor_list(draw, odd, numels, dtype, pool)
    grads = tensor_list(draw, odd, numels, dtype, pool)
    # the state in the params' dtype, float32 (Note [State dtype]: valid for half params) or another
    state_dtype = draw(st.sampled_from([dtype, dtype, torch.float32] + GOOD_DTYPES))
    states = [tensor_list(draw, odd, numels, state_dtype, pool, used) for used in used_lists(opt, kw)]
    steps = [step_tensor(draw, odd, pool) for _ in range(n + 1 if odd() else n)]
    indices = [draw(ints) if odd() else j for j in range(n + 1 if odd() else n)]
    if draw(st.booleans()):  # where each tensor starts in its whole parameter (Note [Shard offsets])
        kw["shard_offsets"] = [draw(ints) if odd() else draw(st.integers(0, 2**40))
                               for _ in range(n + 1 if odd() else n)]
    kw["grad_scale"], kw["found_inf"] = amp_tensor(draw, odd), amp_tensor(draw, odd)
    isa = draw(st.sampled_from(["", "bogus", "avx2"])) if odd() else draw(st.sampled_from(isas))
    op = opt + "_"
    overload = draw(st.integers(0, 3))
    if overload == 0:  # the .tensor_lr overload (Note [Tensor lr])
        op += ".tensor_lr"
        kw["lr"] = lr_tensor(draw, odd, kw["lr"])
    elif overload == 1 and opt == "adam":  # lr and betas as tensors (Note [Tensor betas])
        op += ".tensor_betas"
        for name, default in [("lr", None), ("beta1", 0.9), ("beta2", 0.999)]:
            kw[name] = lr_tensor(draw, odd, kw.get(name, default))
    return op, [params, grads, *states, steps, indices], kw, isa


def lr_tensor(draw, odd, lr):
    kind = draw(st.sampled_from(["dtype", "shape", "sparse"])) if odd() else "good"
    dtype = draw(st.sampled_from([torch.int64, torch.float16, torch.bool])) if kind == "dtype" else \
        draw(st.sampled_from([torch.float32, torch.float64]))
    shape = draw(st.sampled_from([(0,), (2,), (1, 2)])) if kind == "shape" else draw(st.sampled_from([(), (1,)]))
    t = torch.full(shape, lr, dtype=torch.float64).nan_to_num(0.0, 7.0, -7.0).to(dtype) \
        if not dtype.is_floating_point else torch.full(shape, lr, dtype=torch.float64).to(dtype)
    return t.to_sparse() if kind == "sparse" and t.dim() > 0 else t


DROPOUT_OPS = ["dropout", "dropout_", "dropout_backward", "bias_dropout_add", "bias_dropout_add_backward",
               "dropout_keep_bits"]


def dropout_call(draw, isas):
    """A dropout op's arguments: input (any layout), bias and residual where the op takes them, p, draw."""
    odd = Odd(draw)
    op = draw(st.sampled_from(DROPOUT_OPS))
    dtype = draw(st.sampled_from(BAD_DTYPES)) if odd() else draw(st.sampled_from(GOOD_DTYPES))
    rows, h = draw(st.sampled_from([0, 1, 3, 17])), draw(st.sampled_from([0, 1, 5, 64, 67]))
    pool = []
    x = tensor(draw, odd, rows * h, dtype, pool)
    if x.layout == torch.strided and x.dim() == 1 and x.is_contiguous() and x.numel() == rows * h and not odd():
        x = x.view(rows, h)
        if op in ("dropout", "dropout_", "dropout_backward") and draw(st.booleans()):
            x = x.t()  # dense, not contiguous: walked through its strides (Note [Strided dropout])
    args = [x]
    if op == "bias_dropout_add":
        args.append(tensor(draw, odd, h, dtype, pool))
        residual = tensor(draw, odd, rows * h, dtype, pool)
        if residual.layout == torch.strided and residual.is_contiguous() and residual.numel() == rows * h:
            residual = residual.view(rows, h)
        args.append(residual)
    p = draw(scalars) if odd() else draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    draw_t = torch.tensor([draw(st.integers(-(2**63), 2**63 - 1)), draw(st.integers(-(2**63), 2**63 - 1))])
    if odd():
        draw_t = draw(st.sampled_from([draw_t.float(), draw_t[:1], torch.zeros(3, dtype=torch.int64),
                                       draw_t.view(2, 1)]))
    isa = draw(st.sampled_from(["", "bogus"])) if odd() else draw(st.sampled_from(isas))
    return op, args + [p, draw_t], isa


def run_dropout(op, args, isa, last_call):
    if last_call:
        with open(last_call, "w") as f:
            f.write(f"FUSEDOPT_CPU_ISA={isa!r} torch.ops.fusedopt.{op}"
                    f"({[describe_tensor(a) for a in args]})\n")
            f.flush()
            os.fsync(f.fileno())
    os.environ["FUSEDOPT_CPU_ISA"] = isa
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    before = [bits(x) for x in tensors]
    try:
        out = getattr(OPS, op)(*args)
    except ALLOWED as e:
        for j, (x, b) in enumerate(zip(tensors, before)):
            assert torch.equal(bits(x), b), f"a failed {op} modified its argument {j}"
        return f"{op}: " + type(e).__name__ + ": " + str(e).split("\n")[0][:150]
    x = args[0]
    for j, (t, b) in enumerate(zip(tensors, before)):
        assert (op == "dropout_" and j == 0) or torch.equal(bits(t), b), f"{op} modified its argument {j}"
    if op in ("dropout", "dropout_", "dropout_backward"):  # any layout: the values of a contiguous input
        x0 = before[0].view(x.dtype).view(x.shape)  # x's values in logical order, contiguous
        got = x if op == "dropout_" else out
        assert torch.equal(bits(got), bits(OPS.dropout(x0, *args[1:]))), f"{op} differs from a contiguous input"
    if op == "dropout":  # the CUDA bodies, grid-emulated (a transposed x: Note [Strided CUDA dropout])
        for wide in (False, True):
            emu = OPS._gridemu_dropout(*args, 3, wide)
            assert torch.equal(bits(emu), bits(out)), f"the grid emulation differs (wide_index={wide})"
    if op == "dropout_keep_bits":
        assert out.shape == ((x.numel() + 7) // 8,) and out.dtype == torch.uint8
    elif op == "bias_dropout_add_backward":
        assert out[0].shape == x.shape and out[1].shape == x.shape[-1:]
    elif op != "dropout_":
        assert out.shape == x.shape and out.dtype == x.dtype
    return f"{op}: ran"


def describe_tensor(x):
    if not isinstance(x, torch.Tensor):
        return repr(x)
    return (f"T({x.dtype}, {tuple(x.shape)}, stride={x.stride() if x.layout == torch.strided else 'sparse'}, "
            f"offset={x.storage_offset() if x.layout == torch.strided else 0}, "
            f"ptr={x.data_ptr() if x.layout == torch.strided else 0:#x})")


def describe(op, args, kw, isa):
    t = describe_tensor
    lists = ", ".join("[" + ", ".join(t(x) for x in a) + "]" for a in args[:-1])
    opts = ", ".join(f"{k}={t(v)}" for k, v in kw.items())
    return f"FUSEDOPT_CPU_ISA={isa!r} torch.ops.fusedopt.{op}({lists}, {args[-1]!r}, {opts})"


def bits(x):
    if not isinstance(x, torch.Tensor):
        return None
    x = x.detach()
    x = x.to_dense() if x.layout != torch.strided else x
    return x.reshape(-1).clone(memory_format=torch.contiguous_format).view(torch.uint8)


def run(op, args, kw, isa, last_call, direct):
    if last_call:
        with open(last_call, "w") as f:
            f.write(("direct " if direct else "") + describe(op, args, kw, isa) + "\n")
            f.flush()
            os.fsync(f.fileno())
    os.environ["FUSEDOPT_CPU_ISA"] = isa
    tensors = [x for a in args[:-1] for x in a] + [kw["grad_scale"], kw["found_inf"], kw["lr"]]
    before = [bits(x) for x in tensors]
    steps_before = [s.detach().clone() if isinstance(s, torch.Tensor) else None for s in args[-2]]
    try:
        # As fusedopt.ops calls them: directly from C++ (Note [Direct calls] in csrc/module.cpp), or through
        # torch.ops where the direct call declines.
        if not direct or _C._call(op, tuple(args), dict(kw)) is NotImplemented:
            name, _, overload = op.partition(".")
            getattr(getattr(OPS, name), overload or "default")(*args, **kw)
    except ALLOWED as e:
        for j, (x, b) in enumerate(zip(tensors, before)):
            assert b is None or torch.equal(bits(x), b), f"a failed call modified tensor {j}"
        return op + ": " + type(e).__name__ + ": " + str(e).split("\n")[0][:150]
    # with no parameter the op reads nothing, found_inf included
    skipped = bool(args[-2]) and kw["found_inf"] is not None and kw["found_inf"].item() != 0
    for s, b in zip(args[-2], steps_before):
        expected = b if skipped else b + 1
        assert torch.equal(s, expected), f"step {b} became {s}, expected {expected}"
    return op + ": ran"


def stream_call(draw):
    numel = draw(st.sampled_from([0, 1, 7, 64, 1000]))
    pool = []
    odd = Odd(draw)
    a = tensor(draw, odd, numel, torch.float32, pool)
    pool.append(a)
    b = tensor(draw, odd, numel, torch.float32, pool)
    return a, b, draw(scalars)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--isas", default="DEFAULT")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--last-call", default=None)
    a = parser.parse_args()
    faulthandler.enable()
    isas = a.isas.split(",")
    outcomes = collections.Counter()

    @settings(max_examples=a.examples, derandomize=a.seed is None, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(st.data())
    def fuzz(data):
        which = data.draw(st.integers(0, 19), label="op family")
        if which == 0:
            x, y, s = stream_call(data.draw)
            if a.last_call:
                with open(a.last_call, "w") as f:
                    f.write(f"torch.ops.fusedopt.stream_({describe_tensor(x)}, {describe_tensor(y)}, {s!r})\n")
            try:
                OPS.stream_(x, y, s)
            except ALLOWED:
                pass
            return
        if which <= 5:
            op, args, isa = dropout_call(data.draw, isas)
            outcomes[run_dropout(op, args, isa, a.last_call)] += 1
            return
        op, args, kw, isa = optimizer_call(data.draw, isas)
        outcomes[run(op, args, kw, isa, a.last_call, data.draw(st.booleans(), label="direct call"))] += 1

    if a.seed is not None:
        fuzz = seed(a.seed)(fuzz)
    fuzz()
    total = sum(outcomes.values())
    ran = sum(count for what, count in outcomes.items() if what.endswith("ran"))
    print(f"fuzzed {total} op calls: {ran} ran, {total - ran} raised")
    for what, count in outcomes.most_common():
        print(f"{count:5d}  {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
