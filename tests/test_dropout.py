"""Dropout (DESIGN.md §6): Philox known answers, the kernels' masks against the numpy reference bit for bit, the
CUDA bodies under grid emulation against the CPU kernels, and the Python API (autograd, torch.compile, errors)."""
import math

import numpy as np
import pytest
import torch

import fusedopt.nn as fnn
import fusedopt.nn.functional as F
import fusedopt.reference as ref
from conftest import SUPPORTED_ISAS

OPS = torch.ops.fusedopt
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SIZES = [1, 7, 63, 64, 65, 127, 4099]
KEEPS = [0.0, 0.1, 0.5, 0.9, 1.0]  # r = 1 - p
# Offsets whose words carry: low word all ones, just past it, the top of the range.
OFFSETS = [0, 2**32 - 1, 2**32, 2**64 - 1]
SEED = 0x9E37_79B9_7F4A_7C15


def _i64(v):
    v %= 2**64
    return v - 2**64 if v >= 2**63 else v


def draw(seed=SEED, offset=0):
    return torch.tensor([_i64(seed), _i64(offset)], dtype=torch.int64)


def ref_mask(seed, offset, n, p):
    return torch.from_numpy(ref.keep_mask(seed, offset, n, 1.0 - p))


def opmath(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def expected_dropout(x, p, seed, offset):
    """x·m in op-math, m = keep ? (S)(1/(1-p)) : 0, rounded once (Note [Dropout formula])."""
    s = opmath(x.dtype)
    scale = torch.tensor(1.0 / (1.0 - p) if p < 1 else 0.0, dtype=torch.float64).to(s)
    m = torch.where(ref_mask(seed, offset, x.numel(), p).reshape(x.shape), scale, torch.zeros((), dtype=s))
    return (x.to(s) * m).to(x.dtype), m


def rand(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def assert_bitwise(a, b, what=""):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), what


def misaligned(t):
    """t's values in storage that starts one element past an allocation (not 16-byte aligned)."""
    base = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = base[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


# ---------------------------------------------------------------------------------------------------------------
# Philox: known answers (Random123 kat_vectors) and arbitrary counters, through every ISA's vector rounds.

KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("counter, key, words", KAT)
def test_philox_known_answers(isa, counter, key, words, use_isa):
    use_isa(isa)
    rows = 37  # two 16-lane vectors and a scalar tail
    out = OPS._philox(torch.tensor([counter] * rows, dtype=torch.int64), _i64(key[0] | key[1] << 32))
    assert out.tolist() == [list(words)] * rows


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
def test_philox_matches_reference(isa, use_isa):
    use_isa(isa)
    rng = np.random.default_rng(1)
    ctr = rng.integers(0, 2**32, size=(1001, 4), dtype=np.uint64)
    ctr[::7] = 0xFFFFFFFF  # carries in every word
    for seed in [0, SEED, 2**64 - 1]:
        out = OPS._philox(torch.from_numpy(ctr.astype(np.int64)), _i64(seed))
        want = np.stack(ref.philox4x32_10(*ctr.T, seed & 0xFFFFFFFF, seed >> 32), axis=-1)
        np.testing.assert_array_equal(out.numpy(), want.astype(np.int64))


def test_philox_rejects_bad_counters():
    with pytest.raises(RuntimeError, match=r"\[n, 4\]"):
        OPS._philox(torch.zeros(3, 3, dtype=torch.int64), 0)
    with pytest.raises(RuntimeError, match="2\\^32"):
        OPS._philox(torch.full((1, 4), 2**32, dtype=torch.int64), 0)


# ---------------------------------------------------------------------------------------------------------------
# The kernels' masks and outputs against the reference, bit for bit.

@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("n", SIZES + [278011])
def test_keep_bits_are_the_reference_mask(isa, n, use_isa):
    use_isa(isa)
    for r in KEEPS:
        for offset in OFFSETS:
            for seed in [SEED, 2**64 - 1]:
                bits = OPS.dropout_keep_bits(torch.empty(n), 1.0 - r, draw(seed, offset))
                want = np.packbits(ref.keep_mask(seed, offset, n, r), bitorder="little")
                np.testing.assert_array_equal(bits.numpy(), want, err_msg=f"r={r} offset={offset:#x}")


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES + [278011])
def test_dropout_is_the_reference_mask(isa, dtype, n, use_isa):
    use_isa(isa)
    x = rand(n, dtype)
    for p in [1.0 - r for r in KEEPS]:
        for offset in [OFFSETS[1], OFFSETS[3]]:
            want, _ = expected_dropout(x, p, SEED, offset)
            assert_bitwise(OPS.dropout(x, p, draw(SEED, offset)), want, f"p={p} offset={offset:#x}")
            assert_bitwise(OPS.dropout_backward(x, p, draw(SEED, offset)), want, f"backward p={p}")


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_outputs_stream_the_same_values(isa, dtype, use_isa):
    """Outputs of 16 MiB and more are written with non-temporal stores (Note [Streaming stores])."""
    use_isa(isa)
    n = (16 << 20) // dtype.itemsize + 67
    x, res, bias = rand(n, dtype, 1), rand(n, dtype, 2), rand(n, dtype, 3)
    want, m = expected_dropout(x, 0.3, SEED, 9)
    assert_bitwise(OPS.dropout(x, 0.3, draw(SEED, 9)), want)
    s = opmath(dtype)
    assert_bitwise(OPS.bias_dropout_add(x, bias, res, 0.3, draw(SEED, 9)),
                   (res.to(s) + (x.to(s) + bias.to(s)) * m).to(dtype))


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("stream", [False, True])
def test_half_types_round_every_value(isa, dtype, stream, use_isa):
    """All 2^16 bit patterns of the type (zeros, subnormals, the largest values, ±inf, NaNs), 67 more in the
    scalar tail, or, tiled, enough to stream (Note [Streaming stores]); scaled by 1.5 (p = 1/3: x·1.5 is exact
    in fp32 and, for an odd significand, a tie that round-to-nearest-even decides). Every result is the op-math
    product rounded once to the type; a NaN where the product is one."""
    use_isa(isa)
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    reps = (16 << 20) // (2 * patterns.numel()) + 1 if stream else 1
    x = torch.cat([patterns.repeat(reps), patterns[:67]])
    for op in ["dropout", "bias_dropout_add"]:
        if op == "dropout":
            got = OPS.dropout(x, 1 / 3, draw(SEED, 3))
            want, m = expected_dropout(x, 1 / 3, SEED, 3)
        else:  # zero bias and residual: the same products, through bias_dropout_add's body
            zero = torch.zeros_like(x)
            got = OPS.bias_dropout_add(x, zero, zero, 1 / 3, draw(SEED, 3))
            _, m = expected_dropout(x, 1 / 3, SEED, 3)
            want = (0.0 + (x.float() + 0.0) * m).to(dtype)
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan), op
        assert_bitwise(got[~nan], want[~nan], op)


