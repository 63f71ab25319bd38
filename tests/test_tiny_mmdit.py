"""The built-in tiny MM-DiT (`model=tiny_mmdit`, issue 33): an ordinary SD3 `FlowModel` in the original file layout
that the normal flow loader reads strictly; its world tokenizer splits words unlike CLIP; its training (VAE, then
rectified flow on MM-DiT + text encoders) learns, and a run resumed after SIGTERM equals an uninterrupted one;
the scripts run it (generate.py on the shipped file when it exists, eval_tiny.py on any file of its kind)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_mmdit_sd3 import read_keys

import p2p.shapes.flow_training as flow_training
from models.flow_loader import config_in_file, identify, load_flow_model, original_state_dict, save_flow_checkpoint
from models.flow_model import FlowModel, flow_preset, tiny_mmdit_config
from models.t5 import T5Tokenizer
from models.text import clip_tokenizer
from p2p.shapes.flow_training import (
    FlowTokenCache,
    dit_initialize_,
    flow_matching_loss,
    logit_normal_sigmas,
    train_flow,
    train_world_tokenizer,
)
from p2p.shapes.recipe import flow_model_config
from p2p.shapes.training import PhaseConfig, StopRequested, TrainConfig, train_phase
from p2p.shapes.world import WorldConfig, sample_batch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED = REPO_ROOT / "models" / "weights" / "tiny_mmdit.safetensors"
SMALL_WORLD = {"image_size": 16}
SD3_KEYS = REPO_ROOT / "tests" / "data" / "sd-keys" / "keys_sd3_medium.txt"
SMALL_ARCHITECTURE = {  # tiny_mmdit's structure, shrunk for CPU-fast tests
    "mmdit": {"depth": 2, "hidden_size": 32, "num_heads": 2},
    "vae": {"ch": 32},
    "clip_l": {"layers": 2, "context_layers": 1, "width": 32, "heads": 2},
    "clip_g": {"layers": 2, "context_layers": 1, "width": 32, "heads": 2, "projection_dim": 32},
    "t5_encoder": {"d_model": 64, "d_ff": 64, "num_layers": 1, "num_heads": 2, "d_kv": 16},
}


@pytest.fixture(scope="module")
def world_tokenizer(tmp_path_factory) -> Path:
    return train_world_tokenizer(tmp_path_factory.mktemp("tok") / "spiece.model")


def small_flow_config():
    architecture = dict(SMALL_ARCHITECTURE)
    architecture["mmdit"] = {**architecture["mmdit"], "context_dim": 64, "pooled_dim": 64}
    return flow_model_config(architecture, WorldConfig(**SMALL_WORLD), guidance=5.0, context_length=16)


def small_model(tokenizer: Path, seed: int = 0) -> FlowModel:
    torch.manual_seed(seed)
    model = FlowModel(small_flow_config())
    dit_initialize_(model.transformer)
    model.t5_tokenizer = T5Tokenizer(tokenizer)
    return model


def normalized(key: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", key)


# ----------------------------------------------------------------------------- layout and loading


def test_state_dict_is_the_sd3_original_layout_and_loads_strictly(world_tokenizer, tmp_path):
    torch.manual_seed(0)
    model = FlowModel(tiny_mmdit_config())
    model.config.latent_scale, model.config.latent_shift = 2.5, -0.03
    state = original_state_dict(model)
    sd3_names = {normalized(k) for k in read_keys(SD3_KEYS)}
    transformer = {normalized(k) for k in state if k.startswith("model.diffusion_model.")}
    assert transformer <= sd3_names  # every MM-DiT and VAE tensor has a name SD3-medium's file uses
    assert {normalized(k) for k in state if k.startswith("first_stage_model.")} <= sd3_names
    text_names = {normalized(k) for k in read_keys(SD3_KEYS.with_name("keys_sd3_text_encoders.txt"))}
    text = {normalized(k) for k in state if k.startswith("text_encoders.")}
    assert text <= text_names and {n.split(".")[1] for n in text} == {"clip_l", "clip_g", "t5xxl"}
    assert identify({k: tuple(v.shape) for k, v in state.items()})[0] == "sd3-medium"

    path = save_flow_checkpoint(model, tmp_path / "tiny_mmdit.safetensors")
    config = config_in_file(path, preset=flow_preset("tiny_mmdit"))
    assert config == model.config and config.latent_scale == 2.5  # the file states its config
    loaded = load_flow_model(config, checkpoint=path, t5_tokenizer=world_tokenizer, release_text_encoders=False)
    assert set(original_state_dict(loaded)) == set(state)
    assert all(torch.equal(original_state_dict(loaded)[k], v) for k, v in state.items())
    assert loaded.latent_scaling.scale_factor == 2.5 and loaded.clip_segment() == 16
    assert [s[0] for s in loaded.text_segments()] == ["clip", "t5"]


def test_the_world_tokenizer_splits_color_words_unlike_clip(world_tokenizer, tmp_path):
    tokenizer = T5Tokenizer(world_tokenizer)
    assert len(tokenizer.encode("red")) == 1 and len(tokenizer.encode("purple")) >= 2
    assert all(len(clip_tokenizer().encode(w)) == 1 for w in ("red", "purple", "yellow"))
    longest = "a purple triangle and a yellow triangle on a white background"
    assert len(tokenizer.encode(longest)) + 1 <= tiny_mmdit_config().t5_length
    again = train_world_tokenizer(tmp_path / "again.model")
    assert again.read_bytes() == world_tokenizer.read_bytes()  # deterministic: a resumed run gets the same pieces


# ----------------------------------------------------------------------------- training


def test_dit_initialization_makes_every_joint_block_the_identity(world_tokenizer):
    model = small_model(world_tokenizer)
    x = torch.randn(2, 16, 8, 8)
    text = model.conditioning_from_tokens(model.tokenize(["a red circle", ""]))
    velocity = model.transformer(x, timesteps=torch.tensor([500.0, 10.0]), context=text.context, pooled=text.pooled)
    assert torch.equal(velocity, torch.zeros_like(velocity))  # zero final layer: v = 0 at the start
    block = model.transformer.joint_blocks[0]
    tokens, c = torch.randn(2, 5, 32), torch.randn(2, 32)
    attention_out = torch.randn(2, 5, 32)
    saved = block.x_block.pre_attention(tokens, c)[1]
    out = block.x_block.post_attention(attention_out, tokens, saved, query_hw=(1, 5))
    assert torch.equal(out, tokens)  # gates 0: the residual stream passes unchanged


def test_logit_normal_sigmas_have_median_one_half():
    sigmas = logit_normal_sigmas(20000, generator=torch.Generator().manual_seed(0))
    assert sigmas.min() > 0 and sigmas.max() < 1
    assert sigmas.median().item() == pytest.approx(0.5, abs=0.01)
    assert (sigmas.logit().std().item()) == pytest.approx(1.0, abs=0.02)


def test_flow_matching_steps_lower_the_velocity_loss(world_tokenizer, tmp_path):
    model = small_model(world_tokenizer)
    images, captions, _ = sample_batch(np.random.default_rng(0), 8, config=WorldConfig(**SMALL_WORLD))
    latents = flow_training.encode_latents(model, images)
    ids = FlowTokenCache(model)(captions)
    loss = lambda: flow_matching_loss(model, latents, ids, generator=torch.Generator().manual_seed(0))[0]
    before = loss().item()
    train_phase(
        model,
        phase="mmdit",
        cfg=PhaseConfig(steps=40, batch_size=8, lr=2e-3, warmup_steps=1, ema_decay=0),
        loss_at_step=lambda step, rng: (loss(), {}),
        seed=0,
        run_dir=tmp_path,
        resume=False,
        checkpoint_every=1000,
        log_every=1000,
        progress=False,
    )
    with torch.no_grad():
        after = loss().item()
    assert after < 0.75 * before, (before, after)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("text_encoders.t5xxl.") for n in trained)  # text encoders train with the MM-DiT
    assert not any(n.startswith("first_stage_model.") for n in trained)  # the VAE stays frozen


def small_train_config(run_dir: Path, *, resume: bool = False, steps: int = 4) -> TrainConfig:
    phase = dict(steps=steps, batch_size=4, warmup_steps=2, lr=1e-3)
    return TrainConfig(
        run_dir=str(run_dir),
        resume=resume,
        checkpoint_every=100,
        log_every=1,
        scale_samples=16,
        world=SMALL_WORLD,
        vae=PhaseConfig(**phase, ema_decay=0.0, coverage=0.1),
        mmdit=PhaseConfig(**phase, ema_decay=0.9),
    )


def test_resume_after_sigterm_equals_an_uninterrupted_run(world_tokenizer, tmp_path, monkeypatch):
    """SIGTERM during phase 2 → checkpoint → resume=true: bitwise the uninterrupted weights and latent scaling."""
    uninterrupted = train_flow(
        small_model(world_tokenizer), small_train_config(tmp_path / "full", steps=6), progress=False
    )
    calls, real_loss = {"n": 0}, flow_training.flow_matching_loss

    def loss_then_sigterm(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # during step 2 of phase 2: the loop finishes the step, saves, stops
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(flow_training, "flow_matching_loss", loss_then_sigterm)
    with pytest.raises(StopRequested, match="after step 3"):
        train_flow(small_model(world_tokenizer), small_train_config(tmp_path / "cut", steps=6), progress=False)
    monkeypatch.setattr(flow_training, "flow_matching_loss", real_loss)
    assert torch.load(tmp_path / "cut" / "mmdit-last.pt", weights_only=True)["step"] == 3

    resumed = train_flow(
        small_model(world_tokenizer, seed=123),
        small_train_config(tmp_path / "cut", steps=6, resume=True),
        progress=False,
    )  # a different init: everything must come from the checkpoints
    full, cut = uninterrupted.state_dict(), resumed.state_dict()
    assert full.keys() == cut.keys()
    assert [k for k in full if not torch.equal(full[k], cut[k])] == []
    assert (resumed.config.latent_scale, resumed.config.latent_shift) == (
        uninterrupted.config.latent_scale,
        uninterrupted.config.latent_shift,
    )


def test_unet_only_settings_are_refused_for_the_mmdit(world_tokenizer, tmp_path):
    cfg = small_train_config(tmp_path)
    cfg.mmdit = dataclasses.replace(cfg.mmdit, snr_gamma=5.0)
    with pytest.raises(ValueError, match=r"mmdit.snr_gamma=5.0: only the UNet's phase"):
        train_flow(small_model(world_tokenizer), cfg, progress=False)


# ----------------------------------------------------------------------------- the scripts


def run_script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_train_tiny_arch_mmdit_writes_an_sd3_file_that_eval_tiny_reads(tmp_path):
    """The script end to end on a few steps: the exported fp16 file + tokenizer, read by model=tiny_mmdit."""
    architecture = json.dumps(
        SMALL_ARCHITECTURE | {"mmdit": {**SMALL_ARCHITECTURE["mmdit"], "context_dim": 64, "pooled_dim": 64}}
    )
    trained = run_script(
        "train_tiny.py",
        "arch=mmdit",
        "threads=1",
        f"run_dir={tmp_path}/run",
        "vae.steps=2",
        "mmdit.steps=2",
        "scale_samples=8",
        f"+architecture={architecture}".replace('"', ""),
        cwd=tmp_path,
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    output = tmp_path / "run" / "tiny_mmdit.safetensors"
    assert output.with_suffix(".spiece.model").exists()
    config = config_in_file(output, preset=flow_preset("tiny_mmdit"))
    assert config.latent_scale is not None and config.mmdit.depth == 2
    evaluated = run_script(
        "eval_tiny.py",
        "model=tiny_mmdit",
        f"model.checkpoint={output}",
        "n=1",
        "steps=2",
        f"hydra.run.dir={tmp_path}/eval",
        cwd=tmp_path,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["model"] == "tiny_mmdit" and results["images"] == 3 and results["steps"] == 2
    assert results["sampler"].startswith("Euler")


@pytest.mark.skipif(not SHIPPED.exists(), reason="models/weights/tiny_mmdit.safetensors is not trained yet (issue 33)")
def test_generate_runs_the_built_in_tiny_mmdit_without_a_checkpoint(tmp_path):
    result = run_script(
        "generate.py",
        "model=tiny_mmdit",
        "prompts=[a red circle on a black background]",
        "seed=3",
        f"hydra.run.dir={tmp_path}/out",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (image,) = sorted((tmp_path / "out").glob("*.png"))
    from PIL import Image

    from p2p.shapes.reader import read_image

    assert np.asarray(Image.open(image)).shape == (32, 32, 3)
    assert read_image(np.asarray(Image.open(image))).objects  # something was drawn
