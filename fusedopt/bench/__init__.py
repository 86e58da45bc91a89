"""fusedopt-bench: fusedopt's optimizers (fusedopt.Adam, ...) and dropout against torch's, in one
interleaved run, with this machine's memory bandwidth as the yardstick: the extension's in-place stream
kernel a += s·b and, on CUDA (or with --copy), the device-to-device copy dst.copy_(src), each timed between
the steps of every row, so under the same load.

Every step is timed alone: on the CPU by the host clock; on CUDA by CUDA events after a device
synchronisation (so its launch overhead counts), with the host time (until step() returns) beside it. The
layouts named in --graph-layouts are also timed as CUDA-graph replays (device time alone). After the timed
steps, each torch variant's parameters are compared with fusedopt's: a relative difference above the
tolerance, or a NaN, makes the exit code 1. Each torch variant's update on a small probe is also compared
with fusedopt's: one that does not take the step (torch 2.13's fused CPU SGD in bf16 and fp16 skips it) is
marked wrong and not counted as torch's best (Note [Update check]). With --budget, a row that would start
after 80% of it is skipped; results.json and results.md are rewritten after every row, so a run cut short
keeps what it finished.

    fusedopt-bench                       # the default run: ~1 minute on 2 cores
    fusedopt-bench --optimizers adam --layouts gpt2-small --reps 20
    fusedopt-bench --optimizers adam,adam-masked --layouts single --no-dropout   # what gradient masking costs
    fusedopt-bench --layouts mix:4096x100+17x3000 --dtype bfloat16
    fusedopt-bench --keep-pages          # freed memory kept for reuse (Note [Kept pages])
    fusedopt-bench --device cuda --layouts single-1e9,gpt-1b,many-small-10k --budget 200
"""
import argparse
import gc
import inspect
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

# Bytes each rule must move per element, in units of the element size: every array read once (θ, g, state)
# and every mutated one written once (θ, state).
STATE_ARRAYS = {"Adam": 2, "AdamW": 2, "SGD": 1, "Adagrad": 1, "RMSprop": 1}
# name -> (the class in fusedopt and torch.optim, options for both, options for fusedopt's alone)
OPTIMIZERS = {
    "adam": ("Adam", {"lr": 1e-3}, {}),
    "adamw": ("AdamW", {"lr": 1e-3, "weight_decay": 1e-2}, {}),
    "sgd": ("SGD", {"lr": 1e-2, "momentum": 0.9}, {}),
    "adagrad": ("Adagrad", {"lr": 1e-2}, {}),
    "rmsprop": ("RMSprop", {"lr": 1e-2}, {}),
    # Bernoulli gradient masking, which torch lacks: its torch rows are torch's plain Adam, and fusedopt's
    # row is also compared with fusedopt's unmasked Adam on the same layout ("masked/unmasked").
    "adam-masked": ("Adam", {"lr": 1e-3}, {"grad_keep_prob": 0.5, "grad_mask_seed": 1}),
}
DEFAULT_OPTIMIZERS = "adam,adamw,sgd,adagrad,rmsprop"
TORCH_VARIANTS = {"torch for-loop": {"foreach": False}, "torch foreach": {"foreach": True},
                  "torch fused": {"fused": True}}


def gpt2(d=768, layers=12, vocab=50257, ctx=1024):
    """The parameter shapes of a GPT-2-style decoder (embeddings; per layer LN, QKV, projection, LN, MLP;
    final LN); by default GPT-2 small's 148 (124M parameters)."""
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [(vocab, d), (ctx, d)] + block * layers + [(d,), (d,)]


def layered(layers=50, h=164):
    """400 tensors, ~16M parameters: transformer-like blocks of 4 matrices and 4 vectors."""
    block = [(h, 3 * h), (3 * h,), (h, h), (h,), (h, 4 * h), (4 * h,), (4 * h, h), (h,)]
    return block * layers


