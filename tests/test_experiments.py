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
from p2p.experiments import ablation_report  # noqa: E402
from p2p.experiments.figure_canvas import Figure, Tile  # noqa: E402
from p2p.shapes.world import render  # noqa: E402
from p2p.tokens import words  # noqa: E402
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
    """Tiles per row that each layout of p2p/experiments/figures.py promises for a prompt set."""
    if kind == "rows":
        return [1 + len(row.get("targets", params.get("targets", []))) for row in params["rows"]]
    if kind == "attention":
        shown = len(
            {
                round(i * (STEPS - 1) / max(min(params["steps_shown"], STEPS) - 1, 1))
                for i in range(min(params["steps_shown"], STEPS))
            }
        )
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
    overrides = [
        f"experiment={experiment}",
        f"prompt_set={prompt_set}",
        f"steps={STEPS}",
        f"model.checkpoint={checkpoint}",
        "cache_dir=null",
        "tile_size=64",
    ]
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
    command = [
        sys.executable,
        str(REPO / "scripts" / "ablate.py"),
        "-m",
        "edit.cross_replace_steps=0,1",
        "edit.self_replace_steps=0.4",
        "seed=0",
        f"steps={STEPS}",
        f"model.checkpoint={checkpoint}",
        "pairs=[['a red circle on a black background','a blue circle on a black background'],"
        "['a red circle','a red square']]",
        f"hydra.sweep.dir={sweep}",
    ]
    subprocess.run(command, check=True, cwd=REPO, capture_output=True, text=True)
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == [
        "edit.cross_replace_steps=0,edit.self_replace_steps=0.4,seed=0,steps=2",
        "edit.cross_replace_steps=1,edit.self_replace_steps=0.4,seed=0,steps=2",
    ]  # folders name settings

    result = ablation_report.aggregate(sweep)
    assert result.skipped == []
    with result["summary"].open() as f:
        summary = list(csv.DictReader(f))
    assert tuple(summary[0]) == ablation_report.SUMMARY_COLUMNS
    settings = {(r["setting"], r["cross_replace_steps"], r["group"]) for r in summary}
    assert {
        ("p2p", "0.0", "all"),
        ("p2p", "1.0", "all"),
        ("none", "none", "all"),
        ("p2p", "0.0", "color"),
        ("p2p", "0.0", "shape"),
    } <= settings
    with result["rows"].open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2  # jobs × pairs
    assert {
        "cross_replace_steps",
        "self_replace_steps",
        "seed",
        "swap",
        "edit_target_correct",
        "edit_iou",
        "edit_centroid_shift",
        "baseline_iou",
    } <= set(rows[0])
    assert {r["swap"] for r in rows} == {"color", "shape"}
    assert Image.open(result["plot"]).format == "PNG"


# ----------------------------------------------------------------------------- aggregation on awkward sweeps
# Job folders are written by hand here (what ablate.py writes: config.yaml, rows.json), so these run in
# milliseconds and can hold what a real sweep leaves behind when a job fails or is killed.


