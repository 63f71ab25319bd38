"""`scripts/edit.py model=sd3-medium|flux-dev model.checkpoint=FILE edit=… prompts=… seed=S` end to end on tiny random
original-layout files (SD3: one single file; FLUX: BFL's separate files), as the issue names the command: exit 0,
one PNG per prompt, the grid and the resolved config with the joint settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from joint_models import HEIGHT, STEPS, WIDTH, tiny_model
from safetensors.torch import save_file
from test_flow_pipeline import part_state
from test_mmdit_t5 import spiece_model  # noqa: F401 (fixture)

from models.flow_loader import FLOW_CONFIG_METADATA_KEY, save_flow_checkpoint

REPO = Path(__file__).resolve().parents[1]
PROMPTS = '["a red cat riding a bicycle","a red dog riding a bicycle"]'


def run_edit(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "edit.py"), *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"},
    )


def model_overrides(family: str, model, tmp_path: Path, spiece: Path) -> list[str]:
    common = [f"model.t5_tokenizer={spiece}", f"model.t5_length={model.config.t5_length}"]
    if family == "sd3":
        checkpoint = save_flow_checkpoint(model, tmp_path / "tiny-sd3.safetensors")
        return ["model=sd3-medium", f"model.checkpoint={checkpoint}", *common]
    paths = {}
    for part in ("transformer", "vae", "clip_l", "t5xxl"):
        paths[part] = tmp_path / f"{part}.safetensors"
        metadata = {FLOW_CONFIG_METADATA_KEY: model.config.to_json()} if part == "transformer" else None
        save_file({k: v.contiguous() for k, v in part_state(model, part).items()}, str(paths[part]), metadata=metadata)
    return [
        "model=flux-dev",
        f"model.checkpoint={paths['transformer']}",
        f"model.vae={paths['vae']}",
        f"model.text_encoders.clip_l={paths['clip_l']}",
        f"model.text_encoders.t5xxl={paths['t5xxl']}",
        *common,
    ]


@pytest.mark.parametrize(
    "family,extra",
    [
        ("sd3", ["edit=replace", "attention=true", "baseline=true", "joint.renorm=logits", "joint.text_rows=true"]),
        (
            "flux",
            [
                "edit=replace",
                "blend=local",
                "blend.words=[[cat],[dog]]",
                "joint.blocks=single",
                "joint.pooled=true",
                "attention=true",
            ],
        ),
    ],
)
def test_edit_script_on_a_tiny_file(family, extra, randomize, spiece_model, tmp_path):  # noqa: F811
    model = tiny_model(family, randomize, spiece_model, seed=41)
    run = tmp_path / "run"
    result = run_edit(
        *model_overrides(family, model, tmp_path, spiece_model),
        f"prompts={PROMPTS}",
        "seed=5",
        f"steps={STEPS}",
        f"height={HEIGHT}",
        f"width={WIDTH}",
        "progress=false",
        f"hydra.run.dir={run}",
        *extra,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    pngs = sorted(p.name for p in run.glob("*.png"))
    assert pngs[:2] == ["00_a_red_cat_riding_a_bicycle.png", "01_a_red_dog_riding_a_bicycle.png"] and "grid.png" in pngs
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["name"] == ("sd3-medium" if family == "sd3" else "flux-dev")
    assert set(config["joint"]) >= {"renorm", "blocks", "text_rows", "pooled", "query_chunk"}
    assert len(list((run / "attention").glob("*.png"))) == 2  # one tile per word, CLIP and T5 columns summed
    if family == "sd3":
        assert len(list((run / "baseline").glob("*.png"))) == 2
    else:
        assert (run / "blend_mask.png").exists()


def test_bad_joint_settings_are_named_before_sampling(randomize, spiece_model, tmp_path):  # noqa: F811
    model = tiny_model("sd3", randomize, spiece_model, seed=41)
    result = run_edit(
        *model_overrides("sd3", model, tmp_path, spiece_model),
        f"prompts={PROMPTS}",
        "joint.renorm=softmax",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 2 and "joint.renorm='softmax'" in result.stderr