def test_fp32_is_torch_native_dropout_given_the_mask():
    """(x·mask)·scale, torch's CPU native_dropout, with our mask: the same bits."""
    x = rand(4099, torch.float32)
    for p in [0.1, 0.3, 0.5, 0.9]:
        mask = ref_mask(SEED, 5, x.numel(), p).float()
        assert_bitwise(OPS.dropout(x, p, draw(SEED, 5)), x.mul(mask).mul_(1.0 / (1.0 - p)))


def test_dropped_elements_follow_torch_on_signed_zeros_and_inf():
    x = torch.tensor([-1.0, 2.0, float("inf"), float("-inf"), float("nan")] * 20)
    y = OPS.dropout(x, 0.5, draw(SEED, 1))
    keep = ref_mask(SEED, 1, x.numel(), 0.5)
    want = x * torch.where(keep, 2.0, 0.0)  # x·0: -0 for negatives, NaN for ±inf
    assert_bitwise(y, want)
    assert_bitwise(OPS.dropout(x, 1.0, draw(SEED, 1)), x * 0.0)


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 16), (9, 64), (33, 17), (70, 100), (2, 3, 129)])
def test_bias_dropout_add_is_the_composite(isa, dtype, shape, use_isa):
    """residual + (x + bias)·m in op-math, rounded once; for fp32 bit for bit residual + F.dropout(x + bias)."""
    use_isa(isa)
    x, res, bias = rand(shape, dtype, 1), rand(shape, dtype, 2), rand(shape[-1], dtype, 3)
    s = opmath(dtype)
    for p in [0.0, 0.25, 0.5, 1.0]:
        _, m = expected_dropout(x, p, SEED, 2**32 - 1)
        want = (res.to(s) + (x.to(s) + bias.to(s)) * m).to(dtype)
        assert_bitwise(OPS.bias_dropout_add(x, bias, res, p, draw(SEED, 2**32 - 1)), want, f"p={p}")


def _dbias_in_order(d):
    """dbias in the fixed order of Note [dbias row blocks], d being dx in op-math, [rows, h]."""
    rows = d.shape[0]
    per = max(32, -(-rows // 1024))
    total = torch.zeros(d.shape[1], dtype=d.dtype)
    for b0 in range(0, rows, per):
        acc = torch.zeros(d.shape[1], dtype=d.dtype)
        for r in range(b0, min(rows, b0 + per)):
            acc = acc + d[r]
        total = total + acc
    return total


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 16), (40, 3), (70, 100), (2, 3, 129), (100, 2050)])
def test_bias_dropout_add_backward(isa, dtype, shape, use_isa):
    use_isa(isa)
    g = rand(shape, dtype, 4)
    p = 0.3
    want_dx, m = expected_dropout(g, p, 77, 12)
    dx, dbias = OPS.bias_dropout_add_backward(g, p, draw(77, 12))
    assert_bitwise(dx, want_dx)
    d = (g.to(opmath(dtype)) * m).reshape(-1, shape[-1])
    assert_bitwise(dbias, _dbias_in_order(d).to(dtype))
    torch.testing.assert_close(dbias.double(), d.double().sum(0).to(dtype).double(),
                               rtol=1e-12 if dtype == torch.float64 else 1e-2, atol=1e-5 * d.shape[0])