def many_small(count=3000, low=1, high=700, seed=0):
    """`count` vectors of low..high-1 elements, drawn from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return [(int(n),) for n in torch.randint(low, high, (count,), generator=g)]


PRESETS = {"single": lambda: [(16 * 2**20,)], "layered": layered, "many-small": many_small, "gpt2-small": gpt2,
           # for a GPU: 1e9 parameters in one tensor; a ~1e9-parameter GPT (292 tensors); 10,000 small tensors
           "single-1e9": lambda: [(10**9,)], "gpt-1b": lambda: gpt2(1792, 24),
           "many-small-10k": lambda: many_small(10_000, 100, 10_001)}


def parse_layout(spec):
    """A preset name, or NAME:SIZE[xCOUNT][,SIZExCOUNT...] e.g. single:1e9, mix:4096x100,17x3000."""
    if spec in PRESETS:
        return spec, PRESETS[spec]()
    name, _, sizes = spec.partition(":")
    shapes = []
    for part in sizes.split(","):
        size, _, count = part.partition("x")
        shapes += [(int(float(size)),)] * int(count or 1)
    if not shapes:
        raise SystemExit(f"bad layout {spec!r}: use a preset ({', '.join(PRESETS)}) or NAME:SIZExCOUNT,...")
    return name, shapes


class Timer:
    """Times one call, returning (device seconds, host seconds). On CUDA: CUDA events after a synchronisation,
    so the call's launch overhead counts and nothing queued before it does, and the host time until the call
    returned. On the CPU both are the host clock."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn):
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            fn()
            end.record()
            host = time.perf_counter() - t0
            end.synchronize()
            return start.elapsed_time(end) / 1e3, host
        t0 = time.perf_counter()
        fn()
        host = time.perf_counter() - t0
        return host, host


class Progress:
    def __init__(self, total, enabled):
        self.total, self.done, self.enabled, self.t0 = total, 0, enabled, time.time()

    def step(self, label):
        self.done += 1
        if self.enabled:
            width = 30
            filled = width * self.done // self.total
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                             f"{time.time() - self.t0:5.1f}s {label:<40.40}")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    def close(self):
        """Ends the bar's line where skipped rows left it short."""
        if self.enabled and 0 < self.done < self.total:
            sys.stderr.write("\n")


class Budget:
    """--budget: seconds for the whole run, counted from its start; a section (a layout, a row, the dropout
    cases) that would start after 80% of them is skipped and named in `skipped`."""

    def __init__(self, seconds):
        self.seconds, self.t0, self.skipped = seconds, time.perf_counter(), []

    def allows(self, section):
        if self.seconds is None or time.perf_counter() - self.t0 <= 0.8 * self.seconds:
            return True
        self.skipped.append(section)
        return False


class Yardsticks:
    """The machine's bandwidth over n fp32 elements, timed once per repetition of every row, interleaved with
    its steps, so that a row's "% of" columns compare both under the same load: the extension's stream kernel
    a += s·b (12 B/element) and, with `copy`, the copy a.copy_(b) (bytes read + written: 8 B/element)."""

    def __init__(self, n, device, timer, copy):
        import fusedopt.ops  # noqa: F401  (registers torch.ops.fusedopt.stream_)

        self.n, self.timer = n, timer
        self.a = torch.randn(n, device=device)
        self.b = torch.randn(n, device=device)
        self.kernels = {"stream": (12, lambda: torch.ops.fusedopt.stream_(self.a, self.b, 1e-3))}
        if copy:
            self.kernels["copy"] = (8, lambda: self.a.copy_(self.b))
        self.time()  # warm-up

    def time(self):
        """Seconds of one pass of each kernel, by name."""
        return {k: self.timer(f)[0] for k, (_, f) in self.kernels.items()}

    def columns(self, times, gbs):
        """A row's yardstick columns for its rate of gbs GB/s: each kernel's GB/s at the median of `times`
        (what time() returned, once a repetition) and gbs as a percentage of it."""
        out = {}
        for k, (nbytes, _) in self.kernels.items():
            rate = nbytes * self.n / statistics.median(t[k] for t in times) / 1e9
            out.update({f"{k}_gb_s": rate, f"pct_{k}": 100 * gbs / rate})
        return out


def make_params(shapes, dtype, device, seed):
    """Parameters of these shapes, each with a gradient, drawn on `device` from a generator seeded there."""
    g = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=g, device=device).to(dtype)
        p.grad = torch.randn(shape, generator=g, device=device).to(dtype)
        params.append(p)
    return params


def copies(base, share_grads):
    """One implementation's copy of the parameters. With share_grads their gradients are base's own tensors
    (nothing writes a gradient without AMP; at 1e9 parameters a copy each would cost 4 GB), otherwise copies
    (so that one implementation does not find in its cache a gradient another has just read)."""
    out = []
    for p in base:
        c = p.clone()
        c.grad = p.grad if share_grads else p.grad.clone()
        out.append(c)
    return out


