"""Issue 5: every figure experiment composes and runs, and an ablation sweep aggregates into a CSV and a plot.

Every conf/experiment/*.yaml is composed with Hydra's compose API and run for 2 DDIM steps on the built-in
model (a random-weight stand-in of the same architecture while models/weights/tiny.safetensors is absent),
with its shapes prompts and with its paper prompts (on the tiny model, to prove the paper sets' words and
prompt shapes are valid before anyone spends SD time on them). Then a 2-job `ablate.py -m` multirun and
`aggregate.py` run end to end.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.loader import save_checkpoint  # noqa: E402
from models.stable_diffusion import StableDiffusion, preset  # noqa: E402
from p2p.figures import Figure, Tile  # noqa: E402
from p2p.tokens import words  # noqa: E402
from p2p.world import render  # noqa: E402
from scripts import aggregate  # noqa: E402
from scripts.figure import make_figure  # noqa: E402

TINY_WEIGHTS = REPO / "models" / "weights" / "tiny.safetensors"
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
STEPS = 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """The shipped weights when they exist (nothing is skipped then), else seeded random weights."""
    if TINY_WEIGHTS.exists():
        return str(TINY_WEIGHTS)
    path = tmp_path_factory.mktemp("weights") / "tiny_random.safetensors"
    torch.manual_seed(0)
    save_checkpoint(StableDiffusion(preset("tiny")), path, dtype="fp16")
    return str(path)


def compose_figure(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("figure", overrides=overrides)


def expected_layout(kind: str, params: dict) -> list[int]:
    """Tiles per row that each layout of p2p/figures.py promises for a prompt set."""
    if kind == "rows":
        return [1 + len(row.get("targets", params.get("targets", []))) for row in params["rows"]]
    if kind == "attention":
        shown = len({round(i * (STEPS - 1) / max(min(params["steps_shown"], STEPS) - 1, 1))
                     for i in range(min(params["steps_shown"], STEPS))})
        return [1 + len(words(params["prompt"]))] + [shown] * len(params["words_over_steps"])
    if kind == "injection_sweep":
        return [1] + [len(params["fractions"])] * len(params["targets"])
    if kind == "fader":
        return [1 + len(params["values"])] * len(params["rows"])
    if kind == "real":
        methods, targets = len(params["methods"]), len(params["targets"])
        return [2 + methods] + [1 + targets] * methods + ([targets, targets] if params.get("blend") else [])
    raise AssertionError(f"no expected layout for figure kind {kind!r}")


@pytest.mark.parametrize("prompt_set", ["shapes", "paper"])
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_makes_its_figure(experiment, prompt_set, checkpoint, tmp_path):
    overrides = [f"experiment={experiment}", f"prompt_set={prompt_set}", f"steps={STEPS}",
                 f"model.checkpoint={checkpoint}", "cache_dir=null", "tile_size=64"]
    if prompt_set == "paper":  # the paper's prompts on the tiny model: proves the words exist, not the pictures
        overrides.append("check_model=false")
        cfg_probe = compose_figure(overrides)
        if cfg_probe.figure == "real":
            photo = tmp_path / "photo.png"
            Image.fromarray(render([], background="white")).save(photo)
            overrides.append(f"image={photo}")
    cfg = compose_figure(overrides)
    out = tmp_path / "run"
    figure_png = make_figure(cfg, out)

    manifest = json.loads((out / "figure.json").read_text())
    params = OmegaConf.to_container(cfg.prompt_sets[prompt_set])
    assert [len(row["tiles"]) for row in manifest["rows"]] == expected_layout(cfg.figure, params)
    assert Image.open(figure_png).size == tuple(manifest["size"])
    assert Image.open(figure_png).height > len(manifest["rows"]) * cfg.tile_size  # every row drawn, captions under
    files = [out / tile["file"] for row in manifest["rows"] for tile in row["tiles"]]
    assert all(f.is_file() for f in files) and len(set(files)) == len(files)
    assert OmegaConf.load(out / "config.yaml").figure == cfg.figure  # the resolved config travels with the figure
    if cfg.figure == "real":
        assert (out / "photo.png").is_file() and "psnr_null_text" in manifest["metrics"]
    if cfg.figure == "rows":  # the source is never edited: in rows sharing source and seed it is the same picture
        sources = {}
        for row, row_cfg in zip(manifest["rows"], params["rows"]):
            key = row_cfg.get("source", params.get("source"))
            sources.setdefault(key, []).append(np.asarray(Image.open(out / row["tiles"][0]["file"]), dtype=int))
        for images in sources.values():
            assert all(np.abs(im - images[0]).max() <= 2 for im in images)


def test_prompt_set_paper_refuses_the_tiny_model():
    cfg = compose_figure(["experiment=fig2_content", "prompt_set=paper"])
    with pytest.raises(ValueError, match="model=sd15"):
        make_figure(cfg, Path("/nonexistent"))


def test_figure_never_overwrites(tmp_path):
    figure = Figure("t")
    figure.add_row("row", [Tile(np.zeros((32, 32, 3), np.uint8), "black", "black")])
    figure.save(tmp_path, tile_size=32)
    with pytest.raises(FileExistsError):
        figure.save(tmp_path, tile_size=32)


def test_ablation_sweep_and_aggregate(checkpoint, tmp_path):
    sweep = tmp_path / "sweep"
    command = [sys.executable, str(REPO / "scripts" / "ablate.py"), "-m", "edit.cross_replace_steps=0,1",
               "edit.self_replace_steps=0.4", "seed=0", f"steps={STEPS}", f"model.checkpoint={checkpoint}",
               "pairs=[['a red circle on a black background','a blue circle on a black background'],"
               "['a red circle','a red square']]", f"hydra.sweep.dir={sweep}"]
    subprocess.run(command, check=True, cwd=REPO, capture_output=True, text=True)
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["edit.cross_replace_steps=0,edit.self_replace_steps=0.4,seed=0,steps=2",
                    "edit.cross_replace_steps=1,edit.self_replace_steps=0.4,seed=0,steps=2"]  # folders name settings

    paths = aggregate.aggregate(sweep)
    with paths["summary"].open() as f:
        summary = list(csv.DictReader(f))
    assert tuple(summary[0]) == aggregate.SUMMARY_COLUMNS
    settings = {(r["setting"], r["cross_replace_steps"], r["group"]) for r in summary}
    assert {("p2p", "0.0", "all"), ("p2p", "1.0", "all"), ("none", "none", "all"),
            ("p2p", "0.0", "color"), ("p2p", "0.0", "shape")} <= settings
    with paths["rows"].open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2  # jobs × pairs
    assert {"cross_replace_steps", "self_replace_steps", "seed", "swap", "edit_target_correct", "edit_iou",
            "edit_centroid_shift", "baseline_iou"} <= set(rows[0])
    assert {r["swap"] for r in rows} == {"color", "shape"}
    assert Image.open(paths["plot"]).format == "PNG"