# ---------------------------------------------------------------------------------------------------------------
# Grid emulation: the CUDA bodies (dropout_body.h) on the host, over the CUDA launch plan.

GRIDS = [1, 3, 100000]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 5, 64, 4099, 278011])
@pytest.mark.parametrize("mis", [False, True])
def test_gridemu_dropout(dtype, n, mis):
    x = rand(n, dtype)
    x = misaligned(x) if mis else x
    for grid in GRIDS:
        for p in [0.0, 0.4, 1.0]:
            want = OPS.dropout(x, p, draw(SEED, 2**32 - 1))
            assert_bitwise(OPS._gridemu_dropout(x, p, draw(SEED, 2**32 - 1), grid), want, f"grid={grid} p={p}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 8), (33, 16), (9, 17), (300, 64), (2, 3, 130)])
@pytest.mark.parametrize("mis", [False, True])
def test_gridemu_bias_dropout_add(dtype, shape, mis):
    x, res, bias = rand(shape, dtype, 1), rand(shape, dtype, 2), rand(shape[-1], dtype, 3)
    if mis:
        x, res, bias = misaligned(x), misaligned(res), misaligned(bias)
    for grid in GRIDS:
        want = OPS.bias_dropout_add(x, bias, res, 0.3, draw(5, 6))
        assert_bitwise(OPS._gridemu_bias_dropout_add(x, bias, res, 0.3, draw(5, 6), grid), want, f"grid={grid}")
        dx, db = OPS.bias_dropout_add_backward(x, 0.3, draw(5, 6))
        edx, edb = OPS._gridemu_bias_dropout_add_backward(x, 0.3, draw(5, 6), grid)
        assert_bitwise(edx, dx, f"dx grid={grid}")
        assert_bitwise(edb, db, f"dbias grid={grid}")


@pytest.mark.parametrize("n", [1, 9, 31, 32, 33, 64, 4099, 278011])
def test_gridemu_keep_bits(n):
    for grid in GRIDS:
        for p in [0.0, 0.5, 1.0]:
            want = OPS.dropout_keep_bits(torch.empty(n), p, draw(SEED, 2**64 - 1))
            assert torch.equal(OPS._gridemu_dropout_keep_bits(torch.empty(n), p, draw(SEED, 2**64 - 1), grid), want)


def test_gridemu_dbias_with_many_row_blocks():
    """More rows than 1024 blocks of 32: the rows per block grow, the order stays fixed."""
    g = rand((40000, 3), torch.float32)
    dx, db = OPS.bias_dropout_add_backward(g, 0.5, draw(1, 2))
    edx, edb = OPS._gridemu_bias_dropout_add_backward(g, 0.5, draw(1, 2), 7)
    assert_bitwise(edx, dx)
    assert_bitwise(edb, db)
    _, m = expected_dropout(g, 0.5, 1, 2)
    assert_bitwise(db, _dbias_in_order(g * m))


# ---------------------------------------------------------------------------------------------------------------
# Statistics, threads, reproducibility.

@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_within_five_sigma(p):
    n = 1 << 22
    kept = int(torch.count_nonzero(F.dropout(torch.ones(n), p, seed=12345)))
    r = 1.0 - p
    assert abs(kept - n * r) <= 5 * math.sqrt(n * r * (1 - r))


def test_results_do_not_depend_on_the_thread_count():
    x, res, bias = rand((700, 1500), torch.float32, 1), rand((700, 1500), torch.float32, 2), rand(1500, torch.float32)
    outs = []
    for threads in [1, 2, 3]:
        torch.set_num_threads(threads)
        outs.append([OPS.dropout(x, 0.5, draw(1, 2)), OPS.bias_dropout_add(x, bias, res, 0.5, draw(1, 2)),
                     *OPS.bias_dropout_add_backward(x, 0.5, draw(1, 2)), OPS.dropout_keep_bits(x, 0.5, draw(1, 2))])
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert_bitwise(a, b)


def test_manual_seed_makes_runs_reproducible():
    x = torch.randn(10, 100)
    d = fnn.Dropout(0.5)

    def run():
        torch.manual_seed(7)
        return d(x), d(x), F.bias_dropout_add(x, x[0], x.flip(0), 0.5), torch.rand(1)

    a, b = run(), run()
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert not torch.equal(a[0], a[1])  # each call draws afresh


def test_explicit_seed_and_offset_pick_the_mask():
    x = torch.randn(4099)
    y = F.dropout(x, 0.3, seed=2**64 - 5, offset=2**63)
    assert_bitwise(y, expected_dropout(x, 0.3, 2**64 - 5, 2**63)[0])
    assert torch.equal(F.dropout(x, 0.3, seed=-5, offset=-(2**63)), y)  # the same 64-bit words
    assert_bitwise(F.dropout(x, 0.3, seed=11), expected_dropout(x, 0.3, 11, 0)[0])  # offset defaults to 0


NON_CONTIGUOUS = [lambda b, t: b.t(), lambda b, t: b[:, ::3], lambda b, t: b[5:, 7:50],
                  lambda b, t: b[:1].expand(30, 70), lambda b, t: t.to(memory_format=torch.channels_last),
                  lambda b, t: t.permute(2, 0, 3, 1), lambda b, t: t.to(memory_format=torch.channels_last)[:, 1:4]]


@pytest.mark.parametrize("view", range(len(NON_CONTIGUOUS)))
def test_mask_follows_the_logical_index_and_the_output_has_torchs_strides(view):
    x = NON_CONTIGUOUS[view](rand((40, 70), torch.float32), rand((3, 5, 7, 9), torch.float32))
    assert not x.is_contiguous()
    y = F.dropout(x, 0.4, seed=3, offset=9)
    assert y.stride() == torch.nn.functional.dropout(x, 0.4).stride()  # x's where x is dense, else contiguous
    assert_bitwise(y, F.dropout(x.contiguous(), 0.4, seed=3, offset=9))
    dx = OPS.dropout_backward(x, 0.4, draw(3, 9))  # the same map, the same layout rule
    assert dx.stride() == y.stride()
    assert_bitwise(dx, y)
    compiled = torch.compile(lambda t: F.dropout(t, 0.4, seed=3, offset=9), fullgraph=True)(x)
    assert compiled.stride() == y.stride()
    assert_bitwise(compiled, y)


def test_mask_does_not_depend_on_the_shape():
    base = rand((40, 70), torch.float32)
    assert_bitwise(F.dropout(base, 0.4, seed=3).reshape(-1), F.dropout(base.reshape(-1), 0.4, seed=3))


def test_keep_bits_wrapper_and_unpack():
    x = torch.empty(3, 1001)
    bits = F.dropout_keep_bits(x, 0.25, seed=4, offset=2**32)
    assert bits.dtype == torch.uint8 and bits.shape == (math.ceil(x.numel() / 8),)
    keep = F.unpack_keep_bits(bits, x.numel())
    assert torch.equal(keep, ref_mask(4, 2**32, x.numel(), 0.25))
    y = F.dropout(torch.ones_like(x), 0.25, seed=4, offset=2**32)
    assert torch.equal(y.reshape(-1) != 0, keep)


# ---------------------------------------------------------------------------------------------------------------
# The Python API: torch semantics, autograd, dtypes, compile.

def test_eval_mode_is_the_identity():
    x = torch.randn(5, 6)
    assert F.dropout(x, 0.5, training=False) is x
    d = fnn.Dropout(0.3).eval()
    assert d(x) is x
    b, r = torch.randn(6), torch.randn(5, 6)
    assert torch.equal(F.bias_dropout_add(x, b, r, 0.5, training=False), r + (x + b))
    assert repr(fnn.Dropout(0.3)) == "Dropout(p=0.3, inplace=False)"


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), float("inf")])
def test_p_is_validated_like_torch(p):
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        F.dropout(torch.ones(3), p)
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        F.bias_dropout_add(torch.ones(3), torch.ones(3), torch.ones(3), p)
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        fnn.Dropout(p)
    with pytest.raises(RuntimeError, match="dropout probability has to be between 0 and 1"):
        OPS.dropout(torch.ones(3), p, draw())
    with pytest.raises(TypeError):
        F.dropout(torch.ones(3), "0.5")