def describe(e):
    """An exception in one line, for a row."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def candidates(opt, params_for, capturable=False):
    """(name -> optimizer over its own copy of the parameters, stepped once: its state allocated, its first
    launches made; name -> why one could not be built or stepped). A torch variant fails where this torch
    lacks it for this device (no fused RMSprop; no CUDA fused Adagrad). capturable: torch's capturable=True,
    where the class has it, for CUDA-graph capture."""
    import fusedopt

    cls_name, both, ours = OPTIMIZERS[opt]
    torch_cls = getattr(torch.optim, cls_name)
    capture = {"capturable": True} if capturable and "capturable" in inspect.signature(torch_cls).parameters else {}
    builders = {"fusedopt": lambda: getattr(fusedopt, cls_name)(params_for(), **both, **ours)}
    for name, variant in TORCH_VARIANTS.items():
        builders[name] = lambda variant=variant: torch_cls(params_for(), **both, **variant, **capture)
    built, errors = {}, {}
    for name, build in builders.items():
        try:
            o = build()
            o.step()
            built[name] = o
        except Exception as e:  # torch refuses with RuntimeError, ValueError, TypeError or AssertionError
            errors[name] = describe(e)
    return built, errors


def params_of(o):
    return [p for group in o.param_groups for p in group["params"]]


def max_rel_diffs(impls):
    """torch variant -> max |θ − θ_fusedopt| / max |θ_fusedopt| over all parameters: NaN where fusedopt's are
    not all finite, inf where only the variant's are not (torch overflowing in half precision)."""
    ours = params_of(impls["fusedopt"])
    scale = torch.stack(torch._foreach_norm(ours, math.inf)).max().item()
    out = {}
    for k, o in impls.items():
        if k != "fusedopt":
            d = torch.stack(torch._foreach_norm(torch._foreach_sub(params_of(o), ours), math.inf)).max().item()
            out[k] = math.nan if not math.isfinite(scale) else d / scale if math.isfinite(d) else math.inf
    return out


# Note [Update check]
# torch 2.13's fused CPU SGD in bfloat16 and float16 leaves every whole SIMD block of a parameter as it was
# and writes garbage into the momentum buffer (pytorch/pytorch#191763, fixed after 2.13 by #192545): on
# 16.8M bf16 parameters it "steps" in 0.6 ns per element because it does not do the work. The comparison of
# the timed rows' parameters (max_rel_diffs) cannot see that: at the rows' learning rates an update is a few
# units of rounding of θ. So each variant also steps a small probe with lr = 0.1 from the same start, and its
# update θ_3 − θ_1 is compared with fusedopt's in the 2-norm; one more than a quarter off (rounding is a few
# percent; skipping the update is 100%) or not finite did not take this step: its row says so and it is no
# candidate for torch's best.
PROBE_SHAPES = [(4099,), (1000,)]
PROBE_LR = 0.1
WRONG_UPDATE = 0.25


def update_errors(opt, dtype, device):
    """torch variant -> ‖Δθ − Δθ_fusedopt‖₂ / ‖Δθ_fusedopt‖₂ over two probe steps at lr 0.1 (Note
    [Update check]); inf where the variant's update is not finite. Empty where fusedopt's own is not (the
    mismatch check then reports it) or cannot be built."""
    base = make_params(PROBE_SHAPES, dtype, device, seed=2)
    impls, _ = candidates(opt, lambda: copies(base, False))
    if "fusedopt" not in impls:
        return {}
    deltas = {}
    for k, o in impls.items():
        start = [p.detach().clone() for p in params_of(o)]
        for group in o.param_groups:
            group["lr"] = PROBE_LR
        try:
            for _ in range(2):
                o.step()
        except Exception:  # no update to check; its timed steps will say why (fusedopt's: below)
            continue
        deltas[k] = torch.cat([(p.detach() - s).double().flatten() for p, s in zip(params_of(o), start)])
    if "fusedopt" not in deltas:
        return {}
    ours = deltas.pop("fusedopt")
    norm = ours.norm().item()
    if not math.isfinite(norm) or norm == 0:
        return {}
    out = {}
    for k, d in deltas.items():
        err = (d - ours).norm().item() / norm
        out[k] = err if math.isfinite(err) else math.inf
    return out


