"""fusedopt-bench end to end on tiny CPU layouts: every optimizer row, the interleaved yardstick columns, the
dropout section, the three output files, adam-masked's ratio, the difference guard, the budget, and the CUDA
paths' CPU stand-ins (the copy yardstick, graph-capture errors). The figures themselves are measured by
`make bench` and benchmarks/gpu_check.sh, not here; the GPU presets are parsed, not run."""
import json
import math
import platform
import subprocess
import sys
import time

import pytest
import torch

import fusedopt
import fusedopt.bench as bench
from fusedopt.bench import main, parse_layout


def run(tmp_path, *args):
    """main() on a tiny layout without the dropout section: (exit code, results.json, results.md)."""
    rc = main(["--layouts", "t:100x3", "--reps", "2", "--quiet", "--no-dropout", "--out", str(tmp_path), *args])
    return rc, json.loads((tmp_path / "results.json").read_text()), (tmp_path / "results.md").read_text()


def test_parse_layout():
    assert parse_layout("mix:4096x2,17x3") == ("mix", [(4096,)] * 2 + [(17,)] * 3)
    name, shapes = parse_layout("gpt2-small")
    assert name == "gpt2-small" and len(shapes) == 148
    assert sum(math.prod(s) for s in shapes) == 124_439_808


def test_gpu_presets():
    assert parse_layout("single-1e9") == ("single-1e9", [(10**9,)])
    _, gpt = parse_layout("gpt-1b")
    assert len(gpt) == 292 and 1.0e9 < sum(math.prod(s) for s in gpt) < 1.02e9
    _, small = parse_layout("many-small-10k")
    sizes = [n for (n,) in small]
    assert len(sizes) == 10_000 and min(sizes) >= 100 and max(sizes) <= 10_000
    assert small == parse_layout("many-small-10k")[1]  # seeded