def test_p_zero_and_one():
    x = torch.randn(1000)
    y = F.dropout(x, 0.0)
    assert y is x  # as torch's: no pass over memory, nothing drawn
    assert torch.equal(OPS.dropout(x, 0.0, draw()), x)  # the op itself still computes x·1
    assert torch.equal(F.dropout(x, 1.0), x * 0.0)
    z = torch.randn(1000, requires_grad=True)
    F.dropout(z, 1.0).sum().backward()
    assert torch.equal(z.grad, torch.zeros(1000))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_autograd_regenerates_the_mask(dtype):
    x = rand((33, 65), dtype).requires_grad_()
    y = F.dropout(x, 0.3, seed=8, offset=1)
    g = rand((33, 65), dtype, 5)
    y.backward(g)
    assert_bitwise(y.detach(), expected_dropout(x.detach(), 0.3, 8, 1)[0])
    assert_bitwise(x.grad, expected_dropout(g, 0.3, 8, 1)[0])

    xb, b, r = (rand((9, 65), dtype, k).requires_grad_() for k in range(3))
    b = b[0].detach().clone().requires_grad_()
    out = F.bias_dropout_add(xb, b, r, 0.3, seed=8)
    gb = rand((9, 65), dtype, 6)
    out.backward(gb)
    dx, db = OPS.bias_dropout_add_backward(gb, 0.3, draw(8, 0))
    assert_bitwise(xb.grad, dx)
    assert_bitwise(b.grad, db)
    assert_bitwise(r.grad, gb)