def graph_times(impls, timer, reps, device):
    """(name -> seconds of each of `reps` replays of one step captured in a CUDA graph: device time alone,
    interleaved; name -> why it could not be captured). Each step is captured as torch's are: after a
    warm-up step on a side stream."""
    graphs, errors = {}, {}
    for k, o in impls.items():
        try:
            if device.type != "cuda":
                raise RuntimeError("CUDA graphs need a CUDA device")
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                o.step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                o.step()
            graph.replay()  # warm-up
            graphs[k] = graph
        except Exception as e:  # an extra measurement: record why, keep going
            errors[k] = describe(e)
        if device.type == "cuda":
            torch.cuda.synchronize()
    times = {k: [] for k in graphs}
    for _ in range(reps):
        for k, graph in graphs.items():
            times[k].append(timer(graph.replay)[0])
    return times, errors


def release(device):
    """Frees what the last row left behind, so that the next one has the memory (1e9 parameters on a GPU)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_optimizer(args, opt, layout, base, device, timer, yard, progress, updates):
    """One optimizer on one layout: a row per implementation (median step times, GB/s, yardsticks, speed-up,
    the difference from fusedopt and, for a --graph-layouts layout, CUDA-graph replay times). updates: this
    optimizer's update_errors, which do not depend on the layout."""
    cls_name, _, ours = OPTIMIZERS[opt]
    share = device.type == "cuda"
    impls, errors = candidates(opt, lambda: copies(base, share))
    times = {k: [] for k in impls}
    hosts = {k: [] for k in impls}
    yard_times = []
    failed = {}  # name -> why a timed step raised (out of memory at 1e9 parameters on a smaller GPU)
    for _ in range(args.reps):
        for k in list(impls):  # interleaved, so drift hits all alike
            try:
                t, h = timer(impls[k].step)
            except Exception as e:  # the row says so; the others go on, with its memory freed
                failed[k] = describe(e)
                del impls[k], times[k], hosts[k]
                release(device)
                continue
            times[k].append(t)
            hosts[k].append(h)
        yard_times.append(yard.time())
        progress.step(f"{opt} / {layout}")
    # The same start and steps: a torch variant of the same rule agrees with fusedopt to rounding.
    diffs = max_rel_diffs(impls) if "fusedopt" in impls and not ours else {}
    del impls
    replays, graph_errors = {}, {}
    if layout in args.graph_layouts:
        release(device)
        impls, graph_errors = candidates(opt, lambda: copies(base, share), capturable=True)
        replays, errors_in_capture = graph_times(impls, timer, args.reps, device)
        graph_errors.update(errors_in_capture)
        del impls

    numel = sum(p.numel() for p in base)
    nbytes = (3 + 2 * STATE_ARRAYS[cls_name]) * base[0].element_size() * numel
    head = {"optimizer": opt, "layout": layout, "tensors": len(base), "params": numel}
    medians = {k: statistics.median(v) for k, v in times.items()}
    graph_medians = {k: statistics.median(v) for k, v in replays.items()}
    wrong = {k for k, e in updates.items() if not e <= WRONG_UPDATE}  # Note [Update check]
    best_torch = min((m for k, m in medians.items() if k != "fusedopt" and k not in wrong), default=float("nan"))
    best_graph = min((m for k, m in graph_medians.items() if k != "fusedopt"), default=float("nan"))
    rows = [{**head, "impl": "fusedopt", "error": errors["fusedopt"]}] if "fusedopt" in errors else []
    rows += [{**head, "impl": k, "error": e} for k, e in failed.items()]
    for k, med in medians.items():
        gbs = nbytes / med / 1e9
        row = {**head, "impl": k, "median_ms": med * 1e3, "host_ms": statistics.median(hosts[k]) * 1e3,
               "gb_s": gbs, **yard.columns(yard_times, gbs),
               "speedup_vs_best_torch": best_torch / med if k == "fusedopt" else None}
        if k in diffs:
            row["max_rel_diff_vs_fusedopt"] = diffs[k]
        if k in updates:
            row["update_rel_err_vs_fusedopt"] = updates[k]
            row["wrong_update"] = k in wrong
        if k in graph_medians:
            row.update(graph_ms=graph_medians[k] * 1e3, graph_gb_s=nbytes / graph_medians[k] / 1e9)
            if k == "fusedopt":
                row["graph_speedup_vs_best_torch"] = best_graph / graph_medians[k]
        elif k in graph_errors:
            row["graph_error"] = graph_errors[k]
        rows.append(row)
    return rows


def masked_ratios(rows):
    """Gives fusedopt's adam-masked rows `masked_over_unmasked`: their median step time over fusedopt Adam's
    on the same layout, where both ran."""
    plain = {r["layout"]: r["median_ms"] for r in rows
             if r["optimizer"] == "adam" and r["impl"] == "fusedopt" and "median_ms" in r}
    for r in rows:
        if r["optimizer"] == "adam-masked" and r["impl"] == "fusedopt" and "median_ms" in r and r["layout"] in plain:
            r["masked_over_unmasked"] = r["median_ms"] / plain[r["layout"]]


