"""The digits example runs end to end (short) and both optimizers learn the same model."""
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("sklearn")


def test_train_digits_short(tmp_path):
    path = Path(__file__).parent.parent / "examples" / "train_digits.py"
    spec = importlib.util.spec_from_file_location("train_digits", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    report = example.main(["--epochs", "2", "--out", str(tmp_path)])
    for model in ("Net", "MLP"):
        acc = report[model]["accuracy"]
        assert all(acc[run] > 0.8 for run in ("torch", "torch fused", "fusedopt"))  # 10 classes: chance is 0.1
        # Same init, batches and dropout masks: only float rounding separates the runs.
        assert report[model]["max_param_diff"] < 1e-3 and report[model]["torch_fused_diff"] < 1e-3
    assert (tmp_path / "digits_loss.png").stat().st_size > 0