def test_gradcheck_float64():
    x = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)
    r = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    f = lambda t: F.dropout(t, 0.3, seed=3, offset=4)  # noqa: E731
    g = lambda *a: F.bias_dropout_add(*a, 0.3, seed=3, offset=4)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))
    assert torch.autograd.gradcheck(g, (x, b, r))
    assert torch.autograd.gradgradcheck(g, (x, b, r))
    assert torch.autograd.gradcheck(f, (x.detach().t().requires_grad_(),))  # non-contiguous input


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 63, 4099, 278011, 5 * 2**20 + 3])
def test_inplace_is_the_out_of_place_result(isa, dtype, n, use_isa):
    use_isa(isa)
    x = rand((n,), dtype)
    want = F.dropout(x, 0.3, seed=7, offset=2**32 - 1)
    ptr = x.data_ptr()
    assert F.dropout(x, 0.3, inplace=True, seed=7, offset=2**32 - 1) is x
    assert x.data_ptr() == ptr
    assert_bitwise(x, want)


# Dense layouts that are not contiguous, walked through their strides (Note [Strided dropout]; their stride-1
# dimension is 64 bytes or more in every dtype): rows (the stride-1 dimension last) and tiles (it is not), with
# 64-wide tiles cut short (33, 40, 70, 130), runs of r drawn up front (< 1024) and along the walk (1500, 2000,
# 2145, 5000: Note [Strided walk]), size-1 dimensions, and dimensions that merge. Rows whose starts are 16-byte
# aligned take the CUDA bodies' 16-byte path (heads_merged, long_rows; rows_66 in float64 only, with a short last
# unit), rows_offset is not aligned at all. Shorter stride-1 dimensions are copied (NON_CONTIGUOUS above).
STRIDED = {
    "channels_last_40ch": lambda d: rand((2, 40, 4, 5), d).to(memory_format=torch.channels_last),
    "channels_last_70ch": lambda d: rand((3, 70, 9, 13), d).to(memory_format=torch.channels_last),
    "channels_last_130ch": lambda d: rand((2, 130, 33, 65), d).to(memory_format=torch.channels_last),
    "channels_last_3d": lambda d: rand((2, 33, 3, 4, 7), d).to(memory_format=torch.channels_last_3d),
    "t_999": lambda d: rand((999, 77), d).t(),
    "t_1500": lambda d: rand((1500, 130), d).t(),
    "t_5000": lambda d: rand((5000, 40), d).t(),  # two r blocks: drawn along the walk, then up front
    "t_unsqueezed": lambda d: rand((40, 50), d).t()[None],
    "heads": lambda d: rand((4, 37, 5, 67), d).transpose(1, 2),
    "heads_merged": lambda d: rand((6, 4, 8, 80), d).permute(1, 0, 2, 3),
    "long_rows": lambda d: rand((3, 2, 40000), d).transpose(0, 1),  # rows cut into pieces (Note [Strided walk])
    "rows_66": lambda d: rand((3, 4, 66), d).transpose(0, 1),
    "rows_offset": lambda d: rand((6 * 4 * 8 * 80 + 1,), d)[1:].view(6, 4, 8, 80).permute(1, 0, 2, 3),
    "permuted": lambda d: rand((3, 5, 7, 40), d).permute(2, 0, 3, 1),
    "size_one_dims": lambda d: rand((1, 7, 1, 33), d).permute(3, 2, 1, 0),
    "narrow_tiles": lambda d: rand((2, 2000, 33), d).transpose(1, 2),
    "three_r_dims": lambda d: rand((2, 3, 4, 40), d).permute(3, 0, 2, 1),  # r over 3 dimensions that do not merge
}


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(STRIDED))
def test_strided_input_is_the_reference_mask(isa, dtype, layout, use_isa):
    use_isa(isa)
    x = STRIDED[layout](dtype)
    assert not x.is_contiguous() and torch.empty_like(x).stride() == x.stride()  # dense
    for p in [0.0, 0.3, 1.0]:
        want, _ = expected_dropout(x.contiguous(), p, SEED, OFFSETS[1])
        for y in [OPS.dropout(x, p, draw(SEED, OFFSETS[1])), OPS.dropout_backward(x, p, draw(SEED, OFFSETS[1]))]:
            assert y.stride() == x.stride()
            assert_bitwise(y.contiguous(), want, f"p={p}")
        z = x.clone()
        OPS.dropout_(z, p, draw(SEED, OFFSETS[1]))
        assert z.stride() == x.stride()
        assert_bitwise(z.contiguous(), want, f"in place p={p}")


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["channels_last", "heads"])
def test_large_strided_outputs_stream_the_same_values(isa, dtype, layout, use_isa):
    """16 MiB outputs whose memory runs fill whole lines are streamed (Note [Strided walk]): tiles and rows."""
    use_isa(isa)
    scale = 4 // dtype.itemsize  # elements for 16 MiB
    x = (rand((4 * scale, 64, 128, 128), dtype).to(memory_format=torch.channels_last) if layout == "channels_last"
         else rand((2 * scale, 2048, 8, 128), dtype).transpose(1, 2))
    assert x.numel() * x.element_size() == 16 << 20
    y = OPS.dropout(x, 0.3, draw(SEED, 5))
    assert y.stride() == x.stride()
    assert_bitwise(y.contiguous(), OPS.dropout(x.contiguous(), 0.3, draw(SEED, 5)))


def test_strided_input_does_not_depend_on_the_thread_count():
    x = STRIDED["channels_last_130ch"](torch.float32)
    torch.set_num_threads(1)
    one = OPS.dropout(x, 0.5, draw())
    torch.set_num_threads(2)
    assert torch.equal(OPS.dropout(x, 0.5, draw()), one)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(STRIDED) + ["nine_dims"])
