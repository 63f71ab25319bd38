"""`scripts/bench.py diffusers=true` (issue 26) on a tiny SD-1.x-shaped random model: the four schemes run, each
in its own process; the printed ratios are the ratios of the measured numbers; and diffusers' pipeline and our
plain sampling draw the same images from the file (so the same weights and settings are what is compared)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

from models.loader import save_checkpoint  # noqa: E402
from models.stable_diffusion import ModelConfig, StableDiffusion  # noqa: E402
from models.text import TextConfig  # noqa: E402
from models.unet import UNetConfig  # noqa: E402
from models.vae import VAEConfig  # noqa: E402
from p2p.experiments.side_by_side import RATIOS, SIDE_BY_SIDE  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAX_PIXEL_DIFF = 2  # out of 255, as tests/test_parity_pipeline.py
SIZE = 64


def tiny_sd1_config() -> ModelConfig:
    """SD 1.x's architecture (cross-attention at every attended level, HF-layout CLIP text, VAE factor 8) at toy
    widths: what diffusers' StableDiffusionPipeline can hold."""
    return ModelConfig(
        name="tiny-sd1",
        unet=UNetConfig(
            model_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(1, 2),
            num_heads=2,
            context_dim=32,
        ),
        vae=VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
        text=TextConfig(width=32, heads=2, layers=2, hf_layout=True),
        image_size=SIZE,
    )


def bench(*overrides: str, cwd: Path, python: list[str] | None = None) -> subprocess.CompletedProcess:
    command = python or [sys.executable, str(REPO / "scripts" / "bench.py")]
    return subprocess.run([*command, *overrides], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_side_by_side_runs_four_schemes_and_reports_their_ratios(random_model, tmp_path):
    # the model's config travels in the file's metadata, which model=tiny with a checkpoint reads
    path = save_checkpoint(
        random_model(lambda: StableDiffusion(tiny_sd1_config()), seed=5), tmp_path / "tiny-sd1.safetensors"
    )
    run_dir = tmp_path / "run"
    args = (
        "diffusers=true",
        f"model.checkpoint={path}",
        "steps=2",
        "repeats=1",
        "threads=1",
        f"hydra.run.dir={run_dir}",
    )
    done = bench(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)
    measured = json.loads((run_dir / "side_by_side.json").read_text())
    (runs,) = measured["rounds"]
    assert [run["scheme"] for run in runs] == list(SIDE_BY_SIDE)
    assert all(run["seconds"] > 0 and run["peak_extra_bytes"] >= 0 for run in runs)
    assert measured["max_pixel_difference"] <= MAX_PIXEL_DIFF, "our plain sampling draws other images than diffusers"
    assert f"max pixel difference {measured['max_pixel_difference']:.2f}/255" in done.stdout

    index = {scheme: i for i, scheme in enumerate(SIDE_BY_SIDE)}
    printed = [line for line in done.stdout.splitlines() if re.match(r"\s+\(\d\)/\(\d\)", line)]
    assert len(printed) == len(RATIOS)
    for (numerator, denominator, _), line in zip(RATIOS, printed, strict=True):
        a, b = runs[index[numerator]], runs[index[denominator]]
        numbers = [float(x) for x in re.findall(r"\d+\.\d+", line)[:6]]  # time min/median/max, memory min/median/max
        time_ratio, memory_ratio = a["seconds"] / b["seconds"], a["peak_extra_bytes"] / b["peak_extra_bytes"]
        assert numbers == pytest.approx([time_ratio] * 3 + [memory_ratio] * 3, abs=1e-3), line


def test_side_by_side_refuses_models_diffusers_has_no_pipeline_for(tmp_path):
    done = bench("diffusers=true", "steps=2", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)  # the built-in tiny
    assert done.returncode == 2 and done.stderr.startswith("error: model 'tiny' has no diffusers pipeline"), done.stderr


def test_side_by_side_without_diffusers_says_which_extra_to_install(tmp_path):
    hide = "import runpy, sys; sys.modules['diffusers'] = None; sys.argv[0] = sys.argv[1]; del sys.argv[1]; "
    launch = [
        sys.executable,
        "-c",
        hide + "runpy.run_path(sys.argv[0], run_name='__main__')",
        str(REPO / "scripts" / "bench.py"),
    ]
    done = bench("diffusers=true", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, python=launch)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith("error: diffusers=true needs diffusers") and "pip install -e '.[bench]'" in lines[0]
