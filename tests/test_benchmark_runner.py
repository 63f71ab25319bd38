"""Issue 27 on the built-in model and a generated shapes-PIE set: Direct Inversion, the runner, its shards
(k = 3 through Hydra's submitit_local launcher, union == unsharded) and resuming a killed run.

Few entries and few steps: these prove the machinery and the direction of the inversions' difference; the
numbers of the documented table come from `scripts/benchmark.py` on 50 entries (docs/benchmarks-pie.md).
"""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from models.loader import load_checkpoint
from p2p.edit import BlendSpec, EditSpec
from p2p.experiments.pie_bench import BenchSettings, entry_edit, read_rows, run_benchmark, shard_keys
from p2p.experiments.pie_metrics import MetricSet
from p2p.experiments.pie_report import write_summary
from p2p.pipeline import SamplerSettings, decode
from p2p.real.inversion import psnr, vae_reconstruction
from p2p.real.photo import InversionSettings, edit_photo
from p2p.shapes.pie import read_mapping, write_shapes_pie
from p2p.shapes.world import sample_scene

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
SOURCE, TARGET = "a red circle on a black background", "a blue circle on a black background"


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(REPO / "models" / "weights" / "tiny.safetensors")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_shapes_pie(tmp_path_factory.mktemp("data") / "shapes_pie", n=6, seed=0)


def sampler(model):
    return SamplerSettings(steps=STEPS, guidance=model.config.guidance)


def test_direct_inversion_source_path_is_the_trajectory_exactly(model):
    scene = sample_scene(np.random.default_rng(3), objects=[("red", "circle")], background="black")
    photo = edit_photo(
        model,
        scene.image,
        [SOURCE, TARGET],
        spec=EditSpec(kind="replace"),
        blend=None,
        settings=sampler(model),
        inversion=InversionSettings(method="direct"),
        cache_dir=None,
        progress=False,
    )
    z0 = photo.inversion.trajectory[0]
    assert torch.equal(photo.result.latents[0:1], z0)  # the edit's source branch ends on z_0, bit for bit
    assert np.array_equal(photo.reconstruction, decode(model, z0)[0])
    assert np.array_equal(photo.reconstruction, vae_reconstruction(model, scene.image))  # the VAE's bound
    assert not np.array_equal(photo.edited[1], photo.edited[0])  # the target did change


def test_direct_inversion_edit_keeps_the_background_better_than_ddim_inversion(model):
    scores = {}
    for method in ("direct", "ddim"):
        values = []
        for seed in (3, 4):
            scene = sample_scene(np.random.default_rng(seed), objects=[("red", "circle")], background="black")
            photo = edit_photo(
                model,
                scene.image,
                [SOURCE, TARGET],
                spec=EditSpec(kind="replace"),
                blend=None,
                settings=sampler(model),
                inversion=InversionSettings(method=method),
                cache_dir=None,
                progress=False,
                reconstruct=False,
            )
            values.append(psnr(photo.edited[1], scene.image, ~scene.objects[0].mask))
        scores[method] = float(np.mean(values))
    assert scores["direct"] > scores["ddim"] + 1.0, scores


def bench_settings(model, method):
    return BenchSettings(
        model="tiny",
        inversion=InversionSettings(method=method),
        edit=EditSpec(kind="auto", cross_replace_steps=0.4, self_replace_steps=0.6),
        blend=BlendSpec(),
        sampler=sampler(model),
        seed=0,
    )


def test_each_entry_is_replace_or_refine_by_word_count_with_its_blend_words(data):
    entries = read_mapping(data)
    kinds = {}
    for entry in entries.values():
        prompts, spec, blend = entry_edit(entry, spec=EditSpec(kind="auto"), blend=BlendSpec())
        kinds[entry.editing_type_id] = spec.kind
        # each blended word where its prompt has it: an added object only in the target, a deleted one only in the source
        present = {"2": [False, True], "3": [True, False]}.get(entry.editing_type_id, [True, True])
        assert blend is not None and [bool(words) for words in blend.words] == present
    assert kinds == {"6": "replace", "1": "replace", "8": "replace", "2": "refine", "3": "refine"}
    assert sorted(k for i in range(3) for k in shard_keys(list(entries), shard=i, n_shards=3)) == sorted(entries)