# (label, shape, dtype, arrange: the case's layout of a contiguous tensor of that shape). A convolution's
# activations in channels_last and attention heads transposed out of [batch, seq, heads, dim] are dense but not
# contiguous (Note [Strided dropout]): the strided walk's tiles and rows, on as many elements as "16M fp32".
DROPOUT_CASES = [("16M fp32", (16 * 2**20,), torch.float32, None),
                 ("8x1024x4096 bf16", (8, 1024, 4096), torch.bfloat16, None),
                 ("16x64x128x128 fp32 channels_last", (16, 64, 128, 128), torch.float32,
                  lambda t: t.contiguous(memory_format=torch.channels_last)),
                 ("8x16x1024x128 fp32 heads transposed", (8, 1024, 16, 128), torch.float32,
                  lambda t: t.transpose(1, 2))]


def bench_dropout(args, device, timer, yard, progress):
    """fusedopt's dropout against torch.nn.functional.dropout: forward, in-place forward and forward+backward,
    and bias_dropout_add against torch's residual + dropout(x + bias), interleaved, with the yardsticks timed
    per repetition for the "% of" columns. GB/s counts the arrays a pass must move: read x, write y (2 per
    element a pass; fwd+bwd two passes; bias_dropout_add also reads the residual, 3)."""
    from fusedopt.nn import functional as F

    rows = []
    for label, shape, dtype, arrange in DROPOUT_CASES:
        arrange = arrange or (lambda t: t)
        x = arrange(torch.randn(shape, device=device, dtype=dtype)).requires_grad_()
        dy = arrange(torch.randn(shape, device=device, dtype=dtype))
        work = [x.detach().clone(), x.detach().clone()]  # in-place targets, one each (clone keeps the layout)
        impls = {
            "fusedopt fwd": lambda: F.dropout(x.detach(), 0.1, True),
            "torch fwd": lambda: torch.nn.functional.dropout(x.detach(), 0.1, True),
            "fusedopt fwd, inplace": lambda: F.dropout(work[0], 0.1, True, inplace=True),
            "torch fwd, inplace": lambda: torch.nn.functional.dropout(work[1], 0.1, True, inplace=True),
            # autograd.grad, not backward(): accumulating into x.grad would add a pass of torch's own
            "fusedopt fwd+bwd": lambda: torch.autograd.grad(F.dropout(x, 0.1, True), x, dy),
            "torch fwd+bwd": lambda: torch.autograd.grad(torch.nn.functional.dropout(x, 0.1, True), x, dy),
        }
        if x.is_contiguous():  # bias_dropout_add on rows of 4096 (a transformer's hidden size)
            rows2d, res2d = x.detach().view(-1, 4096), dy.view(-1, 4096)
            bias = torch.randn(4096, device=device).to(dtype)
            impls["fusedopt bias_dropout_add"] = lambda: F.bias_dropout_add(rows2d, bias, res2d, 0.1, True)
            impls["torch bias_dropout_add"] = lambda: res2d + torch.nn.functional.dropout(rows2d + bias, 0.1, True)
        for f in impls.values():
            f()
        times = {k: [] for k in impls}
        yard_times = []
        for _ in range(args.reps):
            for k, f in impls.items():
                times[k].append(timer(f)[0])
            yard_times.append(yard.time())
            progress.step(f"dropout / {label}")
            for w in work:  # keep the in-place targets' values from growing by 1/0.9 per pass
                w.copy_(x.detach())
        n = x.numel()
        for k, v in times.items():
            med = statistics.median(v)
            arrays = 4 if "fwd+bwd" in k else 3 if "bias_dropout_add" in k else 2
            gbs = arrays * n * x.element_size() / med / 1e9
            torch_k = k.replace("fusedopt", "torch")
            rows.append({"case": label, "impl": k, "median_ms": med * 1e3, "gb_s": gbs,
                         **yard.columns(yard_times, gbs),
                         "speedup_vs_torch": statistics.median(times[torch_k]) / med if k != torch_k else None})
        # What backward keeps: torch a bool mask (1 B/element), fusedopt (seed, offset).
        rows.append({"case": label, "impl": "saved for backward", "torch_bytes": n, "fusedopt_bytes": 16})
    return rows


