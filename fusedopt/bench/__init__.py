"""fusedopt-bench: fusedopt's optimizer steps and dropout against torch's, in one
interleaved run, with this machine's in-place stream bandwidth as the yardstick
(measured between the steps of every row, so under the same load).

    fusedopt-bench                       # the default run: ~1 minute on 2 cores
    fusedopt-bench --optimizers adam --layouts gpt2-small --reps 20
    fusedopt-bench --device cuda --layouts single:1e9
"""
import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

# Bytes each rule must move per element, in units of the element size: every
# array read once (θ, g, state) and every mutated one written once (θ, state).
STATE_ARRAYS = {"adam": 2, "adamw": 2, "sgd": 1, "adagrad": 1, "rmsprop": 1}
OPTIMIZERS = {
    "adam": ("Adam", {"lr": 1e-3}),
    "adamw": ("AdamW", {"lr": 1e-3, "weight_decay": 1e-2}),
    "sgd": ("SGD", {"lr": 1e-2, "momentum": 0.9}),
    "adagrad": ("Adagrad", {"lr": 1e-2}),
    "rmsprop": ("RMSprop", {"lr": 1e-2}),
}
TORCH_VARIANTS = {"torch for-loop": {"foreach": False}, "torch foreach": {"foreach": True},
                  "torch fused": {"fused": True}}


