"""The Hydra entry points as a user runs them: files written, config saved, nothing overwritten, errors named."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.loader import save_checkpoint
from models.stable_diffusion import StableDiffusion, preset
from p2p.shapes.reader import matches_caption, read_image
from p2p.shapes.world import sample_scene

REPO = Path(__file__).resolve().parents[1]
PROMPTS = '["a red circle on a black background","a blue circle on a black background"]'


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny_random.safetensors"
    return save_checkpoint(StableDiffusion(preset("tiny")), path, dtype="fp16")


def run(script: str, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=1200,
    )


def only_run_dir(root: Path) -> Path:
    dirs = [p for p in root.glob("*/*") if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_edit_script_writes_images_grid_baseline_attention_and_config(checkpoint, tmp_path):
    common = (
        f"model.checkpoint={checkpoint}",
        f"prompts={PROMPTS}",
        "steps=2",
        "seed=5",
        "progress=false",
        f"hydra.run.dir={tmp_path}/run",
        "baseline=true",
        "attention=true",
        "blend=local",
        "blend.words=[circle]",
    )
    result = run("edit.py", *common, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "run"
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))  # .hydra: Hydra's own record
    assert names[:2] == ["00_a_red_circle_on_a_black_background.png", "01_a_blue_circle_on_a_black_background.png"]
    for name in ("grid.png", "blend_mask.png", "config.yaml", "baseline", "attention"):
        assert name in names
    assert len(list((out / "baseline").glob("*.png"))) == 2 and len(list((out / "attention").glob("*.png"))) == 2
    config = (out / "config.yaml").read_text()
    assert "cross_replace_steps: 0.8" in config and "seed: 5" in config
    assert str(out) in result.stdout
    # the same folder again: refused, and the first run's files are intact
    before = (out / "grid.png").read_bytes()
    again = run("edit.py", *common, cwd=tmp_path)
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr
    assert (out / "grid.png").read_bytes() == before


def test_edit_script_names_bad_input(checkpoint, tmp_path):
    result = run(
        "edit.py",
        f"model.checkpoint={checkpoint}",
        "steps=2",
        "progress=false",
        "height=30",
        f"hydra.run.dir={tmp_path}/bad",
        cwd=tmp_path,
    )
    assert result.returncode != 0 and "height=30" in result.stderr
    result = run(
        "edit.py",
        f"model.checkpoint={checkpoint}",
        "steps=2",
        "progress=false",
        "edit.reweight={dog: 2}",
        f"hydra.run.dir={tmp_path}/bad2",
        cwd=tmp_path,
    )
    assert result.returncode != 0 and "word 'dog' is not in prompt" in result.stderr
    result = run("edit.py", "model=sd15", "steps=2", f"hydra.run.dir={tmp_path}/bad3", cwd=tmp_path)
    assert result.returncode != 0 and "model.checkpoint" in result.stderr


def test_edit_image_script_inverts_reconstructs_edits_and_reports(checkpoint, tmp_path):
    photo = tmp_path / "photo.png"
    Image.fromarray(sample_scene(np.random.default_rng(0), num_objects=1).image).save(photo)
    overrides = (
        f"model.checkpoint={checkpoint}",
        f"image={photo}",
        f"prompts={PROMPTS}",
        "steps=2",
        "inversion.inner_steps=2",
        "progress=false",
        f"cache_dir={tmp_path}/cache",
    )
    first = run("edit_image.py", *overrides, f"hydra.run.dir={tmp_path}/a", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    out = tmp_path / "a"
    for name in (
        "original.png",
        "vae_reconstruction.png",
        "inversion_reconstruction.png",
        "grid.png",
        "00_a_red_circle_on_a_black_background.png",
        "01_a_blue_circle_on_a_black_background.png",
        "config.yaml",
    ):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "null_text" and not metrics["from_cache"]
    assert len(metrics["null_text_final_losses"]) == 2 and metrics["psnr_vae_reconstruction"] > 0
    second = run("edit_image.py", *overrides, f"hydra.run.dir={tmp_path}/b", cwd=tmp_path)
    assert second.returncode == 0 and json.loads((tmp_path / "b" / "metrics.json").read_text())["from_cache"]


def test_eval_inversion_script_reports_every_method_the_reference_and_the_edits(checkpoint, tmp_path):
    done = run(
        "eval_inversion.py",
        f"model.checkpoint={checkpoint}",
        "n=2",
        "reference_n=1",
        "steps=2",
        f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "inversion.json").read_text())
    summary, rows = report["summary"], report["rows"]
    assert len(rows) == 2 and "seconds_null_text_reference" in rows[0] and "seconds_null_text_reference" not in rows[1]
    for method in (
        "vae",
        "ddim",
        "negative_prompt",
        "null_text",
        "null_text_from_negative",
        "null_text_fast",
        "null_text_reference",
    ):
        assert np.isfinite(summary[f"psnr_{method}"]), method
    for prefix in ("edit", "edit_from_negative", "edit_fast", "edit_fig12"):
        assert {
            f"{prefix}_target_correct",
            f"{prefix}_color_correct",
            f"{prefix}_background_psnr",
            f"{prefix}_far_background_psnr",
        } <= summary.keys()
    for row in rows:  # PSNRs of uint8 images against the render: positive, inf where every pixel was kept
        assert all(
            row[f"{prefix}_{kind}_psnr"] > 0
            for prefix in ("edit", "edit_fig12")
            for kind in ("background", "far_background")
        )
    for method in ("null_text", "null_text_from_negative", "null_text_fast"):
        assert summary[f"{method}_speedup_vs_reference"] > 0 and f"psnr_{method}_on_reference_images" in summary
        assert summary[f"{method}_adam_steps"] >= 0


def test_eval_edits_script_reports_swaps_baselines_and_local_blend(tmp_path):
    # the shipped model (a random one draws nothing the reader can judge), few seeds and steps
    done = run("eval_edits.py", "n=3", "steps=10", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "edits.json").read_text())
    for swap in ("color_swap", "shape_swap"):
        assert len(report[swap]["rows"]) == 3 and {"edit", "baseline"} <= report[swap].keys()
    perfect = report["color_swap"]["perfect_edit"]  # the measurement's ceiling: a recolored render through the VAE
    assert perfect["n"] == 3 and perfect["mean_iou"] > 0.8 and perfect["kept_layout"] > 0.5
    most = report["color_swap"]["most_injection"]  # the same pairs and seeds, every map injected
    assert [r["source"] for r in most["rows"]] == [r["source"] for r in report["color_swap"]["rows"]]
    assert [r["seed"] for r in most["rows"]] == [r["seed"] for r in report["color_swap"]["rows"]]
    parts = report["color_swap"]["by_latent_distance"]  # every judged swap once, nearest colors first
    assert sum(p["n"] for p in parts) == report["color_swap"]["edit"]["n"]
    bounds = [b for p in parts for b in p["latent_distance"]]
    assert bounds == sorted(bounds) and bounds[-1] > 0
    commit = report["layout_commit"]
    assert commit["self_window"] == [0, 4] and len(commit["per_seed"]) == 3  # 0.4 of 10 steps
    assert all(0 <= step <= 10 for step in commit["per_seed"])
    blend = report["local_blend"]
    assert len(blend["rows"]) == 3 and blend["n"] >= 1  # seeds 10000-10002 draw the kept object (deterministic)
    for row in (r for r in blend["rows"] if "kept_object_unchanged" in r):
        assert 0 <= row["kept_object_in_mask"] <= 1 and 0 <= row["kept_object_unchanged"] <= 1
        assert row["latent_outside_mask_equal"]  # LocalBlend copies the source latent outside its mask, exactly


def test_edit_script_takes_dict_overrides_as_the_readme_writes_them(checkpoint, tmp_path):
    # Hydra refuses new keys in an existing {} node, so the configs declare these dicts as null. The fader acts
    # only inside its word's window (P2P_SPEC §3): red 0.5 of 2 steps = step 0.
    result = run(
        "edit.py",
        f"model.checkpoint={checkpoint}",
        "steps=2",
        "progress=false",
        "edit=reweight",
        'prompts=["a red circle","a red circle"]',
        "edit.reweight={red: 3}",
        "edit.cross_replace_steps={default_: 0.8, red: 0.5}",
        f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "red: 3" in saved and "default_: 0.8" in saved and "red: 0.5" in saved
    # the prompts are identical, so the target equals the source unless the fader was really applied
    source, target = (np.asarray(Image.open(next((tmp_path / "run").glob(f"{i:02d}_*.png")))) for i in (0, 1))
    assert (source != target).any()


def test_edit_image_checks_the_edit_before_the_inversion(checkpoint, tmp_path):
    # a replace between captions of different word counts: named before minutes of null-text inversion
    photo = tmp_path / "photo.png"
    Image.fromarray(sample_scene(np.random.default_rng(0), num_objects=1).image).save(photo)
    result = run(
        "edit_image.py",
        f"model.checkpoint={checkpoint}",
        f"image={photo}",
        "steps=2",
        """prompts=["a red circle on a black background","a blue square"]""",
        f"cache_dir={tmp_path}/cache",
        f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path,
    )
    assert result.returncode != 0 and "replace needs prompts with the same number of words" in result.stderr
    assert "inversion" not in result.stderr.split("Traceback")[0] and not (tmp_path / "cache").exists()


# Significant bits of each half format (the implicit leading one included): a value stored in it is off by at most
# 2^-bits of itself. An image computed in the format differs from fp32 by a few such roundings of the full
# pixel range per layer, grown through the network; HALF_ERROR_GAIN is that growth with margin. Measured on the
# shipped file (10 steps, 2 prompts): fp16 0.03-0.09 levels on average, bf16 0.3-4.2 depending on the CPU's bf16
# kernels (with or without AVX512-BF16) — the bound, 8 units of the format's roundoff, is 1.0 level for fp16 and
# 8.0 for bf16; a broken half path (a layer run in the wrong dtype, a NaN clamp) differs by tens of levels.
SIGNIFICANT_BITS = {"fp16": 11, "bf16": 8}
HALF_ERROR_GAIN = 8


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_samples_on_the_cpu(dtype, tmp_path):
    # What a user cares about: the half-precision picture shows its caption wherever the fp32 one does, and it is
    # the fp32 picture up to the format's rounding. GroupNorm runs in float32 (CPU kernels refused a float32 input
    # with fp16/bf16 weights).
    prompts = ["a red circle on a black background", "a blue square on a white background"]
    common = ("steps=10", "progress=false", f"prompts={json.dumps(prompts)}")
    done = run("generate.py", f"dtype={dtype}", *common, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    full = run("generate.py", *common, f"hydra.run.dir={tmp_path}/full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]
    half, single = ([np.asarray(Image.open(p)) for p in sorted((tmp_path / d).glob("0*.png"))] for d in ("run", "full"))
    assert len(half) == len(single) == len(prompts)
    read_right = 0
    for prompt, half_image, single_image in zip(prompts, half, single):
        if matches_caption(read_image(single_image), prompt)["all"]:
            assert matches_caption(read_image(half_image), prompt)["all"], prompt
            read_right += 1
        bound = HALF_ERROR_GAIN * 2.0 ** -SIGNIFICANT_BITS[dtype] * 255
        assert np.abs(half_image.astype(int) - single_image.astype(int)).mean() < bound, prompt
    assert read_right >= 1  # the fp32 model draws at least one of the captions, so the reader check ran


def test_bench_reports_the_three_schemes_and_their_ratios(tmp_path):
    # random tiny weights: what is measured is the cost of the schemes, not the pictures
    done = run("bench.py", "random_weights=true", "steps=2", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    for scheme in ("plain", "p2p", "reference"):
        assert any(line.split()[:1] == [scheme] and line.rstrip().endswith("MiB") for line in lines), scheme
    ratios = [line for line in lines if "(b)/(a) time" in line or "(c)/(b) time" in line]
    assert len(ratios) == 2 and all(float(line.split("time")[1].split()[0]) > 0 for line in ratios)