def mismatches(rows, tolerance):
    """The (optimizer, layout, name -> difference) where fusedopt's parameters are not all finite, or agree
    with none of the torch variants that stayed finite: max relative difference (max_rel_diffs) above
    `tolerance`, or whose probe update none takes (Note [Update check]). One variant suffices because in
    half precision torch's disagree among themselves (its fused CPU SGD skips updates; its for-loop and
    foreach Adam and RMSprop overflow in float16)."""
    diffs, updates = {}, {}
    for r in rows:
        if "max_rel_diff_vs_fusedopt" in r:
            diffs.setdefault((r["optimizer"], r["layout"]), {})[r["impl"]] = r["max_rel_diff_vs_fusedopt"]
        if "update_rel_err_vs_fusedopt" in r:
            updates.setdefault((r["optimizer"], r["layout"]), {})[r["impl"]] = r["update_rel_err_vs_fusedopt"]
    bad = []
    for (opt, layout), d in diffs.items():
        finite = [v for v in d.values() if math.isfinite(v)]
        u = [v for v in updates.get((opt, layout), {}).values() if math.isfinite(v)]
        if (any(map(math.isnan, d.values())) or finite and min(finite) > tolerance
                or u and min(u) > WRONG_UPDATE):  # no finite torch variant takes fusedopt's probe step
            bad.append((opt, layout, d))
    return bad


def markdown(columns, lines, left):
    """A markdown table: the first `left` columns (names) left-aligned, the others (figures) right-aligned."""
    return ["| " + " | ".join(columns) + " |",
            "|" + "|".join(["---"] * left + ["---:"] * (len(columns) - left)) + "|",
            *("| " + " | ".join(cells) + " |" for cells in lines)]


def ms(x):
    """Milliseconds with two decimals, three below 1 ms."""
    return f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def speedup(x):
    return "" if x is None else "n/a" if math.isnan(x) else f"{x:.2f}x"


def optimizer_tables(rows, host):
    """The optimizer rows; then, where they ran, adam-masked against fusedopt's Adam and the CUDA-graph
    replays. host: with the host-time column (CUDA)."""
    copy = any("pct_copy" in r for r in rows)
    columns = (["optimizer", "layout", "implementation", "median ms"] + ["host ms"] * host
               + ["GB/s", "stream GB/s", "% of stream"] + ["% of copy"] * copy + ["fusedopt speed-up"])
    lines, graphed = [], []
    for r in rows:
        impl = r["impl"] + (f" (wrong step: update {r['update_rel_err_vs_fusedopt']:.0%} off; not counted)"
                            if r.get("wrong_update") else "")
        names = [r["optimizer"], f"{r['layout']} ({r['tensors']} tensors, {r['params'] / 1e6:.1f}M)", impl]
        if "error" in r:
            lines.append(names + [f"error: {r['error']}"] + [""] * (len(columns) - 4))
            continue
        lines.append(names + [ms(r["median_ms"])] + ([ms(r["host_ms"])] if host else [])
                     + [f"{r['gb_s']:.1f}", f"{r['stream_gb_s']:.1f}", f"{r['pct_stream']:.0f}%"]
                     + ([f"{r['pct_copy']:.0f}%"] if copy else []) + [speedup(r["speedup_vs_best_torch"])])
        if "graph_ms" in r:
            graphed.append(names + [ms(r["graph_ms"]), f"{r['graph_gb_s']:.1f}",
                                    speedup(r.get("graph_speedup_vs_best_torch"))])
        elif "graph_error" in r:
            graphed.append(names + [f"error: {r['graph_error']}", "", ""])
    out = markdown(columns, lines, 3)
    masked = [r for r in rows if "masked_over_unmasked" in r]
    if masked:
        keep = OPTIMIZERS["adam-masked"][2]["grad_keep_prob"]
        out += ["", *markdown(["layout", "fusedopt Adam ms", f"grad_keep_prob={keep} ms", "masked/unmasked"],
                              [[r["layout"], ms(r["median_ms"] / r["masked_over_unmasked"]), ms(r["median_ms"]),
                                f"{r['masked_over_unmasked']:.2f}"] for r in masked], 1)]
    if graphed:
        out += ["", "CUDA-graph replays (device time alone, no host overhead):", "",
                *markdown(["optimizer", "layout", "implementation", "replay ms", "GB/s", "fusedopt speed-up"],
                          graphed, 3)]
    return out