def test_gridemu_strided(dtype, layout):
    """The CUDA runner's strided bodies (Note [Strided CUDA dropout]): rows and tiles (tiles cut short in j and
    r, grids smaller than the tiles), with 32-bit and 64-bit index arithmetic, bit for bit the CPU's walk; more
    than 8 merged dimensions take the copies."""
    if layout == "nine_dims":  # no two neighbours merge
        x = rand((2,) * 8 + (16,), dtype).permute(8, 0, 2, 4, 6, 1, 3, 5, 7)
    else:
        x = STRIDED[layout](dtype)
    for grid in [1, 3, 100000]:
        for p in [0.0, 0.3, 1.0]:
            want = OPS.dropout(x, p, draw(SEED, OFFSETS[1]))
            for wide in [False, True]:
                y = OPS._gridemu_dropout(x, p, draw(SEED, OFFSETS[1]), grid, wide)
                assert y.stride() == x.stride()
                assert_bitwise(y, want, f"grid={grid} p={p} wide_index={wide}")


def test_inplace_non_contiguous_input_follows_the_logical_index():
    base = torch.randn(64, 48)
    x = base.t()  # written through its strides
    want = F.dropout(x, 0.5, seed=3)
    OPS.dropout_(x, 0.5, draw(3))
    assert torch.equal(x, want) and x.data_ptr() == base.data_ptr()


def test_inplace_allocates_nothing_and_saves_only_the_draw():
    x = torch.randn(4096, requires_grad=True)
    h = x * 1  # a non-leaf: in-place on a leaf that requires grad is an error, as in torch
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = F.dropout(h, 0.5, inplace=True, seed=11)
    assert y is h and [t.numel() for t in saved] == [2]  # the draw (seed, offset) only
    y.backward(torch.ones(4096))
    assert torch.equal(x.grad, F.dropout(torch.ones(4096), 0.5, seed=11))
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        F.dropout(x, 0.5, inplace=True)


def test_inplace_gradcheck_float64():
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: F.dropout(t * 1, 0.4, inplace=True, seed=2), (x,))
    assert torch.autograd.gradgradcheck(lambda t: F.dropout(t * 1, 0.4, inplace=True, seed=2), (x,))


def test_inplace_rejects_overlapping_input():
    with pytest.raises(RuntimeError, match="share memory"):
        OPS.dropout_(torch.randn(1, 5).expand(4, 5), 0.5, draw())


def test_inplace_module_under_compile():
    net = torch.nn.Sequential(torch.nn.Linear(16, 16), fnn.Dropout(0.5, inplace=True), torch.nn.Linear(16, 4))
    x = torch.randn(8, 16)
    compiled = torch.compile(net, fullgraph=True)
    torch.manual_seed(3)
    want = net(x)
    want.sum().backward()
    want_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    torch.manual_seed(3)
    got = compiled(x)
    got.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for p, g in zip(net.parameters(), want_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-5)


def test_empty_inputs():
    assert OPS.dropout(torch.empty(0, 3), 0.5, draw()).shape == (0, 3)
    assert OPS.bias_dropout_add(torch.empty(0, 3), torch.ones(3), torch.empty(0, 3), 0.5, draw()).shape == (0, 3)
    dx, db = OPS.bias_dropout_add_backward(torch.empty(0, 3), 0.5, draw())
    assert dx.shape == (0, 3) and torch.equal(db, torch.zeros(3))
    assert OPS.dropout_keep_bits(torch.empty(0), 0.5, draw()).shape == (0,)


def test_bad_input_is_a_clear_error():
    x = torch.randn(4, 5)
    with pytest.raises(RuntimeError, match="must be float32, float64, float16 or bfloat16"):
        OPS.dropout(torch.ones(3, dtype=torch.int64), 0.5, draw())
    with pytest.raises(RuntimeError, match="draw must be an int64 CPU tensor of two elements"):
        OPS.dropout(x, 0.5, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="draw must be an int64 CPU tensor of two elements"):
        OPS.dropout(x, 0.5, torch.zeros(2))
    with pytest.raises(RuntimeError, match="SparseCPU"):  # the dispatcher refuses sparse tensors
        OPS.dropout(x.to_sparse(), 0.5, draw())
    with pytest.raises(RuntimeError, match=r"bias must have shape \[5\]"):
        OPS.bias_dropout_add(x, torch.ones(4), x, 0.5, draw())
    with pytest.raises(RuntimeError, match="residual must have the input's shape"):
        OPS.bias_dropout_add(x, torch.ones(5), x.t(), 0.5, draw())
    with pytest.raises(RuntimeError, match="must share a dtype"):
        OPS.bias_dropout_add(x, torch.ones(5, dtype=torch.float64), x, 0.5, draw())
    with pytest.raises(RuntimeError, match="at least one dimension"):
        OPS.bias_dropout_add_backward(torch.tensor(1.0), 0.5, draw())
    with pytest.raises(RuntimeError, match="max_grid"):
        OPS._gridemu_dropout(x, 0.5, draw(), 0)
    with pytest.raises(ValueError, match="offset given without a seed"):
        F.dropout(x, 0.5, offset=3)
    with pytest.raises(ValueError, match="seed must lie in"):
        F.dropout(x, 0.5, seed=2**64)
    with pytest.raises(TypeError, match="seed must be an int"):
        F.dropout(x, 0.5, seed=1.5)


