"""GPU benchmark of the fused optimizer steps (DESIGN.md §7-8), for one call on a lent H200.

For Adam, AdamW, SGD (momentum 0.9), Adagrad and RMSprop on three fp32 layouts (`single`: 1e9 parameters in
one tensor; `gpt`: a ~1e9-parameter GPT-like model, 292 tensors; `many-small`: 10,000 tensors of 100..10,000
elements), times the fusedopt op against torch.optim's fused=True and foreach=True implementations, on
separate copies of the same parameters and state (gradients shared: nothing writes them), interleaved, each
step timed alone with CUDA events after a device synchronisation (so host overhead counts), median of
--steps after --warmup. Effective GB/s from the fewest bytes each rule moves (Adam 28 B/element, the others
20), as a fraction of the device-to-device copy bandwidth measured in the same run (dst.copy_(src), bytes
read + written), and the speed-up over the best torch variant. Writes JSON (--out) and prints a markdown
table last.

    python3 benchmarks/gpu_bench.py --out results/gpu_bench.json
    python3 benchmarks/gpu_bench.py --dry-run        # tiny CPU tensors and the CPU ops: checks the script
"""
import argparse
import gc
import inspect
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import fusedopt._ext  # noqa: E402  (registers torch.ops.fusedopt.*)

OPS = torch.ops.fusedopt

# Fewest bytes per fp32 element each rule must move (each array read once, each output written once).
BYTES = {"Adam": 28, "AdamW": 28, "SGD": 20, "Adagrad": 20, "RMSprop": 20}
OPTIMIZERS = {
    "Adam": (torch.optim.Adam, dict(lr=1e-3)),
    "AdamW": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
    "SGD": (torch.optim.SGD, dict(lr=1e-3, momentum=0.9)),
    "Adagrad": (torch.optim.Adagrad, dict(lr=1e-2)),
    "RMSprop": (torch.optim.RMSprop, dict(lr=1e-2)),
}


def gpt_sizes(hidden, layers, vocab=50257, context=1024):
    """Parameter sizes of a GPT-2-style decoder: embeddings, per layer LN, QKV, projection, LN, MLP."""
    h = hidden
    sizes = [vocab * h, context * h]
    for _ in range(layers):
        sizes += [h, h, 3 * h * h, 3 * h, h * h, h, h, h, 4 * h * h, 4 * h, 4 * h * h, h]
    return sizes + [h, h]


def layouts(dry):
    gen = torch.Generator().manual_seed(0)
    if dry:
        return {"single": [10_000], "gpt": gpt_sizes(32, 2, vocab=100, context=16),
                "many-small": torch.randint(10, 101, (50,), generator=gen).tolist()}
    return {"single": [1_000_000_000], "gpt": gpt_sizes(1792, 24),
            "many-small": torch.randint(100, 10_001, (10_000,), generator=gen).tolist()}


class Timer:
    """Times one callable per call: CUDA events after a synchronisation, or the host clock on the CPU."""

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