def dropout_table(rows):
    copy = any("pct_copy" in r for r in rows)
    columns = (["dropout case", "implementation", "median ms", "GB/s", "% of stream"] + ["% of copy"] * copy
               + ["fusedopt speed-up"])
    lines = []
    for r in rows:
        if "median_ms" in r:
            lines.append([r["case"], r["impl"], ms(r["median_ms"]), f"{r['gb_s']:.1f}", f"{r['pct_stream']:.0f}%"]
                         + ([f"{r['pct_copy']:.0f}%"] if copy else []) + [speedup(r["speedup_vs_torch"])])
        else:
            lines.append([r["case"], "bytes saved for backward", f"torch {r['torch_bytes']:,}",
                          f"fusedopt {r['fusedopt_bytes']}", ""] + [""] * copy + [""])
    return markdown(columns, lines, 2)


def report(machine, rows, drop_rows, skipped, bad):
    """results.md: a line on the run, the tables, what was skipped and what did not match."""
    cuda = machine["device"].startswith("cuda")
    head = (f"fusedopt-bench on {machine['device_name']} ({machine['threads']} threads), torch {machine['torch']}, "
            f"{machine['dtype']}; median of {machine['reps']} interleaved steps; stream a+=s*b, timed with every "
            f"row: {machine['stream_gb_s']:.1f} GB/s (median of rows); {machine['allocator']}")
    if "copy_gb_s" in machine:
        head += f"; copy dst.copy_(src), read+write: {machine['copy_gb_s']:.1f} GB/s"
    lines = [head, "", *optimizer_tables(rows, cuda)]
    if drop_rows:
        lines += ["", *dropout_table(drop_rows)]
    if skipped:
        lines += ["", f"skipped (past 80% of the {machine['budget_s']:g} s budget): {', '.join(skipped)}"]
    lines += [f"MISMATCH {opt} / {layout}: fusedopt's parameters differ from every torch variant's ("
              + ", ".join(f"{k} {v:.2e}" for k, v in d.items()) + f"; relative, tolerance {machine['tolerance']:g})"
              for opt, layout, d in bad]
    return "\n".join(lines)