def fake_job(
    sweep: Path,
    name: str,
    *,
    cross=0.8,
    self_=0.4,
    seed=0,
    steps=2,
    self_max_side=None,
    rows: str | list | None = None,
    config: bool = True,
) -> Path:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    if config:
        OmegaConf.save(
            OmegaConf.create(
                {
                    "edit": {
                        "kind": "replace",
                        "cross_replace_steps": cross,
                        "self_replace_steps": self_,
                        "self_max_fraction": 0.25,
                        "self_max_side": self_max_side,
                    },
                    "model": {"name": "tiny"},
                    "seed": seed,
                    "steps": steps,
                    "guidance": None,
                    "threads": 1,
                    "pairs": [["a red circle", "a blue circle"], ["a red circle", "a red square"]],
                }
            ),
            job / "config.yaml",
        )
    if rows is None:
        rows = [
            {
                "seed": seed,
                "steps": steps,
                "model": "tiny",
                "guidance": 5.0,
                "swap": swap,
                "source": "a red circle",
                "target": target,
                **{
                    f"{prefix}_{k}": v
                    for prefix in ("edit", "baseline")
                    for k, v in {
                        "source_correct": True,
                        "target_correct": True,
                        "iou": 0.5,
                        "centroid_shift": 1.0,
                    }.items()
                },
            }
            for swap, target in (("color", "a blue circle"), ("shape", "a red square"))
        ]
    if rows != "absent":
        (job / "rows.json").write_text(rows if isinstance(rows, str) else json.dumps(rows))
    return job


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_aggregate_skips_failed_and_unfinished_jobs_and_says_which(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    fake_job(sweep, "cross=0.8")
    fake_job(sweep, "cross=0.4", cross=0.4, rows="absent")  # failed: Hydra made its folder, no rows.json
    fake_job(sweep, "cross=0.2", cross=0.2, rows='[{"seed": 0, "st')  # killed while writing
    fake_job(sweep, "cross=0", cross=0.0, config=False)  # rows but no config: its setting is unknown
    (fake_job(sweep, "cross=1", cross=1.0) / "config.yaml").write_text("edit: {cross: [")  # config cut short
    aggregate.main([str(sweep)])
    err = capsys.readouterr().err
    for job, reason in (
        ("cross=0.4", "no rows.json"),
        ("cross=0.2", "rows.json is unreadable"),
        ("cross=0", "rows.json but no config.yaml"),
        ("cross=1", "config.yaml is unreadable"),
    ):
        assert f"skipped {job}: {reason}" in err
    assert "skipped 4 job folders" in err
    summary = read_csv(sweep / "ablation_summary.csv")
    assert {r["cross_replace_steps"] for r in summary if r["setting"] == "p2p"} == {"0.8"}


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda sweep: sweep.mkdir(), "no finished ablation job"),
        (lambda sweep: None, "is not a folder"),
        (lambda sweep: fake_job(sweep, "a", rows="absent"), "none finished: a: no rows.json"),
    ],
)
def test_aggregate_names_a_sweep_with_nothing_to_read(make, message, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    make(sweep)
    with pytest.raises(SystemExit) as exit_info:
        aggregate.main([str(sweep)])
    assert exit_info.value.code == 2  # a user's mistake: one line, status 2 (scripts/_cli.py)
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and "Traceback" not in err


def test_aggregate_of_a_single_setting(tmp_path):
    sweep = tmp_path / "sweep"
    fake_job(sweep, "only")
    result = ablation_report.aggregate(sweep)
    summary = read_csv(result["summary"])
    assert [(r["setting"], r["group"]) for r in summary] == [
        ("p2p", "all"),
        ("p2p", "color"),
        ("p2p", "shape"),
        ("none", "all"),
        ("none", "color"),
        ("none", "shape"),
    ]
    assert Image.open(result["plot"]).format == "PNG"


def test_aggregate_keeps_non_numeric_settings_apart(tmp_path):
    sweep = tmp_path / "sweep"
    fake_job(sweep, "per-word", cross={"default_": 0.8, "red": 0.2})
    fake_job(sweep, "number", cross=0.8)
    fake_job(sweep, "side8", cross=0.8, self_max_side=8)
    result = ablation_report.aggregate(sweep)
    settings = {
        (r["cross_replace_steps"], r["self_max_side"])
        for r in result.table
        if r["setting"] == "p2p" and r["group"] == "all"
    }
    assert settings == {(0.8, "None"), (0.8, 8.0), ("{'default_': 0.8, 'red': 0.2}", "None")}
    assert "side ≤ 8" in ablation_report.markdown_table(result.table)


def test_aggregate_never_pools_jobs_that_differ_in_another_setting(tmp_path):
    sweep = tmp_path / "sweep"
    fake_job(sweep, "steps=2", steps=2)
    fake_job(sweep, "steps=4", steps=4)
    table = ablation_report.aggregate(sweep).table
    p2p = [r for r in table if r["setting"] == "p2p" and r["group"] == "all"]
    baseline = [r for r in table if r["setting"] == "none" and r["group"] == "all"]
    assert sorted(r["other_settings"] for r in p2p) == ["steps=2", "steps=4"]
    assert sorted(r["other_settings"] for r in baseline) == ["steps=2", "steps=4"]
    assert all(r["n"] == 2 for r in p2p + baseline)  # one job each, not both pooled


def test_aggregate_never_overwrites_even_in_part(tmp_path):
    sweep = tmp_path / "sweep"
    fake_job(sweep, "only")
    (sweep / "ablation.png").write_bytes(b"an earlier plot")
    with pytest.raises(FileExistsError, match="ablation.png"):
        ablation_report.aggregate(sweep)
    assert not (sweep / "ablation_rows.csv").exists() and not (sweep / "ablation_summary.csv").exists()
    assert (sweep / "ablation.png").read_bytes() == b"an earlier plot"
    result = ablation_report.aggregate(sweep, tmp_path / "elsewhere")  # --out
    assert result["plot"].parent == tmp_path / "elsewhere"


def compose_ablate(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("ablate", overrides=overrides)


def test_ablate_job_refuses_a_used_folder_before_loading_the_model(monkeypatch, tmp_path):
    from scripts import ablate

    (tmp_path / "rows.json").write_text("[]")
    monkeypatch.setattr(ablate, "_MODELS", {})
    monkeypatch.setattr(ablate, "load_model", lambda cfg, **options: pytest.fail("loaded the model"))
    with pytest.raises(FileExistsError, match="already holds a job"):
        ablate.run(compose_ablate(["steps=2"]), tmp_path)


def test_a_failed_ablate_job_leaves_its_config_and_no_rows(monkeypatch, tmp_path):
    from p2p.experiments import ablation
    from scripts import ablate

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(ablate, "_MODELS", {})
    monkeypatch.setattr(ablate, "load_model", lambda cfg, **options: object())
    monkeypatch.setattr(ablation, "edit_study", fail)
    job = tmp_path / "sweep" / "seed=0"
    with pytest.raises(RuntimeError):
        ablate.run(compose_ablate(["steps=2", "guidance=5"]), job)
    assert (job / "config.yaml").is_file() and not (job / "rows.json").exists()
    fake_job(tmp_path / "sweep", "seed=1", seed=1)
    assert [s.job for s in ablation_report.aggregate(tmp_path / "sweep").skipped] == ["seed=0"]


def test_aggregate_counts_a_job_repeated_by_two_sweeps_once(tmp_path):
    folder = tmp_path / "ablate"
    fake_job(folder / "first", "seed=0")
    fake_job(folder / "second", "seed=0")
    fake_job(folder / "second", "seed=1", seed=1)
    result = ablation_report.aggregate(folder)
    assert [(s.job, s.reason) for s in result.skipped] == [
        ("second/seed=0", "the same config and seed as first/seed=0, counted once")
    ]
    assert next(r["n"] for r in result.table if r["setting"] == "p2p" and r["group"] == "all") == 4  # 2 seeds × 2 pairs


@pytest.mark.parametrize(
    "pairs, message",
    [
        ("[['a red circle']]", "list of \\[source, target\\] caption pairs"),
        ("[['a cat', 'a dog']]", "'cat' in caption 'a cat' is not in the vocabulary"),
        ("[]", "list of \\[source, target\\] caption pairs"),
    ],
)
def test_ablate_names_pairs_it_cannot_score_before_loading_the_model(pairs, message, monkeypatch, tmp_path):
    from scripts import ablate

    monkeypatch.setattr(ablate, "_MODELS", {})
    monkeypatch.setattr(ablate, "load_model", lambda cfg, **options: pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match=message):
        ablate.run(compose_ablate(["steps=2", f"pairs={pairs}"]), tmp_path)


def test_the_plot_redrawn_from_a_summary_csv_shows_the_same_table(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        for cross in (0.0, 0.8):
            fake_job(sweep, f"cross={cross},seed={seed}", cross=cross, seed=seed)
    result = ablation_report.aggregate(sweep)
    read = ablation_report.read_summary(result["summary"])
    assert len(read) == len(result.table)
    for got, want in zip(read, result.table):
        for key in ("setting", "group", "cross_replace_steps", "n", "success", "mean_iou"):
            assert got[key] == want[key] or (isinstance(want[key], float) and got[key] == pytest.approx(want[key])), key
    aggregate.main(["--replot", str(result["summary"]), "--out", str(tmp_path / "replot"), "--title", "t"])
    assert (tmp_path / "replot" / "ablation.png").stat().st_size > 0 and "plot:" in capsys.readouterr().out
    assert "IoU" in ablation_report.finding(read) and "edit success" in ablation_report.finding(read)
    with pytest.raises(SystemExit):  # neither a folder nor --replot: one line, status 2
        aggregate.main([])
