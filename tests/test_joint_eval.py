"""The joint-attention variants table (p2p/experiments/joint_eval.py, scripts/eval_joint.py) on a tiny random SD3
file and two seeds: every variant edits the same caption pairs from the same seeds, and the table has a row per
(swap, variant). The numbers of a random model mean nothing; the trained `tiny_mmdit` gives the real table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from joint_models import STEPS, tiny_model
from test_mmdit_t5 import spiece_model  # noqa: F401 (fixture)

from models.errors import UserError
from models.flow_loader import save_flow_checkpoint
from p2p.edit import EditSpec, edit
from p2p.experiments.joint_eval import VARIANTS, joint_study, table_lines, variant_settings, variants_table
from p2p.flow import FlowSamplerSettings
from p2p.joint_edit import JointSpec, edit_flow
from p2p.shapes.metrics import edit_study

REPO = Path(__file__).resolve().parents[1]
T5_LENGTH = 48  # the test tokenizer's 60 pieces split a shapes-world caption into up to ~30


def world_model(randomize, spiece):
    model = tiny_model("sd3", randomize, spiece)
    model.config = model.config.with_settings(t5_length=T5_LENGTH)
    return model


def test_variants_are_overrides_of_the_run_settings():
    spec, joint = EditSpec(cross_replace_steps=0.7), JointSpec(renorm="probs")
    assert variant_settings("none", spec=spec, joint=joint)[0] is None
    edit, changed, blend = variant_settings("cross_only", spec=spec, joint=joint)
    assert (edit.cross_replace_steps, edit.self_replace_steps, changed.renorm, blend) == (0.7, 0.0, "probs", False)
    assert variant_settings("logits", spec=spec, joint=joint)[1].renorm == "logits"
    assert variant_settings("local_blend", spec=spec, joint=joint)[2] is True
    assert {"none", "probs", "logits", "rescale", "text_rows", "pooled"} <= set(VARIANTS)
    with pytest.raises(UserError, match="variant 'nope'"):
        variant_settings("nope", spec=spec, joint=joint)


def test_study_scores_every_variant_on_the_same_pairs(randomize, spiece_model):  # noqa: F811
    model = world_model(randomize, spiece_model)
    variants = ["none", "rescale", "local_blend"]
    rows = joint_study(
        model,
        variants=variants,
        swaps=["color", "shape"],
        n=1,
        first_seed=7,
        spec=EditSpec(),
        joint=JointSpec(),
        settings=FlowSamplerSettings(steps=STEPS, guidance=model.config.guidance),
    )
    assert len(rows) == 2 * len(variants)
    for swap in ("color", "shape"):
        pairs = {(r["source"], r["target"], r["seed"]) for r in rows if r["swap"] == swap}
        assert len(pairs) == 1  # one pair and seed for every variant
    table = variants_table(rows)
    assert [(t["swap"], t["variant"]) for t in table] == [(s, v) for s in ("color", "shape") for v in variants]
    assert len(table_lines(table)) == 2 + len(table)


def test_eval_joint_script_writes_the_table(randomize, spiece_model, tmp_path):  # noqa: F811
    model = world_model(randomize, spiece_model)
    checkpoint = save_flow_checkpoint(model, tmp_path / "tiny-sd3.safetensors")
    run = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "eval_joint.py"),
            "model=sd3-medium",
            f"model.checkpoint={checkpoint}",
            f"model.t5_tokenizer={spiece_model}",
            f"model.t5_length={T5_LENGTH}",
            "n=1",
            "variants=[none,logits]",
            "swaps=[color]",
            f"steps={STEPS}",
            f"hydra.run.dir={run}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run / "joint_variants.json").read_text())
    assert [(t["swap"], t["variant"]) for t in report["table"]] == [("color", "none"), ("color", "logits")]
    assert len(report["rows"]) == 2 and (run / "joint_variants.md").read_text().startswith("| swap | variant |")


def test_unet_studies_run_on_a_flow_model_unchanged(randomize, spiece_model):  # noqa: F811
    """`p2p.edit.edit` hands a flow model to `edit_flow`, so `edit_study` (eval_edits, the ablation) runs as is."""
    model = world_model(randomize, spiece_model)
    settings = FlowSamplerSettings(steps=STEPS, guidance=model.config.guidance)
    pair = ("a red circle on a black background", "a blue circle on a black background")
    (row,) = edit_study(model, [pair], seeds=[3], spec=EditSpec(), settings=settings)
    assert {"edit_iou", "baseline_iou", "edit_target_correct"} <= set(row)
    via_edit = edit(model, list(pair), seed=3, spec=EditSpec(), settings=settings, progress=False)
    direct = edit_flow(model, list(pair), seed=3, spec=EditSpec(), joint=JointSpec(), settings=settings, progress=False)
    assert (via_edit.latents - direct.latents).abs().max() == 0
    with pytest.raises(UserError, match="uncond_embeddings"):
        edit(model, list(pair), seed=3, uncond_embeddings=[None], settings=settings)


def test_ablate_script_runs_a_flow_model(randomize, spiece_model, tmp_path):  # noqa: F811
    model = world_model(randomize, spiece_model)
    checkpoint = save_flow_checkpoint(model, tmp_path / "tiny-sd3.safetensors")
    run = tmp_path / "job"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "ablate.py"),
            "model=sd3-medium",
            f"model.checkpoint={checkpoint}",
            f"model.t5_tokenizer={spiece_model}",
            f"model.t5_length={T5_LENGTH}",
            f"steps={STEPS}",
            "pairs=[[a red circle on a black background,a blue circle on a black background]]",
            f"hydra.run.dir={run}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads((run / "rows.json").read_text())
    assert {"edit_iou", "baseline_iou", "swap"} <= set(row) and row["model"] == "sd3-medium"


def run_figure(checkpoint, spiece, run, *overrides):
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "figure.py"),
            "model=sd3-medium",
            f"model.checkpoint={checkpoint}",
            f"model.t5_tokenizer={spiece}",
            f"model.t5_length={T5_LENGTH}",
            f"steps={STEPS}",
            f"hydra.run.dir={run}",
            *overrides,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_figure_script_draws_word_swaps_on_a_flow_model(randomize, spiece_model, tmp_path):  # noqa: F811
    model = world_model(randomize, spiece_model)
    checkpoint = save_flow_checkpoint(model, tmp_path / "tiny-sd3.safetensors")
    result = run_figure(checkpoint, spiece_model, tmp_path / "fig2", "experiment=fig2_content")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "fig2" / "figure.png").is_file()
    refused = run_figure(checkpoint, spiece_model, tmp_path / "fig4", "experiment=fig4_attention")
    assert refused.returncode == 2 and "UNet models only" in refused.stderr
