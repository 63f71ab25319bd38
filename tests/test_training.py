"""Training the built-in model (p2p/shapes/training.py, p2p/shapes/losses.py, scripts/train_tiny.py): it learns, it is reproducible by
seed, a resumed run equals an uninterrupted one, and the shipped file loads within its size budget.

Runs on a reduced model (16 px world, 2-level VAE and UNet, 1-layer text encoder): every test is CPU-fast.
Bitwise reproducibility is promised for a fixed thread count; conftest runs these tests on one thread.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import p2p.shapes.training as training
from models.loader import load_checkpoint
from models.stable_diffusion import ModelConfig, StableDiffusion
from models.text import TextConfig
from models.unet import UNetConfig
from models.vae import VAEConfig
from p2p.shapes.grounding import ColorMixer, Grounding, GroundingCache, grounding_loss
from p2p.shapes.losses import cell_coverage, coverage_loss, diffusion_loss, min_snr_weights, vae_loss
from p2p.shapes.training import (
    EMA,
    PhaseConfig,
    StopRequested,
    TokenCache,
    TrainConfig,
    drop_captions,
    learning_rate,
    train,
    train_phase,
)
from p2p.shapes.world import WorldConfig, parse_caption, sample_batch, sample_scene
from p2p.tokens import word_token_positions

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED = REPO_ROOT / "models" / "weights" / "tiny.safetensors"
SMALL_WORLD = {"image_size": 16}  # objects 4…8 px


def small_config() -> ModelConfig:
    """The tiny model's structure (cross + hybrid attention, KL VAE, open_clip text), shrunk to 16 px."""
    return ModelConfig(
        name="tiny-test",
        unet=UNetConfig(
            model_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(1, 2),
            attention_kinds=("cross", "hybrid"),
            num_head_channels=32,
            context_dim=32,
        ),
        vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
        text=TextConfig(width=32, heads=2, layers=1, act="gelu", pad_token=0),
        image_size=16,
        scale_factor=1.0,
    )


def small_model(seed: int = 0) -> StableDiffusion:
    torch.manual_seed(seed)
    return StableDiffusion(small_config())


def small_train_config(run_dir: Path, *, seed: int = 0, resume: bool = False, steps: int = 4) -> TrainConfig:
    phase = dict(steps=steps, batch_size=4, warmup_steps=2, lr=1e-3)
    return TrainConfig(
        seed=seed,
        run_dir=str(run_dir),
        resume=resume,
        checkpoint_every=100,
        log_every=1,
        scale_samples=16,
        world=SMALL_WORLD,
        vae=PhaseConfig(**phase, ema_decay=0.0),
        unet=PhaseConfig(**phase, ema_decay=0.9),
    )