def test_cli_writes_every_row(tmp_path, capsys):
    assert main(["--layouts", "t:100x3+7x2", "--reps", "2", "--quiet", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    rows = data["optimizers"]
    assert {r["optimizer"] for r in rows} == {"adam", "adamw", "sgd", "adagrad", "rmsprop"}
    for r in rows:
        assert r["tensors"] == 5 and r["params"] == 314 and r["median_ms"] > 0 and r["stream_gb_s"] > 0
        assert r["host_ms"] > 0 and "pct_copy" not in r and "graph_ms" not in r and "graph_error" not in r
        assert (r["speedup_vs_best_torch"] is not None) == (r["impl"] == "fusedopt")
        assert r["max_rel_diff_vs_fusedopt"] < 1e-5 if r["impl"] != "fusedopt" else "max_rel_diff_vs_fusedopt" not in r
    assert not any(r["impl"] == "torch fused" for r in rows if r["optimizer"] == "rmsprop")  # torch has none
    drop = {(r["case"], r["impl"]) for r in data["dropout"]}
    strided = ("16x64x128x128 fp32 channels_last", "8x16x1024x128 fp32 heads transposed")
    for case in ("16M fp32", "8x1024x4096 bf16") + strided:
        for impl in ("fwd", "fwd, inplace", "fwd+bwd") + (() if case in strided else ("bias_dropout_add",)):
            assert (case, f"fusedopt {impl}") in drop and (case, f"torch {impl}") in drop
    assert data["skipped"] == [] and data["mismatches"] == []
    assert (tmp_path / "results.png").stat().st_size > 0
    md = (tmp_path / "results.md").read_text()
    assert "| dropout case |" in md and "% of copy" not in md and "host ms" not in md
    assert "fusedopt speed-up" in capsys.readouterr().out


def test_adam_masked_reports_its_ratio_to_unmasked(tmp_path):
    rc, data, md = run(tmp_path, "--optimizers", "adam,adam-masked")
    assert rc == 0
    rows = {(r["optimizer"], r["impl"]): r for r in data["optimizers"]}
    masked = rows["adam-masked", "fusedopt"]
    assert masked["masked_over_unmasked"] == pytest.approx(masked["median_ms"] / rows["adam", "fusedopt"]["median_ms"])
    # torch has no masking: its rows are its plain Adam, timed again, and not compared with the masked result
    assert {i for o, i in rows if o == "adam-masked"} == {"fusedopt", "torch for-loop", "torch foreach", "torch fused"}
    assert all("max_rel_diff_vs_fusedopt" not in r for (o, _), r in rows.items() if o == "adam-masked")
    assert "masked/unmasked" in md and "grad_keep_prob=0.5" in md
    rc, data, md = run(tmp_path, "--optimizers", "adam-masked")
    assert rc == 0 and "masked/unmasked" not in md
    assert not any("masked_over_unmasked" in r for r in data["optimizers"])


def test_copy_yardstick_and_graph_errors_on_cpu(tmp_path):
    """--copy times the CUDA yardstick on the CPU; a --graph-layouts layout on the CPU records why each
    implementation could not be captured, and the run goes on."""
    rc, data, md = run(tmp_path, "--optimizers", "adam,sgd", "--copy", "--graph-layouts", "t")
    assert rc == 0
    assert data["machine"]["copy_gb_s"] > 0 and data["machine"]["graph_layouts"] == ["t"]
    for r in data["optimizers"]:
        assert r["copy_gb_s"] > 0 and r["pct_copy"] > 0
        assert r["graph_error"]
    assert {r["graph_error"] for r in data["optimizers"] if r["impl"] == "fusedopt"} == {
        "RuntimeError: CUDA graphs need a CUDA device"}
    assert "% of copy" in md and "CUDA-graph replays" in md


def test_cuda_table_has_host_time():
    row = {"optimizer": "adam", "layout": "t", "tensors": 3, "params": 300, "impl": "fusedopt", "median_ms": 0.5,
           "host_ms": 0.1, "gb_s": 1.0, "stream_gb_s": 2.0, "pct_stream": 50.0, "copy_gb_s": 4.0, "pct_copy": 25.0,
           "speedup_vs_best_torch": 2.0}
    header, _, line = bench.optimizer_tables([row], host=True)
    assert "| host ms |" in header and "% of copy" in header
    assert line == "| adam | t (3 tensors, 0.0M) | fusedopt | 0.500 | 0.100 | 1.0 | 2.0 | 50% | 25% | 2.00x |"


@pytest.mark.parametrize("wrong", [1.0, math.nan])
def test_a_wrong_result_fails_the_run(tmp_path, monkeypatch, wrong):
    class WrongSGD(fusedopt.SGD):
        def step(self, closure=None):
            super().step(closure)
            self.param_groups[0]["params"][0].add_(wrong)

    monkeypatch.setattr(fusedopt, "SGD", WrongSGD)
    rc, data, md = run(tmp_path, "--optimizers", "sgd,adam")
    assert rc == 1
    assert [(m["optimizer"], m["layout"]) for m in data["mismatches"]] == [("sgd", "t")]
    assert "MISMATCH sgd / t" in md


def test_a_torch_variant_that_skips_its_update_is_not_counted(tmp_path, monkeypatch):
    """Note [Update check]: a torch variant whose probe update is off (here one that keeps whole 8-element
    blocks unchanged, as torch 2.13's fused CPU SGD does in bf16) is marked wrong and left out of torch's
    best, its row kept; the run passes while another variant agrees, and fails when none does."""
    class SGD(torch.optim.SGD):
        def __init__(self, params, skip=False, **kw):
            super().__init__(params, **kw)
            self.skip = skip

        def step(self, closure=None):
            params = [p for g in self.param_groups for p in g["params"]]
            kept = [p.detach().clone() for p in params]
            super().step(closure)
            with torch.no_grad():
                for p, k in zip(params, kept):
                    whole = p.numel() // 8 * 8 if self.skip else 0
                    p.view(-1)[:whole] = k.view(-1)[:whole]

    monkeypatch.setattr(torch.optim, "SGD", SGD)
    monkeypatch.setattr(bench, "TORCH_VARIANTS", {"torch for-loop": {"foreach": False},
                                                  "torch skipping": {"foreach": False, "skip": True}})
    rc, data, md = run(tmp_path, "--optimizers", "sgd")
    assert rc == 0 and data["mismatches"] == []
    rows = {r["impl"]: r for r in data["optimizers"]}
    assert rows["torch skipping"]["wrong_update"] and rows["torch skipping"]["update_rel_err_vs_fusedopt"] > 0.9
    assert not rows["torch for-loop"]["wrong_update"]
    assert rows["fusedopt"]["speedup_vs_best_torch"] == pytest.approx(
        rows["torch for-loop"]["median_ms"] / rows["fusedopt"]["median_ms"])
    assert "| torch skipping (wrong step: update 100% off; not counted) |" in md

    monkeypatch.setattr(bench, "TORCH_VARIANTS", {"torch skipping": {"foreach": False, "skip": True}})
    rc, data, md = run(tmp_path, "--optimizers", "sgd")
    assert rc == 1 and [m["optimizer"] for m in data["mismatches"]] == ["sgd"]
    assert "| n/a |" in md


def test_update_check_passes_torchs_correct_variants():
    """The probe step of every torch variant that does the step agrees with fusedopt's far inside the 25%
    bound, in float32 and in bfloat16 (where rounding of θ is a few percent of the update at most)."""
    for dtype in (torch.float32, torch.bfloat16):
        for opt in ("adam", "adamw", "sgd", "adagrad", "rmsprop"):
            errors = bench.update_errors(opt, dtype, torch.device("cpu"))
            assert errors["torch for-loop"] < 0.05 and errors["torch foreach"] < 0.05, (dtype, opt, errors)
            assert dtype != torch.float32 or all(e < 1e-6 for e in errors.values()), (opt, errors)


def test_a_failing_fusedopt_step_is_a_row_and_fails_the_run(tmp_path, monkeypatch):
    class FailingSGD(fusedopt.SGD):
        def step(self, closure=None):
            raise RuntimeError("kernel refused\nsecond line")

    monkeypatch.setattr(fusedopt, "SGD", FailingSGD)
    rc, data, md = run(tmp_path, "--optimizers", "sgd,adam")
    assert rc == 1
    rows = [r for r in data["optimizers"] if r["optimizer"] == "sgd"]
    assert rows[0] == {"optimizer": "sgd", "layout": "t", "tensors": 3, "params": 300, "impl": "fusedopt",
                       "error": "RuntimeError: kernel refused"}
    assert [r["impl"] for r in rows[1:]] == ["torch for-loop", "torch foreach", "torch fused"]
    assert "| fusedopt | error: RuntimeError: kernel refused |" in md


def test_a_step_that_raises_while_timed_is_a_row(tmp_path, monkeypatch):
    """A timed step that raises (out of memory: 1e9 parameters on a GPU smaller than the H200) drops that
    implementation from the row with its reason, and the others are timed on; the run fails only when it is
    fusedopt's step."""
    class Exhausted(torch.optim.SGD):
        def step(self, closure=None):
            if self.state.get("stepped"):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
            self.state["stepped"] = True
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "SGD", Exhausted)
    monkeypatch.setattr(bench, "TORCH_VARIANTS", {"torch for-loop": {"foreach": False},
                                                  "torch foreach": {"foreach": True}})
    rc, data, md = run(tmp_path, "--optimizers", "sgd,adam")
    assert rc == 0
    rows = {(r["optimizer"], r["impl"]): r for r in data["optimizers"]}
    for k in ("torch for-loop", "torch foreach"):
        assert rows["sgd", k] == {"optimizer": "sgd", "layout": "t", "tensors": 3, "params": 300, "impl": k,
                                  "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 4.00 GiB"}
        assert "median_ms" in rows["adam", k]
    assert "median_ms" in rows["sgd", "fusedopt"] and math.isnan(rows["sgd", "fusedopt"]["speedup_vs_best_torch"])
    assert "| torch foreach | error: OutOfMemoryError: CUDA out of memory. Tried to allocate 4.00 GiB |" in md

    class Exhausted(fusedopt.SGD):
        def step(self, closure=None):
            if getattr(self, "stepped", False):
                raise torch.OutOfMemoryError("CUDA out of memory")
            self.stepped = True
            return super().step(closure)

    monkeypatch.setattr(fusedopt, "SGD", Exhausted)
    rc, data, md = run(tmp_path, "--optimizers", "sgd")
    ours = [r for r in data["optimizers"] if r["impl"] == "fusedopt"]
    assert rc == 1 and ours == [{"optimizer": "sgd", "layout": "t", "tensors": 3, "params": 300, "impl": "fusedopt",
                                 "error": "OutOfMemoryError: CUDA out of memory"}]


def test_budget_skips_what_would_start_late(tmp_path, monkeypatch):
    """Each row takes 100 s of a fake clock: with --budget 200 the second layout (starting at 100 s) runs,
    the third (200 s, past 80%) and the dropout section are skipped, and the rows so far are kept."""
    clock, real = [0.0], time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: real() + clock[0])
    bench_optimizer = bench.bench_optimizer

    def slow(*args):
        clock[0] += 100
        return bench_optimizer(*args)

    monkeypatch.setattr(bench, "bench_optimizer", slow)
    rc = main(["--layouts", "a:10,b:20,c:30", "--optimizers", "sgd", "--reps", "1", "--quiet", "--budget", "200",
               "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    assert rc == 0 and data["skipped"] == ["c", "dropout"] and data["dropout"] == []
    assert {r["layout"] for r in data["optimizers"]} == {"a", "b"}
    assert "skipped (past 80% of the 200 s budget): c, dropout" in (tmp_path / "results.md").read_text()


KEPT_RSS = """
import sys, torch, fusedopt.bench as bench
if sys.argv[1] == "keep":
    bench.keep_pages()
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) * 1024
before = rss()
x = torch.ones(16 * 2**20)  # 64 MB, above glibc's largest mmap threshold
del x
print(rss() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not platform.libc_ver()[0] == "glibc",
                    reason="--keep-pages is for glibc's malloc")
def test_keep_pages(tmp_path):
    """--keep-pages (Note [Kept pages]): a freed 64 MB tensor stays in the process, where glibc's default
    unmaps it; the run says which allocator it had."""
    kept = {mode: int(subprocess.run([sys.executable, "-c", KEPT_RSS, mode], check=True, capture_output=True,
                                     text=True).stdout) for mode in ("keep", "default")}
    assert kept["keep"] > 60 * 2**20 and kept["default"] < 8 * 2**20, kept
    out = subprocess.run([sys.executable, "-m", "fusedopt.bench", "--keep-pages", "--layouts", "t:100x3",
                          "--optimizers", "sgd", "--reps", "2", "--quiet", "--no-dropout", "--out", str(tmp_path)],
                         check=True, capture_output=True, text=True).stdout
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["machine"]["allocator"] == "pages kept (--keep-pages)" and "pages kept" in out
    rc, data, md = run(tmp_path)
    assert rc == 0 and data["machine"]["allocator"] == "system malloc" and md.splitlines()[0].endswith("system malloc")