def test_runner_writes_images_rows_results_and_direct_beats_ddim_on_background_psnr(model, data, tmp_path):
    runs = {}
    for method in ("direct", "ddim"):
        out = tmp_path / method
        counts = run_benchmark(
            model,
            data,
            out,
            settings=bench_settings(model, method),
            metrics=MetricSet(),
            cache_dir=tmp_path / "cache",
            progress=False,
        )
        assert counts == {"done": 6, "skipped": 0, "total": 6}
        runs[method] = {row["key"]: row for row in read_rows(out)}
    entries = read_mapping(data)
    out = tmp_path / "direct"
    for entry in entries.values():  # the layout PIE-Bench's evaluate.py reads
        assert (out / "annotation_images" / entry.image_path).is_file()
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["key"] for r in table] == sorted(entries)
    assert {"key", "editing_type_id", "psnr", "mse", "ssim", "edit_success", "seconds"} <= set(table[0])
    assert "lpips" not in table[0]  # no weights given: skipped, not computed with random weights
    direct, ddim = (np.mean([r["psnr"] for r in runs[m].values()]) for m in ("direct", "ddim"))
    assert direct > ddim, (direct, ddim)
    # a rerun does nothing; the summary has the overall row, every edit type and the published rows
    again = run_benchmark(
        model,
        data,
        out,
        settings=bench_settings(model, "direct"),
        metrics=MetricSet(),
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    assert again == {"done": 0, "skipped": 6, "total": 6}
    summary = write_summary(out, label="direct + P2P")[1].read_text()
    assert "| direct + P2P | all | 6 |" in summary and "Direct Inversion + P2P (published)" in summary
    assert all(
        f"| {t} " in summary
        for t in ("6 change color", "1 change object", "8 change background", "2 add object", "3 delete object")
    )


def script(*args):
    return [sys.executable, str(REPO / "scripts" / "benchmark.py"), *args]


ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def common(data, cache):
    return [f"data={data}", f"steps={STEPS}", "threads=1", "progress=false", f"cache_dir={cache}"]


@pytest.fixture(scope="module")
def resumed(data, tmp_path_factory):
    """An unsharded run killed (SIGKILL) after two complete entries, then run again to the end."""
    root = tmp_path_factory.mktemp("resume")
    out = root / "run"
    args = script(*common(data, root / "cache"), f"hydra.run.dir={out}")
    process = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = out / "rows"
    deadline = time.monotonic() + 300
    while process.poll() is None and len(list(rows.glob("*.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in rows.glob("*.json")}
    finished = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return out, before, finished.stdout


def test_a_killed_run_resumes_without_redoing_or_losing_an_entry(data, resumed):
    out, before, stdout = resumed
    assert 2 <= len(before) < 6, "the kill came after two entries and before the last"
    after = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in (out / "rows").glob("*.json")}
    assert sorted(after) == sorted(f"{k}.json" for k in read_mapping(data))  # none lost
    assert all(after[name] == before[name] for name in before)  # none redone: the same files, untouched
    assert f"{6 - len(before)} entries edited, {len(before)} already complete" in stdout
    assert not [p for p in out.rglob("*partial*")]  # nothing half-written is left


def test_three_submitit_shards_give_exactly_the_unsharded_run(data, resumed, tmp_path):
    sweep = tmp_path / "sweep"
    args = script(
        "-m",
        "hydra/launcher=submitit_local",
        *common(data, tmp_path / "cache"),
        "shard=range(3)",
        "n_shards=3",
        f"hydra.sweep.dir={sweep}",
    )
    result = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (sharded,) = [p.parent for p in sweep.glob("*/settings.json")]  # the three shards shared one folder
    unsharded, _, _ = resumed
    assert read_rows(sharded) == [
        {**r, "seconds": s["seconds"], "inversion_seconds": s["inversion_seconds"]}
        for r, s in zip(read_rows(unsharded), read_rows(sharded))
    ]
    for image in (unsharded / "annotation_images").rglob("*.png"):
        assert image.read_bytes() == (sharded / image.relative_to(unsharded)).read_bytes()
    assert (sharded / "results.csv").read_text().count("\n") == 7  # header + every entry