def assert_same_weights(a: StableDiffusion, b: StableDiffusion) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    different = [k for k in state_a if not torch.equal(state_a[k], state_b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def fixed_batch(model: StableDiffusion):
    images, captions, _ = sample_batch(np.random.default_rng(0), 8, config=WorldConfig(**SMALL_WORLD))
    return images, TokenCache(model.text_encoder)(captions)


def overfit(model, *, phase: str, loss_fn, steps: int, tmp_path: Path) -> tuple[float, float]:
    """Loss on one fixed batch (and fixed noise) before and after `steps` steps on that batch."""
    before = loss_fn().item()
    train_phase(
        model,
        phase=phase,
        cfg=PhaseConfig(steps=steps, batch_size=8, lr=2e-3, warmup_steps=1, ema_decay=0),
        loss_at_step=lambda step, rng: (loss_fn(), {}),
        seed=0,
        run_dir=tmp_path,
        resume=False,
        checkpoint_every=1000,
        log_every=1000,
        progress=False,
    )
    with torch.no_grad():
        return before, loss_fn().item()


def test_vae_steps_lower_the_reconstruction_loss(tmp_path):
    model = small_model()
    images, _ = fixed_batch(model)
    loss = lambda: vae_loss(model, images, kl_weight=1e-6, generator=torch.Generator().manual_seed(0))[0]
    before, after = overfit(model, phase="vae", loss_fn=loss, steps=25, tmp_path=tmp_path)
    assert after < 0.6 * before, (before, after)


def test_cell_coverage_is_each_latent_cells_covered_fraction():
    scenes = sample_batch(np.random.default_rng(3), 6, config=WorldConfig(**SMALL_WORLD))[2]
    coverage = cell_coverage(scenes, 4)
    assert coverage.shape == (6, 4, 4)
    for scene, cells in zip(scenes, coverage):
        union = np.any([o.mask for o in scene.objects], axis=0)
        assert cells.sum().item() * 16 == pytest.approx(union.sum())  # every covered pixel counted once
        assert cells[1, 2].item() == pytest.approx(union[4:8, 8:12].mean())


def test_coverage_loss_is_zero_when_channel_0_writes_the_coverage_at_ratio_stds_of_the_others():
    coverage = torch.zeros(2, 4, 4)
    coverage[:, 1:3, 1:3], coverage[0, 0, 0] = 1.0, 0.25
    others = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 5
    exact = torch.cat([3.0 * others.std() * coverage[:, None], others], 1)
    assert coverage_loss(exact, coverage, ratio=3.0).item() == pytest.approx(0.0, abs=1e-10)
    wrong = exact.clone()
    wrong[:, 0] += others.std()  # channel 0 one std of the others too high everywhere
    wrong.requires_grad_(True)
    loss = coverage_loss(wrong, coverage, ratio=3.0)
    assert loss.item() == pytest.approx(1.0, rel=1e-5)
    loss.backward()
    assert wrong.grad[:, 0].gt(0).all() and wrong.grad[:, 1:].eq(0).all()  # only channel 0 is asked to move
    with pytest.raises(ValueError, match=r"coverage has shape \(2, 2, 2\); expected \(2, 4, 4\)"):
        coverage_loss(exact, coverage[:, :2, :2], ratio=3.0)
    with pytest.raises(ValueError, match="≥ 2 latent channels"):
        coverage_loss(exact[:, :1], coverage, ratio=3.0)


def test_vae_training_with_coverage_writes_coverage_into_channel_0(tmp_path):
    model = small_model()
    images, _, scenes = sample_batch(np.random.default_rng(0), 8, config=WorldConfig(**SMALL_WORLD))
    coverage = cell_coverage(scenes, model.config.latent_factor)
    loss = lambda: vae_loss(
        model,
        images,
        kl_weight=1e-6,
        generator=torch.Generator().manual_seed(0),
        coverage=coverage,
        coverage_weight=1.0,
        coverage_ratio=4.0,
    )
    before = loss()[1]["coverage"]
    overfit(model, phase="vae", loss_fn=lambda: loss()[0], steps=25, tmp_path=tmp_path)
    assert loss()[1]["coverage"] < 0.2 * before
    assert "coverage" not in vae_loss(model, images, kl_weight=1e-6, generator=torch.Generator().manual_seed(0))[1]
    with pytest.raises(ValueError, match="coverage_weight must be ≥ 0"):
        vae_loss(model, images, kl_weight=1e-6, generator=torch.Generator(), coverage=coverage, coverage_weight=-1)


def test_diffusion_steps_lower_the_noise_prediction_loss(tmp_path):
    model = small_model()
    images, token_ids = fixed_batch(model)
    latents = model.encode_images(images).detach()
    loss = lambda: diffusion_loss(model, latents, token_ids, generator=torch.Generator().manual_seed(0))[0]
    before, after = overfit(model, phase="unet", loss_fn=loss, steps=25, tmp_path=tmp_path)
    assert after < 0.7 * before, (before, after)


def test_min_snr_weights_follow_the_formula_and_reweight_the_loss():
    model = small_model()
    a = model.schedule.alphas_cumprod
    t = torch.tensor([0, 400, 999])
    snr = a[t] / (1 - a[t])
    weights = min_snr_weights(t, a, gamma=5.0)
    assert torch.allclose(weights, (torch.minimum(snr, torch.tensor(5.0, dtype=snr.dtype)) / snr).float())
    assert weights[0] < 0.01 and weights[2] == 1.0  # clean steps down-weighted, the noisiest kept at 1
    images, token_ids = fixed_batch(model)
    latents = model.encode_images(images).detach()
    plain, plain_log = diffusion_loss(model, latents, token_ids, generator=torch.Generator().manual_seed(0))
    weighted, weighted_log = diffusion_loss(
        model, latents, token_ids, generator=torch.Generator().manual_seed(0), snr_gamma=5.0
    )
    assert plain_log["mse"] == weighted_log["mse"] == pytest.approx(plain.item())  # the log stays the plain MSE
    assert weighted.item() < plain.item()  # every weight is ≤ 1 and some are < 1
    with pytest.raises(ValueError, match="snr_gamma"):
        diffusion_loss(model, latents, token_ids, generator=torch.Generator().manual_seed(0), snr_gamma=-1)


def two_scenes(seed: int, world: WorldConfig):
    """A two-object scene whose caption names the background, and a one-object scene whose caption does not."""
    rng = np.random.default_rng(seed)
    two = sample_scene(
        rng,
        config=world,
        objects=[("purple", "triangle"), ("red", "circle")],
        background="gray",
        mention_background=True,
    )
    return two, sample_scene(rng, config=world, objects=[("yellow", "square")], mention_background=False)


def test_grounding_rows_name_each_objects_color_and_shape_tokens_and_skip_dropped_captions():
    two, one = two_scenes(3, WorldConfig(**SMALL_WORLD))
    rows = GroundingCache(16)([two, one, two], [two.caption, one.caption, ""])  # the third caption was dropped
    expected = [
        (0, word_token_positions(two.caption, "purple", context_length=16), two.objects[0].mask),
        (0, word_token_positions(two.caption, "triangle", context_length=16), two.objects[0].mask),
        (0, word_token_positions(two.caption, "red", context_length=16), two.objects[1].mask),
        (0, word_token_positions(two.caption, "circle", context_length=16), two.objects[1].mask),
        (1, word_token_positions(one.caption, "yellow", context_length=16), one.objects[0].mask),
        (1, word_token_positions(one.caption, "square", context_length=16), one.objects[0].mask),
    ]
    assert rows.sample.tolist() == [i for i, positions, _ in expected for _ in positions]
    assert rows.token.tolist() == [k for _, positions, _ in expected for k in positions]
    assert torch.equal(
        rows.mask[:, 0].bool(), torch.from_numpy(np.stack([m for _, positions, m in expected for _ in positions]))
    )
    empty = GroundingCache(16)([one], [""])
    assert len(empty.sample) == 0


def test_grounding_loss_is_zero_inside_the_mask_and_one_minus_the_area_squared_when_uniform():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1  # a quarter of the image
    rows = Grounding(sample=torch.tensor([0]), token=torch.tensor([2]), mask=mask)
    inside = torch.zeros(1, 2, 4, 4, 5)  # (b, heads, h, w, keys): a 4×4 layer; the mask pools to its 2×2 centre
    inside[:, :, 1:3, 1:3, 2] = 1.0
    assert grounding_loss([inside], rows).item() == pytest.approx(0.0)
    uniform = torch.full((1, 2, 4, 4, 5), 0.2, requires_grad=True)
    loss = grounding_loss([uniform, inside], rows)  # layers averaged: ((1 − 1/4)² + 0) / 2
    assert loss.item() == pytest.approx(0.75**2 / 2)
    loss.backward()
    assert uniform.grad[0, :, 1:3, 1:3, 2].lt(0).all() and uniform.grad[0, :, 0, 0, 2].gt(0).all()
    assert uniform.grad[..., [0, 1, 3, 4]].eq(0).all()  # only the grounded token's column is asked to move


def test_diffusion_loss_adds_the_weighted_grounding_term_and_logs_it():
    model = small_model()
    images, captions, scenes = sample_batch(np.random.default_rng(0), 8, config=WorldConfig(**SMALL_WORLD))
    latents, token_ids = model.encode_images(images).detach(), TokenCache(model.text_encoder)(captions)
    rows = GroundingCache(model.context_length)(scenes, captions)
    plain, plain_log = diffusion_loss(model, latents, token_ids, generator=torch.Generator().manual_seed(0))
    grounded, log = diffusion_loss(
        model, latents, token_ids, generator=torch.Generator().manual_seed(0), grounding=rows, grounding_weight=0.5
    )
    # recording the maps computes those layers' softmax explicitly instead of the fused kernel: the same ε-MSE
    # up to rounding (bit-equal on some CPUs, 1e-7 apart on others)
    assert log["mse"] == pytest.approx(plain_log["mse"], rel=1e-6)
    assert 0 < log["grounding"] < 1 and "grounding" not in plain_log
    assert grounded.item() == pytest.approx(plain.item() + 0.5 * log["grounding"], rel=1e-5)
    with pytest.raises(ValueError, match="grounding_weight"):
        diffusion_loss(
            model, latents, token_ids, generator=torch.Generator().manual_seed(0), grounding=rows, grounding_weight=-1
        )
    with pytest.raises(ValueError, match="grounding=-0.1"):
        PhaseConfig(grounding=-0.1)


def test_training_with_grounding_moves_the_tokens_attention_onto_their_objects(tmp_path):
    model = small_model()
    images, captions, scenes = sample_batch(np.random.default_rng(0), 8, config=WorldConfig(**SMALL_WORLD))
    latents, token_ids = model.encode_images(images).detach(), TokenCache(model.text_encoder)(captions)
    rows = GroundingCache(model.context_length)(scenes, captions)
    grounding = lambda: diffusion_loss(
        model, latents, token_ids, generator=torch.Generator().manual_seed(0), grounding=rows, grounding_weight=1.0
    )
    before = grounding()[1]["grounding"]
    overfit(model, phase="unet", loss_fn=lambda: grounding()[0], steps=25, tmp_path=tmp_path)
    assert grounding()[1]["grounding"] < 0.5 * before


def test_color_mix_keeps_only_the_color_words_own_features_and_never_mixes_dropped_captions():
    world = WorldConfig(**SMALL_WORLD)
    two, one = two_scenes(5, world)
    model = small_model()
    tokens = TokenCache(model.text_encoder)
    mixer = ColorMixer(world, tokens, model.context_length)
    mix = mixer([two, one, two], [two.caption, one.caption, ""], p=1.0, rng=np.random.default_rng(0))
    captions_of = {tuple(v.tolist()): c for c, v in tokens.ids.items()}  # the decoy captions went through the cache
    for i, scene in enumerate([two, one]):
        decoy = parse_caption(captions_of[tuple(mix.decoy_ids[i].tolist())], config=world)
        own = parse_caption(scene.caption, config=world)
        assert [s for _, s in decoy.objects] == [s for _, s in own.objects] and decoy.background == own.background
        assert all(c != d for (c, _), (d, _) in zip(own.objects, decoy.objects))  # every color replaced
        colors = [k for color, _ in own.objects for k in word_token_positions(scene.caption, color, context_length=16)]
        assert mix.keep[i].nonzero().flatten().tolist() == colors  # only the color words keep their own features
    assert mix.keep[2].all() and torch.equal(mix.decoy_ids[2], tokens([""])[0])  # a dropped caption is not mixed
    none = mixer([two], [two.caption], p=0.0, rng=np.random.default_rng(0))
    assert none.keep.all() and torch.equal(none.decoy_ids, tokens([two.caption]))
    with pytest.raises(ValueError, match="color_mix=1.5"):
        mixer([two], [two.caption], p=1.5, rng=np.random.default_rng(0))


def test_diffusion_loss_reads_the_mixed_features():
    model = small_model()
    images, captions, scenes = sample_batch(np.random.default_rng(0), 8, config=WorldConfig(**SMALL_WORLD))
    latents, tokens = model.encode_images(images).detach(), TokenCache(model.text_encoder)
    mixer = ColorMixer(WorldConfig(**SMALL_WORLD), tokens, model.context_length)
    loss = lambda mix: diffusion_loss(
        model, latents, tokens(captions), generator=torch.Generator().manual_seed(0), mix=mix
    )[0].item()
    plain = loss(None)
    assert loss(mixer(scenes, captions, p=0.0, rng=np.random.default_rng(0))) == pytest.approx(plain, abs=1e-6)
    assert loss(mixer(scenes, captions, p=1.0, rng=np.random.default_rng(0))) != pytest.approx(plain, abs=1e-6)


def test_training_with_color_mix_is_deterministic_and_mixes(tmp_path, monkeypatch):
    mixes = []
    loss = training.diffusion_loss
    monkeypatch.setattr(
        training, "diffusion_loss", lambda *a, mix=None, **k: (mixes.append(mix), loss(*a, mix=mix, **k))[1]
    )

    def config(name):
        cfg = small_train_config(tmp_path / name)
        cfg.unet.color_mix = 0.5
        return cfg

    runs = [train(small_model(), config(name), progress=False) for name in ("a", "b")]
    assert_same_weights(runs[0], runs[1])
    assert mixes and any((~mix.keep).any() for mix in mixes)  # the training steps did get mixed features


def test_unet_phase_trains_unet_and_text_but_not_the_vae(tmp_path):
    model = small_model()
    vae_before = {k: v.clone() for k, v in model.vae.state_dict().items()}
    text_before = model.text_encoder.model.transformer.resblocks[0].attn.in_proj_weight.clone()
    images, token_ids = fixed_batch(model)
    latents = model.encode_images(images).detach()
    overfit(
        model,
        phase="unet",
        steps=2,
        tmp_path=tmp_path,
        loss_fn=lambda: diffusion_loss(model, latents, token_ids, generator=torch.Generator().manual_seed(0))[0],
    )
    assert all(torch.equal(v, model.vae.state_dict()[k]) for k, v in vae_before.items())
    assert not torch.equal(text_before, model.text_encoder.model.transformer.resblocks[0].attn.in_proj_weight)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    runs = [
        train(small_model(), small_train_config(tmp_path / name, seed=seed), progress=False)
        for name, seed in (("a", 0), ("b", 0), ("c", 1))
    ]
    assert_same_weights(runs[0], runs[1])
    assert runs[0].config.scale_factor == runs[1].config.scale_factor != 1.0
    state_a, state_c = runs[0].state_dict(), runs[2].state_dict()
    assert any(not torch.equal(state_a[k], state_c[k]) for k in state_a)


def test_resume_after_sigterm_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    """SIGTERM in the middle of phase 2 → checkpoint → resume=true: bitwise the uninterrupted result
    (model, optimizer moments and EMA restored; the data stream is a function of the step)."""
    uninterrupted = train(small_model(), small_train_config(tmp_path / "full", steps=6), progress=False)

    calls, real_loss = {"n": 0}, training.diffusion_loss

    def loss_then_sigterm(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # during step 2 of phase 2: the loop finishes the step, saves, stops
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(training, "diffusion_loss", loss_then_sigterm)
    with pytest.raises(StopRequested, match="after step 3"):
        train(small_model(), small_train_config(tmp_path / "cut", steps=6), progress=False)
    monkeypatch.setattr(training, "diffusion_loss", real_loss)
    assert torch.load(tmp_path / "cut" / "unet-last.pt", weights_only=True)["step"] == 3

    resumed = train(
        small_model(seed=123), small_train_config(tmp_path / "cut", steps=6, resume=True), progress=False
    )  # a different init: everything must come from the checkpoints
    assert_same_weights(uninterrupted, resumed)
    assert resumed.config.scale_factor == uninterrupted.config.scale_factor


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = PhaseConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    rates = [learning_rate(s, cfg) for s in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))
    assert learning_rate(100, cfg) == pytest.approx(1e-4)


def test_ema_tracks_recent_weights_and_copies_them_back():
    module = torch.nn.Linear(3, 1)
    ema = EMA(module.named_parameters(), decay=0.9)
    with torch.no_grad():
        module.weight.fill_(1.0)
    for _ in range(200):
        ema.update(module.named_parameters())
    assert torch.allclose(ema.shadow["weight"], torch.ones(1, 3), atol=1e-6)
    fresh = torch.nn.Linear(3, 1)
    ema.copy_to(fresh)
    assert torch.equal(fresh.weight, ema.shadow["weight"]) and torch.equal(fresh.bias, ema.shadow["bias"])


def test_caption_dropout_rate_and_empty_prompt():
    captions = ["a red circle"] * 10_000
    dropped = drop_captions(captions, p=0.1, rng=np.random.default_rng(0))
    assert set(dropped) == {"", "a red circle"}  # "" is the prompt classifier-free guidance samples with
    assert 0.09 < dropped.count("") / len(dropped) < 0.11


@pytest.mark.skipif(not SHIPPED.exists(), reason="models/weights/tiny.safetensors not trained yet")
def test_shipped_model_loads_and_is_small():
    assert SHIPPED.stat().st_size <= 30 * 2**20
    model = load_checkpoint(SHIPPED)
    assert model.config.name == "tiny" and model.config.image_size == 32
    assert model.config.scale_factor != 1.0  # set from the trained VAE's latent statistics
    assert 1.0 < model.config.guidance < 15.0
    with torch.no_grad():
        images, _, _ = sample_batch(np.random.default_rng(0), 16)
        latents = model.encode_images(images)
        assert 0.5 < latents.std().item() < 2.0  # roughly unit variance, as the diffusion model was trained on
        reconstruction = model.decode_latents(latents)
    assert (reconstruction - images).abs().mean().item() < 0.05


def test_train_script_writes_a_loadable_file_with_its_context_length(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "tiny.safetensors"
    common = [
        sys.executable,
        str(REPO_ROOT / "scripts" / "train_tiny.py"),
        f"run_dir={tmp_path}/run",
        "vae.steps=1",
        "vae.batch_size=2",
        "unet.steps=1",
        "unet.batch_size=2",
        "scale_samples=8",
        f"output={out}",
        "log_every=1",
    ]
    done = subprocess.run([*common, "context_length=16"], capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    model = load_checkpoint(out)
    assert model.context_length == 16 and model.encode_prompts(["a red circle"]).shape[1] == 16
    refused = subprocess.run(
        [*common, "context_length=12", f"run_dir={tmp_path}/refused"],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=tmp_path,
    )
    assert refused.returncode != 0 and "context_length=12" in refused.stderr and "choose 13..77" in refused.stderr
    assert not list((tmp_path / "refused").glob("*.pt")) and not (tmp_path / "refused" / "config.yaml").exists()

    # nothing is overwritten: the same run folder without resume, or the same output without overwrite=true,
    # is refused before any training; resume + overwrite finishes and keeps the first run's config
    weights = out.read_bytes()
    again = subprocess.run(
        [*common, f"output={tmp_path}/other.safetensors"], capture_output=True, text=True, timeout=1200, cwd=tmp_path
    )
    assert again.returncode != 0 and "already holds a training run" in again.stderr and "resume=true" in again.stderr
    again = subprocess.run([*common, "resume=true"], capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert again.returncode != 0 and f"output={out} exists; pass overwrite=true" in again.stderr
    assert out.read_bytes() == weights
    resumed = subprocess.run(
        [*common, "resume=true", "overwrite=true"], capture_output=True, text=True, timeout=1200, cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (tmp_path / "run" / "config.yaml").exists() and (tmp_path / "run" / "config-resume-1.yaml").exists()


def test_train_script_trains_another_architecture_at_the_worlds_size(tmp_path):
    # an f = 2 VAE (16×16 latents at 32 px) and a narrower UNet through the same script
    import subprocess
    import sys

    out = tmp_path / "f2.safetensors"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "train_tiny.py"),
            f"run_dir={tmp_path}/run",
            "vae.steps=1",
            "vae.batch_size=2",
            "unet.steps=1",
            "unet.batch_size=2",
            "scale_samples=8",
            f"output={out}",
            "architecture={vae: {ch_mult: [1,2]}, unet: {model_channels: 32}}",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    model = load_checkpoint(out)
    assert model.config.latent_factor == 2 and model.config.unet.model_channels == 32
    assert model.config.vae.ch_mult == (1, 2) and model.config.image_size == 32
    from p2p.pipeline import SamplerSettings, generate

    assert generate(model, ["a red circle"], seed=0, settings=SamplerSettings(steps=2), progress=False).shape == (
        1,
        32,
        32,
        3,
    )


def test_architecture_overrides_are_checked_before_training():
    from p2p.shapes.recipe import model_config
    from p2p.shapes.world import WorldConfig

    def config(architecture, size=32):
        return model_config(architecture, WorldConfig(image_size=size), guidance=4.0, context_length=16)

    small = config({}, size=16)
    assert small.image_size == 16 and small.guidance == 4.0 and small.text.context_length == 16
    two_levels = {"channel_mult": [1, 2], "attention_resolutions": [1, 2], "attention_kinds": ["cross", "hybrid"]}
    assert config({"unet": two_levels}).unet.channel_mult == (1, 2)
    with pytest.raises(ValueError, match=r"architecture=.*attention_kinds .* needs one entry per level"):
        config({"unet": {"channel_mult": [1, 2]}})  # the model is built once: a mismatch fails before training
    with pytest.raises(ValueError, match=r"architecture.unet has no field\(s\) \['width'\]; it has \[.*'model_chan"):
        config({"unet": {"width": 8}})
    with pytest.raises(ValueError, match=r"architecture.clip=.*one of \('unet', 'vae', 'text'\)"):
        config({"clip": {"width": 8}})
    with pytest.raises(ValueError, match="30 px images do not divide by the VAE's factor 4"):
        config({}, size=30)
    with pytest.raises(ValueError, match="do not divide by the VAE's factor 8"):
        config({"vae": {"ch_mult": [1, 2, 2, 2]}}, size=36)


@pytest.mark.parametrize(
    "phase, message",
    [
        (dict(steps=-1), "steps=-1 is out of range; use a value ≥ 1"),
        (dict(batch_size=0), "batch_size=0 is out of range"),
        (dict(caption_dropout=1.0), "caption_dropout=1.0 is out of range; use a value in [0, 1)"),
        (dict(ema_decay=1.0), "ema_decay=1.0 is out of range"),
        (dict(reconstruction="l2"), "reconstruction='l2' is not one of ('l1', 'mse', 'l1+mse')"),
        (dict(color_mix=1.5), "color_mix=1.5 is out of range; use a value in [0, 1] (0 = off)"),
        (dict(coverage=-0.1), "coverage=-0.1 is out of range; use a value ≥ 0 (0 = off)"),
        (dict(coverage_ratio=0.0), "coverage_ratio=0.0 is out of range; use a value > 0"),
    ],
)
def test_bad_phase_settings_are_named(phase, message):
    with pytest.raises(ValueError) as err:
        PhaseConfig(**phase)
    assert message in str(err.value)


def test_bad_run_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="threads=0 is out of range"):
        TrainConfig(threads=0)
    with pytest.raises(ValueError, match="device 'gpu' is not a torch device"):
        TrainConfig(device="gpu")
