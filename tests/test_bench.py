"""fusedopt-bench end to end on tiny layouts: every optimizer row, the interleaved stream column, the dropout
section, and the three output files (the figures themselves are measured by `make bench`, not here)."""
import json

from fusedopt.bench import main, parse_layout


def test_parse_layout():
    assert parse_layout("mix:4096x2,17x3") == ("mix", [(4096,)] * 2 + [(17,)] * 3)
    name, shapes = parse_layout("gpt2-small")
    assert name == "gpt2-small" and len(shapes) == 148


def test_cli_writes_every_row(tmp_path, capsys):
    assert main(["--layouts", "t:100x3+7x2", "--reps", "2", "--quiet", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    rows = data["optimizers"]
    assert {r["optimizer"] for r in rows} == {"adam", "adamw", "sgd", "adagrad", "rmsprop"}
    for r in rows:
        assert r["tensors"] == 5 and r["params"] == 314 and r["median_ms"] > 0 and r["stream_gb_s"] > 0
        assert (r["speedup_vs_best_torch"] is not None) == (r["impl"] == "fusedopt")
    assert not any(r["impl"] == "torch fused" for r in rows if r["optimizer"] == "rmsprop")  # torch has none
    drop = {(r["case"], r["impl"]) for r in data["dropout"]}
    for case in ("16M fp32", "8x1024x4096 bf16"):
        for impl in ("fwd", "fwd, inplace", "fwd+bwd"):
            assert (case, f"fusedopt {impl}") in drop and (case, f"torch {impl}") in drop
    assert (tmp_path / "results.png").stat().st_size > 0
    assert "| dropout case |" in (tmp_path / "results.md").read_text()
    assert "fusedopt speed-up" in capsys.readouterr().out