def chart(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = sorted({(r["optimizer"], r["layout"]) for r in rows}, key=lambda g: (g[1], g[0]))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, len(groups) * 0.9), 4.5))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        ys = [next((r["gb_s"] for r in rows if (r["optimizer"], r["layout"]) == g and r["impl"] == impl), 0)
              for g in groups]
        ax.bar([x + i * width for x in range(len(groups))], ys, width, label=impl)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))])
    ax.set_xticklabels([f"{o}\n{l}" for o, l in groups], fontsize=8)
    ax.set_ylabel("effective GB/s (higher is better)")
    ax.axhline(statistics.median(r["stream_gb_s"] for r in rows), color="k", ls="--", lw=1,
               label="stream a+=s*b (median of rows)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


# Note [Kept pages]
# glibc serves every allocation above 32 MB with a fresh mmap and unmaps it on free, so each large tensor a
# step or a dropout call allocates is faulted in again, page by page, and zeroed by the kernel: on this
# project's 2-core VM 13-27 ms for 64 MB, more than a pass over the data. torch's for-loop and foreach
# optimizers allocate such temporaries on every step (RMSprop on 16.8M: 37 ms with fresh pages, 26 ms with
# kept ones); dropout's output and gradient are fresh tensors too. --keep-pages makes glibc keep what is
# freed (mallopt: no mmap, a 2 GB trim threshold), as jemalloc and tcmalloc (PyTorch's CPU tuning guide
# recommends either) do, so the rows time the kernels rather than the page faults. Both implementations of
# a row run under the same allocator either way.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_pages():
    """Makes glibc's malloc keep freed memory in the process (Note [Kept pages]); raises where it cannot."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:
        raise SystemExit("--keep-pages: this C library has no mallopt (it needs glibc)") from None
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1)):
        raise SystemExit("--keep-pages: mallopt refused")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="fusedopt-bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS, help="comma-separated: " + ", ".join(OPTIMIZERS))
    ap.add_argument("--layouts", default="single,layered,many-small",
                    help=f"comma-separated presets ({', '.join(PRESETS)}) or NAME:SIZExCOUNT+SIZExCOUNT")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--reps", type=int, default=10, help="timed steps per implementation (median)")
    ap.add_argument("--graph-layouts", default=None,
                    help="comma-separated layouts also timed as CUDA-graph replays (default: many-small and "
                         "many-small-10k on CUDA, none on the CPU)")
    ap.add_argument("--copy", action="store_true",
                    help="also time the device-to-device copy as a yardstick (always on CUDA)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds: rows that would start after 80%% of this are skipped (results so far kept)")
    ap.add_argument("--no-dropout", action="store_true", help="skip the dropout section")
    ap.add_argument("--keep-pages", action="store_true",
                    help="glibc keeps freed memory, so large temporaries are not faulted in afresh on every "
                         "step (as with jemalloc or tcmalloc)")
    ap.add_argument("--out", default="results", help="folder for results.json, results.md, results.png")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    args.optimizers = [o for o in args.optimizers.split(",") if o]
    args.layouts = [l.replace("+", ",") for l in args.layouts.split(",") if l]
    for o in args.optimizers:
        if o not in OPTIMIZERS:
            ap.error(f"unknown optimizer {o!r}")
    args.dtype = getattr(torch, args.dtype)
    args.device = torch.device(args.device)
    cuda = args.device.type == "cuda"
    if args.graph_layouts is None:
        args.graph_layouts = "many-small,many-small-10k" if cuda else ""
    args.graph_layouts = [l for l in args.graph_layouts.split(",") if l]
    return args


def main(argv=None):
    args = parse_args(argv)
    budget = Budget(args.budget)
    device = args.device
    import fusedopt._ext  # (loads the extension, or says why it cannot)

    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device")
        if not fusedopt._ext.HAS_CUDA_KERNELS:
            raise SystemExit("fusedopt was built without its CUDA kernels: build it with FUSEDOPT_CUDA=1")
    if args.keep_pages:
        keep_pages()
    if args.threads:
        torch.set_num_threads(args.threads)
    layouts = [parse_layout(l) for l in args.layouts]
    timer = Timer(device)
    steps = args.reps * (len(args.optimizers) * len(layouts) + (0 if args.no_dropout else len(DROPOUT_CASES)))
    progress = Progress(steps, enabled=not args.quiet)
    yard = Yardsticks(2**29 if device.type == "cuda" else 32 * 2**20, device, timer,
                      copy=args.copy or device.type == "cuda")
    tolerance = max(1e-3, 4 * torch.finfo(args.dtype).eps)  # fp32: 1e-3; bf16, fp16: a few units of rounding
    machine = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "cuda": torch.version.cuda, "fusedopt_build": fusedopt._ext.BUILD, "dtype": str(args.dtype),
               "reps": args.reps, "tolerance": tolerance, "budget_s": args.budget,
               "graph_layouts": args.graph_layouts,
               "allocator": "pages kept (--keep-pages)" if args.keep_pages else "system malloc",
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    rows, drop_rows = [], []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save():
        """Writes results.json and results.md as they stand: a run cut short keeps every finished row."""
        masked_ratios(rows)
        timed = [r for r in rows if "median_ms" in r]
        for k in yard.kernels:  # the rows' yardstick figures, one median per row, summarised for the header
            machine[f"{k}_gb_s"] = statistics.median(r[f"{k}_gb_s"] for r in timed) if timed else float("nan")
        machine["seconds"] = time.perf_counter() - budget.t0
        bad = mismatches(rows, tolerance)
        (out / "results.json").write_text(json.dumps(
            {"machine": machine, "optimizers": rows, "dropout": drop_rows, "skipped": budget.skipped,
             "mismatches": [{"optimizer": o, "layout": l, "max_rel_diffs": d} for o, l, d in bad]}, indent=1))
        md = report(machine, rows, drop_rows, budget.skipped, bad)
        (out / "results.md").write_text(md + "\n")
        return md, bad

    # Note [Update check]; torch has no masking to compare fusedopt's masked step with
    updates = {opt: update_errors(opt, args.dtype, device) if not OPTIMIZERS[opt][2] else {}
               for opt in args.optimizers}
    for name, shapes in layouts:
        if not budget.allows(name):
            continue
        base = make_params(shapes, args.dtype, device, seed=1)
        for opt in args.optimizers:
            if budget.allows(f"{opt} / {name}"):
                rows += bench_optimizer(args, opt, name, base, device, timer, yard, progress, updates[opt])
                release(device)
                save()
        del base
        release(device)
    if not args.no_dropout and budget.allows("dropout"):
        drop_rows += bench_dropout(args, device, timer, yard, progress)
    progress.close()
    md, bad = save()
    timed = [r for r in rows if "gb_s" in r]
    drew = bool(timed) and chart(timed, out / "results.png")
    print(md)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}" + (f", {out / 'results.png'}" if drew else ""))
    return 1 if bad or any("error" in r and r["impl"] == "fusedopt" for r in rows) else 0