def test_opcheck():
    def cases(grad):
        x, b, r = (torch.randn(*shape, requires_grad=grad) for shape in [(5, 9), (9,), (5, 9)])
        return [(OPS.dropout, (x, 0.3, draw())), (OPS.dropout_backward, (x, 0.3, draw())),
                (OPS.bias_dropout_add, (x, b, r, 0.3, draw())), (OPS.bias_dropout_add_backward, (x, 0.3, draw())),
                (OPS.dropout_keep_bits, (x.detach(), 0.3, draw())), (OPS.dropout_, (x.detach().clone(), 0.3, draw()))]

    layouts = [torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last), torch.randn(9, 5).t(),
               torch.randn(6, 10)[:, ::2]]  # strides kept, kept, not (a slice): Note [Output layout]
    for op, x in [(op, x) for op in (OPS.dropout, OPS.dropout_backward) for x in layouts]:
        torch.library.opcheck(op, (x, 0.3, draw()))

    for op, args in cases(False) + cases(True):
        torch.library.opcheck(op, args)
    # A random op: outputs differ from call to call, so only the schema and the fake are checked.
    torch.library.opcheck(OPS.dropout_seed, (torch.zeros((), dtype=torch.int64),),
                          test_utils=("test_schema", "test_faketensor"))


def test_dropout_seed_counts_and_follows_the_generator():
    counter = torch.zeros((), dtype=torch.int64)
    torch.manual_seed(3)
    a, b = OPS.dropout_seed(counter), OPS.dropout_seed(counter)
    assert int(counter) == 2 and not torch.equal(a, b)
    torch.manual_seed(3)
    assert torch.equal(OPS.dropout_seed(counter), a)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 32)
        self.d1, self.d2 = fnn.Dropout(0.5), fnn.Dropout(0.2)
        self.bias = torch.nn.Parameter(torch.randn(32))

    def forward(self, x):
        h = self.d1(self.l1(x))
        twice = self.d2(h) + self.d2(h)  # the same input dropped twice: two masks
        return F.bias_dropout_add(self.l2(twice), self.bias, h, 0.1)


def test_compiled_module_draws_the_eager_masks():
    torch.manual_seed(0)
    net, x = _Net(), torch.randn(8, 16, requires_grad=True)
    compiled = torch.compile(net, fullgraph=True)

    def run(model):
        torch.manual_seed(11)
        y = model(x)
        grads = torch.autograd.grad(y.square().sum(), [x, *net.parameters()])
        return y, grads, torch.rand(2)

    for _ in range(3):
        (ye, ge, re), (yc, gc, rc) = run(net), run(compiled)
        torch.testing.assert_close(yc, ye, rtol=1e-6, atol=1e-6)  # inductor may reassociate the Linear layers
        for a, b in zip(gc, ge):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(rc, re)  # the same number of draws
    # The masks themselves: with the Linear layers out of the way the outputs are bit for bit eager's.
    f = lambda t: F.dropout(F.dropout(t, 0.5), 0.5) + F.dropout(t, 0.5)  # noqa: E731
    t = torch.randn(1000)
    torch.manual_seed(5)
    want = f(t)
    torch.manual_seed(5)
    assert torch.equal(torch.compile(f, fullgraph=True)(t), want)


def test_compile_with_explicit_seed_fullgraph():
    f = torch.compile(lambda t: F.dropout(t, 0.3, seed=5, offset=6) * 2, fullgraph=True)
    t = torch.randn(4099)
    assert torch.equal(f(t), F.dropout(t, 0.3, seed=5, offset=6) * 2)


