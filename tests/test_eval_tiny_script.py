"""scripts/eval_tiny.py as a user runs it: the shared override names, its own run folder, every metric."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "eval_tiny.py"), *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=1200,
    )


def test_eval_tiny_reports_every_metric_and_its_config(tmp_path):
    done = run(
        "n=2",
        "steps=4",
        "batch_size=3",
        f"hydra.run.dir={tmp_path}/run",
        f"model.checkpoint={REPO / 'models' / 'weights' / 'tiny.safetensors'}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["n"] == 2 and results["images"] == 6 and results["steps"] == 4 and results["guidance"] == 5.0
    expected = {
        "one.color",
        "one.shape",
        "one.background",
        "one.exactly_one",
        "one.all",
        "two.both_right",
        "two.background",
        "two.all",
        "layout.moved",
        "layout.mean_iou",
    }
    assert set(results["metrics"]) == expected
    for value, n in results["metrics"].values():  # null where no image qualified (e.g. layout needs both right)
        assert (value is None) == (n == 0) and (value is None or 0 <= value <= 1) and 0 <= n <= 2
    assert (tmp_path / "run" / "samples.png").exists() and (tmp_path / "run" / "config.yaml").exists()
    # the same folder again: refused, nothing overwritten
    again = run("n=1", "steps=2", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr


def test_eval_tiny_names_a_bad_seed_count(tmp_path):
    done = run("n=0", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert done.returncode != 0 and "n=0 is out of range; use an integer ≥ 1" in done.stderr