def copy_bandwidth(device, numel, timer, reps):
    """Device-to-device copy, bytes read + written, GB/s (median); and the extension's a += s·b stream."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    copy = [timer(lambda: dst.copy_(src))[0] for _ in range(reps + 2)][2:]
    stream = [timer(lambda: OPS.stream_(dst, src, 0.5))[0] for _ in range(reps + 2)][2:]
    del src, dst
    return {"copy_GBps": 8 * numel / statistics.median(copy) / 1e9,
            "stream_GBps": 12 * numel / statistics.median(stream) / 1e9, "numel": numel}


class Fused:
    """fusedopt's op on its own parameter and state lists; steps on the params' device."""

    def __init__(self, name, params, grads):
        self.name, self.params, self.grads = name, params, grads
        dev = params[0].device
        self.steps = [torch.zeros((), device=dev) for _ in params]
        self.indices = list(range(len(params)))
        zeros = lambda: [torch.zeros_like(p) for p in params]  # noqa: E731
        if name in ("Adam", "AdamW"):
            self.state = [zeros(), zeros(), []]
        elif name == "SGD":
            self.state = [zeros()]
        elif name == "Adagrad":
            self.state = [zeros()]
        else:
            self.state = [zeros(), [], []]

    def step(self):
        p, g, s, st, ix = self.params, self.grads, self.state, self.steps, self.indices
        if self.name == "Adam":
            OPS.adam_(p, g, *s, st, ix, lr=1e-3)
        elif self.name == "AdamW":
            OPS.adam_(p, g, *s, st, ix, lr=1e-3, weight_decay=1e-2, decoupled_weight_decay=True)
        elif self.name == "SGD":
            OPS.sgd_(p, g, *s, st, ix, lr=1e-3, momentum=0.9)
        elif self.name == "Adagrad":
            OPS.adagrad_(p, g, *s, st, ix, lr=1e-2)
        else:
            OPS.rmsprop_(p, g, *s, st, ix, lr=1e-2, alpha=0.99)


class Torch:
    """torch.optim with fused=True or foreach=True on its own parameter copies (gradients shared);
    capturable=True (where the class has it) for CUDA-graph timing."""

    def __init__(self, name, params, grads, mode, capturable=False):
        cls, options = OPTIMIZERS[name]
        self.params = params
        for p, g in zip(params, grads):
            p.grad = g
        if capturable and "capturable" in inspect.signature(cls).parameters:
            options = dict(options, capturable=True)
        self.opt = cls(params, **options, **{mode: True})

    def step(self):
        self.opt.step()


def graph_times(impl, timer, reps):
    """Replays of one step captured in a CUDA graph: the device time alone, without host overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        impl.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        impl.step()
    times = [timer(graph.replay)[0] for _ in range(reps + 2)][2:]
    del graph
    return times