# ---------------------------------------------------------------------------------------------------------------
# CUDA (run by benchmarks/gpu_check.sh with -m cuda; skipped without a GPU): the kernels equal the CPU ops bit for
# bit, for every dtype, odd sizes, misaligned storage and grids of many waves.

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def on_cuda(t, mis=False):
    """t on the GPU; mis: in storage one element past an allocation (not 16-byte aligned)."""
    if not mis:
        return t.cuda()
    base = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")
    out = base[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("op", ["dropout", "dropout_", "dropout_backward", "bias_dropout_add",
                                "bias_dropout_add_backward", "dropout_keep_bits"])
def test_cuda_kernels_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedopt::{op}", "CUDA")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 5, 64, 4099, 278011])
@pytest.mark.parametrize("mis", [False, True])
def test_cuda_dropout_equals_cpu(dtype, n, mis):
    x = rand(n, dtype)
    xc = on_cuda(x, mis)
    for p in [0.0, 0.4, 1.0]:
        for offset in [0, 2**32 - 1, 2**64 - 1]:
            want = OPS.dropout(x, p, draw(SEED, offset))
            assert_bitwise(OPS.dropout(xc, p, draw(SEED, offset)).cpu(), want, f"p={p} offset={offset:#x}")
            assert_bitwise(OPS.dropout_backward(xc, p, draw(SEED, offset)).cpu(), want)
        bits = OPS.dropout_keep_bits(xc, p, draw(SEED, 5))
        assert bits.is_cuda and torch.equal(bits.cpu(), OPS.dropout_keep_bits(x, p, draw(SEED, 5)))
        inplace = xc.clone() if not mis else on_cuda(x, mis)
        OPS.dropout_(inplace, p, draw(SEED, 3))  # Note [In-place dropout]
        assert_bitwise(inplace.cpu(), OPS.dropout(x, p, draw(SEED, 3)), f"in place, p={p}")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mis", [False, True])
def test_cuda_grid_stride_over_many_waves(dtype, mis):
    """2^25 + 3 elements: more units than one capped grid covers, so threads loop."""
    x = rand((1 << 25) + 3, dtype)
    xc = on_cuda(x, mis)
    assert_bitwise(OPS.dropout(xc, 0.4, draw(SEED, 2**32 - 1)).cpu(), OPS.dropout(x, 0.4, draw(SEED, 2**32 - 1)))
    assert torch.equal(OPS.dropout_keep_bits(xc, 0.4, draw(SEED, 3)).cpu(), OPS.dropout_keep_bits(x, 0.4, draw(SEED, 3)))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 8), (33, 16), (9, 17), (300, 64), (2, 3, 130), (4096, 1024),
                                   (40000, 3)])
@pytest.mark.parametrize("mis", [False, True])
def test_cuda_bias_dropout_add_equals_cpu(dtype, shape, mis):
    x, res, bias = rand(shape, dtype, 1), rand(shape, dtype, 2), rand(shape[-1], dtype, 3)
    xc, rc, bc = on_cuda(x, mis), on_cuda(res, mis), on_cuda(bias, mis)
    assert_bitwise(OPS.bias_dropout_add(xc, bc, rc, 0.3, draw(5, 6)).cpu(),
                   OPS.bias_dropout_add(x, bias, res, 0.3, draw(5, 6)))
    dx, db = OPS.bias_dropout_add_backward(x, 0.3, draw(5, 6))
    dxc, dbc = OPS.bias_dropout_add_backward(xc, 0.3, draw(5, 6))
    assert_bitwise(dxc.cpu(), dx)
    assert_bitwise(dbc.cpu(), db)


@pytest.mark.cuda
@needs_cuda
def test_cuda_and_cpu_runs_draw_the_same_masks():
    """Seeds come from the CPU generator for CUDA inputs too: one program, the same masks on either device."""
    x = torch.randn(64, 1000)
    b, r = torch.randn(1000), torch.randn(64, 1000)

    def run(device):
        torch.manual_seed(21)
        xs = x.to(device).requires_grad_()
        bs, rs = b.to(device).requires_grad_(), r.to(device).requires_grad_()
        y = fnn.Dropout(0.25)(xs)
        z = F.bias_dropout_add(y, bs, rs, 0.1)
        z.backward(torch.ones_like(z))
        return [t.detach().cpu() for t in (y, z, xs.grad, bs.grad, rs.grad)]

    for a, c in zip(run("cpu"), run("cuda")):
        assert_bitwise(c, a)


@pytest.mark.cuda
@needs_cuda
def test_cuda_current_stream_and_non_contiguous_input():
    x = rand((300, 500), torch.float32).cuda().t()
    want = OPS.dropout(x.cpu(), 0.5, draw(7, 8))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = OPS.dropout(x, 0.5, draw(7, 8))
    side.synchronize()
    assert_bitwise(y.cpu(), want)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(STRIDED) + ["channels_last_large"])
def test_cuda_strided_input_equals_cpu(dtype, layout):
    """Note [Strided CUDA dropout]: rows and tiles, out of place, in place and backward, keeping the strides;
    the large layout has more tiles than one grid covers."""
    x = (rand((16, 64, 128, 128), dtype).to(memory_format=torch.channels_last) if layout == "channels_last_large"
         else STRIDED[layout](dtype))
    xc = x.cuda()
    assert xc.stride() == x.stride()
    want = OPS.dropout(x, 0.3, draw(SEED, OFFSETS[1]))
    for y in [OPS.dropout(xc, 0.3, draw(SEED, OFFSETS[1])), OPS.dropout_backward(xc, 0.3, draw(SEED, OFFSETS[1]))]:
        assert y.stride() == x.stride()
        assert_bitwise(y.cpu(), want)
    OPS.dropout_(xc, 0.3, draw(SEED, OFFSETS[1]))
    assert_bitwise(xc.cpu(), want, "in place")


@pytest.mark.cuda
@needs_cuda
def test_cuda_bad_input_is_a_clear_error():
    x = torch.randn(4, 5, device="cuda")
    with pytest.raises(RuntimeError, match="expected bias on cuda"):
        OPS.bias_dropout_add(x, torch.ones(5), x, 0.5, draw())
    with pytest.raises(RuntimeError, match="draw must be an int64 CPU tensor"):
        OPS.dropout(x, 0.5, draw().cuda())