def gpt2_small():
    """The 148 parameter shapes of a 124M-parameter GPT-2."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [(vocab, d), (ctx, d)] + block * layers + [(d,), (d,)]


def layered(layers=50, h=164):
    """400 tensors, ~16M parameters: transformer-like blocks of 4 matrices and 4 vectors."""
    block = [(h, 3 * h), (3 * h,), (h, h), (h,), (h, 4 * h), (4 * h,), (4 * h, h), (h,)]
    return block * layers


def many_small(count=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(int(n),) for n in torch.randint(1, 700, (count,), generator=g)]


PRESETS = {"single": lambda: [(16 * 2**20,)], "layered": layered, "many-small": many_small,
           "gpt2-small": gpt2_small}


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
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


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


def make_params(shapes, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
        p.grad = torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
        params.append(p)
    return params


def candidates(opt, params_for, device):
    """name -> optimizer over its own copy of the parameters; torch variants that
    this torch cannot build for this device (e.g. RMSprop has no fused) are left out."""
    import fusedopt

    cls_name, kwargs = OPTIMIZERS[opt]
    out = {"fusedopt": getattr(fusedopt, cls_name)(params_for(), **kwargs)}
    for name, variant in TORCH_VARIANTS.items():
        try:
            o = getattr(torch.optim, cls_name)(params_for(), **kwargs, **variant)
            o.step()  # fused/foreach support is only checked at the first step
        except (RuntimeError, ValueError, TypeError):
            continue
        out[name] = o
    return out


class Stream:
    """a += s·b over n fp32 elements (12 B/element), the extension's own kernel. Timed once per
    repetition of every row, interleaved with the steps, so a row's "% of stream" compares both
    under the same machine load."""

    def __init__(self, n, device, timer):
        import fusedopt.ops  # noqa: F401

        self.n, self.timer = n, timer
        self.a = torch.randn(n, device=device)
        self.b = torch.randn(n, device=device)
        self.time()  # warm-up

    def time(self):
        """Seconds of one pass."""
        return self.timer(lambda: torch.ops.fusedopt.stream_(self.a, self.b, 1e-3))

    def gb_s(self, times):
        """GB/s at the median of `times` (seconds per pass)."""
        return 12 * self.n / statistics.median(times) / 1e9


def bench_optimizers(args, device, timer, stream, progress):
    rows = []
    for layout in args.layouts:
        name, shapes = parse_layout(layout)
        numel = sum(math.prod(s) for s in shapes)
        for opt in args.optimizers:
            impls = candidates(opt, lambda: make_params(shapes, args.dtype, device, seed=1), device)
            for o in impls.values():
                o.step()  # warm-up (allocates state)
            times = {k: [] for k in impls}
            stream_times = []
            for _ in range(args.reps):
                for k, o in impls.items():  # interleaved, so drift hits all alike
                    times[k].append(timer(o.step))
                stream_times.append(stream.time())
                progress.step(f"{opt} / {name}")
            stream_gbs = stream.gb_s(stream_times)
            itemsize = torch.empty((), dtype=args.dtype).element_size()
            nbytes = (3 + 2 * STATE_ARRAYS[opt]) * itemsize * numel
            best_torch = min((statistics.median(v) for k, v in times.items() if k != "fusedopt"),
                             default=float("nan"))
            for k, v in times.items():
                med = statistics.median(v)
                gbs = nbytes / med / 1e9
                rows.append({
                    "optimizer": opt, "layout": name, "tensors": len(shapes), "params": numel,
                    "impl": k, "median_ms": med * 1e3, "gb_s": gbs, "stream_gb_s": stream_gbs,
                    "pct_stream": 100 * gbs / stream_gbs,
                    "speedup_vs_best_torch": best_torch / med if k == "fusedopt" else None,
                })
            del impls
    return rows


def bench_dropout(args, device, timer, stream, progress):
    """fusedopt's dropout against torch.nn.functional.dropout: forward, in-place forward and forward+backward,
    interleaved, with a stream pass timed per repetition for the "% of stream" column. GB/s counts the bytes a
    pass must move: read x, write y (2 per element a pass; fwd+bwd two passes)."""
    from fusedopt.nn import functional as F

    rows = []
    cases = [("16M fp32", (16 * 2**20,), torch.float32), ("8x1024x4096 bf16", (8, 1024, 4096), torch.bfloat16)]
    for label, shape, dtype in cases:
        x = torch.randn(shape, device=device).to(dtype).requires_grad_()
        dy = torch.randn(shape, device=device).to(dtype)
        work = [x.detach().clone(), x.detach().clone()]  # in-place targets, one each
        impls = {
            "fusedopt fwd": lambda: F.dropout(x.detach(), 0.1, True),
            "torch fwd": lambda: torch.nn.functional.dropout(x.detach(), 0.1, True),
            "fusedopt fwd, inplace": lambda: F.dropout(work[0], 0.1, True, inplace=True),
            "torch fwd, inplace": lambda: torch.nn.functional.dropout(work[1], 0.1, True, inplace=True),
            # autograd.grad, not backward(): accumulating into x.grad would add a pass of torch's own
            "fusedopt fwd+bwd": lambda: torch.autograd.grad(F.dropout(x, 0.1, True), x, dy),
            "torch fwd+bwd": lambda: torch.autograd.grad(torch.nn.functional.dropout(x, 0.1, True), x, dy),
        }
        for f in impls.values():
            f()
        times = {k: [] for k in impls}
        stream_times = []
        for _ in range(args.reps):
            for k, f in impls.items():
                times[k].append(timer(f))
            stream_times.append(stream.time())
            progress.step(f"dropout / {label}")
            for w in work:  # keep the in-place targets' values from growing by 1/0.9 per pass
                w.copy_(x.detach())
        stream_gbs = stream.gb_s(stream_times)
        n = x.numel()
        for k, v in times.items():
            med = statistics.median(v)
            passes = 2 if "fwd+bwd" in k else 1
            gbs = passes * 2 * n * x.element_size() / med / 1e9
            torch_k = k.replace("fusedopt", "torch")
            rows.append({"case": label, "impl": k, "median_ms": med * 1e3, "gb_s": gbs, "stream_gb_s": stream_gbs,
                         "pct_stream": 100 * gbs / stream_gbs,
                         "speedup_vs_torch": statistics.median(times[torch_k]) / med if k != torch_k else None})
        # What backward keeps: torch a bool mask (1 B/element), fusedopt (seed, offset).
        rows.append({"case": label, "impl": "saved for backward", "torch_bytes": n, "fusedopt_bytes": 16})
    return rows


def table(rows, drop_rows):
    lines = ["| optimizer | layout | implementation | median ms | GB/s | stream GB/s | % of stream "
             "| fusedopt speed-up |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = f"{r['speedup_vs_best_torch']:.2f}x" if r["speedup_vs_best_torch"] is not None else ""
        lines.append(f"| {r['optimizer']} | {r['layout']} ({r['tensors']} tensors, {r['params'] / 1e6:.1f}M) | "
                     f"{r['impl']} | {r['median_ms']:.2f} | {r['gb_s']:.1f} | {r['stream_gb_s']:.1f} | "
                     f"{r['pct_stream']:.0f}% | {s} |")
    if drop_rows:
        lines += ["", "| dropout case | implementation | median ms | GB/s | % of stream | fusedopt speed-up |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in drop_rows:
            if "median_ms" in r:
                s = f"{r['speedup_vs_torch']:.2f}x" if r["speedup_vs_torch"] is not None else ""
                lines.append(f"| {r['case']} | {r['impl']} | {r['median_ms']:.2f} | {r['gb_s']:.1f} | "
                             f"{r['pct_stream']:.0f}% | {s} |")
            else:
                lines.append(f"| {r['case']} | bytes saved for backward | torch {r['torch_bytes']:,} | "
                             f"fusedopt {r['fusedopt_bytes']} | | |")
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


def main(argv=None):
    ap = argparse.ArgumentParser(prog="fusedopt-bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizers", default="adam,adamw,sgd,adagrad,rmsprop",
                    help="comma-separated: " + ", ".join(OPTIMIZERS))
    ap.add_argument("--layouts", default="single,layered,many-small",
                    help=f"comma-separated presets ({', '.join(PRESETS)}) or NAME:SIZExCOUNT+SIZExCOUNT")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--reps", type=int, default=10, help="timed steps per implementation (median)")
    ap.add_argument("--no-dropout", action="store_true", help="skip the dropout section")
    ap.add_argument("--out", default="results", help="folder for results.json, results.md, results.png")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    args.optimizers = [o for o in args.optimizers.split(",") if o]
    args.layouts = [l.replace("+", ",") for l in args.layouts.split(",") if l]
    for o in args.optimizers:
        if o not in OPTIMIZERS:
            ap.error(f"unknown optimizer {o!r}")
    args.dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    timer = Timer(device)

    steps = args.reps * (len(args.optimizers) * len(args.layouts) + (0 if args.no_dropout else 2))
    progress = Progress(steps, enabled=not args.quiet)
    stream_n = 2**30 // 4 if device.type == "cuda" else 32 * 2**20
    stream = Stream(stream_n, device, timer)
    rows = bench_optimizers(args, device, timer, stream, progress)
    # The rows' stream figures (one median per row) summarised for the header.
    stream_gbs = statistics.median(r["stream_gb_s"] for r in rows) if rows else float("nan")
    drop_rows = [] if args.no_dropout else bench_dropout(args, device, timer, stream, progress)

    machine = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "dtype": str(args.dtype), "reps": args.reps, "stream_gb_s": stream_gbs,
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    md = (f"fusedopt-bench on {machine['device_name']} ({machine['threads']} threads), torch {torch.__version__}, "
          f"{args.dtype}; median of {args.reps} interleaved steps; stream a+=s*b, timed with every row: "
          f"{stream_gbs:.1f} GB/s (median of rows)\n\n"
          + table(rows, drop_rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"machine": machine, "optimizers": rows, "dropout": drop_rows},
                                                 indent=1))
    (out / "results.md").write_text(md + "\n")
    drew = chart(rows, out / "results.png")
    print(md)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}" + (f", {out / 'results.png'}" if drew else ""))
    return 0