def bench_layout(layout, sizes, device, timer, args):
    """Every optimizer × implementation on one layout; returns result rows."""
    gen = torch.Generator(device=device).manual_seed(1)
    numel = sum(sizes)
    grads = [torch.randn(n, device=device, generator=gen) * 1e-2 for n in sizes]
    base = [torch.randn(n, device=device, generator=gen) for n in sizes]
    rows = []
    for name in args.optimizers:
        impls = {"fusedopt": lambda: Fused(name, [b.clone() for b in base], grads)}
        for mode in ("fused", "foreach"):
            if mode not in inspect.signature(OPTIMIZERS[name][0]).parameters:
                continue  # torch has no fused RMSprop
            impls[f"torch-{mode}"] = (lambda m: lambda capturable=False: Torch(
                name, [b.clone().requires_grad_() for b in base], grads, m, capturable))(mode)
        built, errors = {}, {}
        for key, make in impls.items():
            try:
                built[key] = make()
                built[key].step()  # creates torch's state; first launches
            except (RuntimeError, TypeError, ValueError) as e:
                errors[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                built.pop(key, None)
        graphs, graph_errors = {}, {}
        if device.type == "cuda" and layout in args.graph_layouts:
            for key, make in impls.items():
                try:
                    impl = make(capturable=True) if key != "fusedopt" else make()
                    impl.step()
                    graphs[key] = graph_times(impl, timer, args.steps)
                except Exception as e:  # an extra measurement: record why, keep going
                    graph_errors[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                impl = None
                torch.cuda.synchronize()
        times = {k: [] for k in built}
        hosts = {k: [] for k in built}
        for rep in range(args.warmup + args.steps):
            for key, impl in built.items():
                t, h = timer(impl.step)
                if rep >= args.warmup:
                    times[key].append(t)
                    hosts[key].append(h)
        # Same inputs, same number of steps: fusedopt and torch agree to fp32 rounding.
        diffs = {}
        if "fusedopt" in built:
            ours = built["fusedopt"].params
            m = torch.stack([a[:1 << 20].abs().max() for a in ours if a.numel()]).max()
            for key in built:
                if key != "fusedopt":
                    d = torch.stack([(a[:1 << 20] - b.detach()[:1 << 20]).abs().max()
                                     for a, b in zip(ours, built[key].params) if a.numel()]).max()
                    diffs[key] = (d / m).item()
            del ours
        for key in impls:
            row = {"layout": layout, "optimizer": name, "impl": key, "tensors": len(sizes), "numel": numel}
            if key in errors:
                row["error"] = errors[key]
            else:
                med = statistics.median(times[key])
                row.update(ms=med * 1e3, host_ms=statistics.median(hosts[key]) * 1e3,
                           GBps=BYTES[name] * numel / med / 1e9, times_ms=[t * 1e3 for t in times[key]])
                if key in diffs:
                    row["max_rel_diff_vs_fusedopt"] = diffs[key]
            if key in graphs:
                row["graph_ms"] = statistics.median(graphs[key]) * 1e3
                row["graph_GBps"] = BYTES[name] * numel / statistics.median(graphs[key]) / 1e9
            elif key in graph_errors:
                row["graph_error"] = graph_errors[key]
            rows.append(row)
        del built, impls
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del grads, base
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def summarize(rows, bandwidth):
    """Adds % of copy bandwidth and speed-up over the best torch variant to fusedopt's rows."""
    for row in rows:
        if row["impl"] != "fusedopt" or "ms" not in row:
            continue
        row["pct_of_copy"] = 100 * row["GBps"] / bandwidth["copy_GBps"]
        torch_ms = {r["impl"]: r["ms"] for r in rows if r["layout"] == row["layout"]
                    and r["optimizer"] == row["optimizer"] and r["impl"] != "fusedopt" and "ms" in r}
        if torch_ms:
            best = min(torch_ms, key=torch_ms.get)
            row["best_torch"] = best
            row["speedup_vs_best_torch"] = torch_ms[best] / row["ms"]
            if "torch-fused" in torch_ms:
                row["speedup_vs_torch_fused"] = torch_ms["torch-fused"] / row["ms"]
        torch_graph = {r["impl"]: r["graph_ms"] for r in rows if r["layout"] == row["layout"]
                       and r["optimizer"] == row["optimizer"] and r["impl"] != "fusedopt" and "graph_ms" in r}
        if "graph_ms" in row and torch_graph:
            row["graph_speedup_vs_best_torch"] = min(torch_graph.values()) / row["graph_ms"]


def table(rows, bandwidth):
    lines = [f"copy bandwidth {bandwidth['copy_GBps']:.0f} GB/s (read+write), fusedopt stream_ "
             f"{bandwidth['stream_GBps']:.0f} GB/s", "",
             "| layout | optimizer | fusedopt ms | GB/s | % copy | torch fused ms | torch foreach ms | "
             "x best torch | x fused |",
             "|---|---|---|---|---|---|---|---|---|"]
    by = {(r["layout"], r["optimizer"], r["impl"]): r for r in rows}
    fmt = lambda r, k, f: (f.format(r[k]) if r and k in r else ("err" if r and "error" in r else "-"))  # noqa
    for (layout, name, impl), r in by.items():
        if impl != "fusedopt":
            continue
        fu, fe = by.get((layout, name, "torch-fused")), by.get((layout, name, "torch-foreach"))
        lines.append(f"| {layout} | {name} | {fmt(r, 'ms', '{:.3f}')} | {fmt(r, 'GBps', '{:.0f}')} | "
                     f"{fmt(r, 'pct_of_copy', '{:.1f}')} | {fmt(fu, 'ms', '{:.3f}')} | {fmt(fe, 'ms', '{:.3f}')} | "
                     f"{fmt(r, 'speedup_vs_best_torch', '{:.2f}')} | {fmt(r, 'speedup_vs_torch_fused', '{:.2f}')} |")
    graphed = [r for r in rows if r["impl"] == "fusedopt" and "graph_ms" in r]
    if graphed:
        lines += ["", "CUDA-graph replays (device time only, no host overhead):", "",
                  "| layout | optimizer | fusedopt ms | GB/s | torch fused ms | torch foreach ms | x best torch |",
                  "|---|---|---|---|---|---|---|"]
        for r in graphed:
            fu = by.get((r["layout"], r["optimizer"], "torch-fused"))
            fe = by.get((r["layout"], r["optimizer"], "torch-foreach"))
            lines.append(f"| {r['layout']} | {r['optimizer']} | {r['graph_ms']:.3f} | {r['graph_GBps']:.0f} | "
                         f"{fmt(fu, 'graph_ms', '{:.3f}')} | {fmt(fe, 'graph_ms', '{:.3f}')} | "
                         f"{fmt(r, 'graph_speedup_vs_best_torch', '{:.2f}')} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the JSON results here")
    ap.add_argument("--dry-run", action="store_true", help="tiny CPU tensors and the CPU ops")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per implementation")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--layouts", nargs="+", default=["single", "gpt", "many-small"])
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    ap.add_argument("--graph-layouts", nargs="*", default=["many-small"],
                    help="layouts also timed as CUDA-graph replays (device time without host overhead)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds: layouts that would start after 80%% of this are skipped (results so far kept)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    if args.dry_run:
        device = torch.device("cpu")
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_bench.py needs a CUDA GPU (or --dry-run)")
        if not fusedopt._ext.HAS_CUDA_KERNELS:
            sys.exit("fusedopt was built without its CUDA kernels: build with FUSEDOPT_CUDA=1")
        device = torch.device("cuda")
    timer = Timer(device)
    shapes = layouts(args.dry_run)
    bandwidth = copy_bandwidth(device, 10_000 if args.dry_run else 1 << 29, timer, args.steps)
    print(f"copy {bandwidth['copy_GBps']:.0f} GB/s, stream_ {bandwidth['stream_GBps']:.0f} GB/s", flush=True)
    rows, skipped = [], []

    def save():
        """Writes the JSON so far: a run cut short still leaves every finished layout."""
        summarize(rows, bandwidth)
        result = {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "fusedopt_build": fusedopt._ext.BUILD,
            "steps": args.steps, "warmup": args.warmup, "bandwidth": bandwidth,
            "layouts": {k: {"tensors": len(v), "numel": sum(v)} for k, v in shapes.items() if k in args.layouts},
            "skipped_layouts": skipped, "rows": rows, "seconds": time.perf_counter() - t_start,
        }
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))

    for layout in args.layouts:
        if args.budget is not None and time.perf_counter() - t_start > 0.8 * args.budget:
            skipped.append(layout)
            print(f"{layout}: skipped (out of the {args.budget:.0f} s budget)", flush=True)
            continue
        t0 = time.perf_counter()
        new = bench_layout(layout, shapes[layout], device, timer, args)
        rows += new
        for r in new:
            print(f"{layout:10s} {r['optimizer']:8s} {r['impl']:14s} "
                  + (f"{r['ms']:9.3f} ms {r['GBps']:7.0f} GB/s host {r['host_ms']:7.3f} ms" if "ms" in r
                     else r["error"]), flush=True)
        print(f"{layout}: {time.perf_counter() - t0:.1f} s", flush=True)
        save()
    save()
    failed = [r for r in rows if r["impl"] == "fusedopt" and "error" in r]
    bad = [r for r in rows if r.get("max_rel_diff_vs_fusedopt", 0) > 1e-3 or math.isnan(
        r.get("max_rel_diff_vs_fusedopt", 0))]
    for r in bad:
        print(f"MISMATCH {r['layout']} {r['optimizer']} {r['impl']}: max rel diff {r['max_rel_diff_vs_fusedopt']:.2e}")
    print(f"total {time.perf_counter() - t_start:.1f} s\n")
    print(table(rows, bandwidth))
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
