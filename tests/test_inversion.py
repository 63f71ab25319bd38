"""Real-image path on a small random-weight model: properties that hold for any weights (issue 4).

The numbers on the trained built-in model (null-text within 1 dB of the VAE bound, colour swaps on
inverted renders) are measured by scripts/eval_inversion.py; the numbers are in the model card.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.errors import UserError
from models.stable_diffusion import StableDiffusion, preset
from p2p.pipeline import SamplerSettings, decode, sample
from p2p.real.cache import cached_invert
from p2p.real.images import load_image
from p2p.real.inversion import (
    FAST_NULL_TEXT,
    ddim_invert,
    image_to_tensor,
    invert,
    null_text_optimization,
    psnr,
    restore_outside_mask,
    vae_reconstruction,
)
from p2p.shapes.world import sample_scene

STEPS = 4
PROMPT = "a red circle on a black background"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return StableDiffusion(preset("tiny")).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def photo():
    return sample_scene(np.random.default_rng(3), num_objects=1).image


def reconstruct(model, inversion, settings):
    return sample(
        model,
        [PROMPT],
        latent=inversion.x_T,
        settings=settings,
        uncond_embeddings=inversion.uncond_embeddings,
        progress=False,
    )


def test_ddim_inversion_returns_the_whole_trajectory(model, photo):
    z0 = model.encode_images(image_to_tensor(photo))
    trajectory = ddim_invert(model, z0, PROMPT, settings=SamplerSettings(steps=STEPS, guidance=1.0), progress=False)
    assert len(trajectory) == STEPS + 1
    assert torch.equal(trajectory[0], z0)
    assert all(z.shape == z0.shape for z in trajectory)


def test_null_text_reconstructs_better_than_ddim_at_guidance(model, photo):
    settings = SamplerSettings(steps=STEPS, guidance=5.0)
    z0 = model.encode_images(image_to_tensor(photo))
    ddim = invert(model, photo, PROMPT, method="ddim", settings=settings, progress=False)
    null = invert(model, photo, PROMPT, method="null_text", settings=settings, progress=False)
    err_ddim = (reconstruct(model, ddim, settings) - z0).pow(2).mean().item()
    err_null = (reconstruct(model, null, settings) - z0).pow(2).mean().item()
    assert len(null.uncond_embeddings) == STEPS and len(null.losses) == STEPS
    assert err_null < 0.75 * err_ddim, (err_null, err_ddim)


def test_null_text_computes_no_weight_gradients(model, photo):
    model.requires_grad_(True)  # even a trainable model must not get weight gradients
    try:
        invert(
            model,
            photo,
            PROMPT,
            method="null_text",
            settings=SamplerSettings(steps=2, guidance=5.0),
            inner_steps=2,
            progress=False,
        )
        assert all(p.grad is None for p in model.parameters())
        assert all(p.requires_grad for p in model.parameters()), "requires_grad must be restored"
    finally:
        model.requires_grad_(False)


def test_null_text_stops_early_when_converged(model):
    # A trajectory that the "" embedding already reproduces exactly: sampled forward with it. The loss of the
    # starting ∅ is then ~0, below the tolerance, at every step: no Adam step is taken and ∅_i stays "".
    settings = SamplerSettings(steps=STEPS, guidance=5.0)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    trajectory = [latent]
    for step in range(STEPS):  # one sampling step at a time, keeping every latent
        sub = SamplerSettings(steps=STEPS, guidance=5.0)
        trajectory.append(_one_step(model, trajectory[-1], step, sub))
    embeddings, losses, used = null_text_optimization(
        model, trajectory[::-1], PROMPT, settings=settings, progress=False
    )
    assert used == [0] * STEPS and max(losses) < 1e-5, (used, losses)
    empty = model.encode_prompts([""])
    assert all(torch.equal(e, empty) for e in embeddings)
    # the official schedule takes every inner step regardless (what the benchmark times)
    model.requires_grad_(True)
    try:
        _, _, reference_used = null_text_optimization(
            model, trajectory[::-1], PROMPT, settings=settings, inner_steps=3, progress=False, reference_schedule=True
        )
    finally:
        model.requires_grad_(False)
        model.zero_grad(set_to_none=True)
    assert reference_used == [3] * STEPS


def test_null_text_init_from_the_caption_embedding(model, photo):
    settings = SamplerSettings(steps=STEPS, guidance=5.0)
    start = invert(model, photo, PROMPT, settings=settings, inner_steps=0, null_init="negative_prompt", progress=False)
    negative = invert(model, photo, PROMPT, method="negative_prompt", settings=settings, progress=False)
    assert all(torch.equal(a, b.float()) for a, b in zip(start.uncond_embeddings, negative.uncond_embeddings))
    assert torch.equal(start.x_T, negative.x_T)
    with pytest.raises(ValueError, match="'caption'.*choose one of"):
        invert(model, photo, PROMPT, settings=settings, null_init="caption", progress=False)


def test_tolerance_scale_sets_when_null_text_stops(model, photo):
    # From the caption's embedding the loss starts small: a huge tolerance stops every step at once (∅ stays the
    # caption's), zero never stops early (every step takes every Adam step), and in between a smaller tolerance
    # never takes fewer Adam steps.
    settings = SamplerSettings(steps=STEPS, guidance=5.0)
    used = {}
    for scale in (1e9, 1.0, 0.1, 0.0):
        inversion = invert(
            model,
            photo,
            PROMPT,
            settings=settings,
            inner_steps=3,
            null_init="negative_prompt",
            tolerance_scale=scale,
            progress=False,
        )
        used[scale] = inversion.inner_steps
    assert used[1e9] == [0] * STEPS and used[0.0] == [3] * STEPS, used
    assert all(a <= b for a, b in zip(used[1.0], used[0.1])), used
    caption = model.encode_prompts([PROMPT]).float()
    huge = invert(
        model, photo, PROMPT, settings=settings, null_init="negative_prompt", tolerance_scale=1e9, progress=False
    )
    assert all(torch.equal(e, caption) for e in huge.uncond_embeddings)


@pytest.mark.parametrize("scale", [-0.1, float("nan"), float("inf"), True, "0.1", None])
def test_bad_tolerance_scales_are_named(model, photo, scale):
    with pytest.raises(ValueError, match=f"tolerance_scale={scale!r}.*finite number ≥ 0"):
        invert(
            model, photo, PROMPT, settings=SamplerSettings(steps=2, guidance=5.0), tolerance_scale=scale, progress=False
        )


def test_the_fast_null_text_config_is_the_library_setting():
    from omegaconf import OmegaConf

    config = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "inversion" / "null_text_fast.yaml")
    assert config.method == "null_text" and config.inner_steps == 10
    assert {"null_init": config.init, "tolerance_scale": config.tolerance_scale} == FAST_NULL_TEXT


def _one_step(model, x, step, settings):
    from models.ddim import ddim_step, ddim_timesteps, previous_timestep

    t = ddim_timesteps(settings.steps)[step]
    cond, uncond = model.encode_prompts([PROMPT]), model.encode_prompts([""])
    with torch.no_grad():
        out_u, out_c = model.unet(torch.cat([x, x]), torch.tensor(t), torch.cat([uncond, cond])).chunk(2)
    guided = out_u + settings.guidance * (out_c - out_u)
    return ddim_step(guided, x, t=t, t_prev=previous_timestep(t, num_steps=settings.steps), schedule=model.schedule)


def test_negative_prompt_inversion_uses_the_caption_embedding(model, photo):
    settings = SamplerSettings(steps=STEPS, guidance=5.0)
    inversion = invert(model, photo, PROMPT, method="negative_prompt", settings=settings, progress=False)
    cond = model.encode_prompts([PROMPT])
    assert all(torch.equal(e, cond) for e in inversion.uncond_embeddings)
    # with ∅ = c every guidance scale gives the conditional prediction: the same as DDIM at guidance 1
    ddim = invert(model, photo, PROMPT, method="ddim", settings=settings, progress=False)
    guided_1 = sample(
        model, [PROMPT], latent=ddim.x_T, settings=SamplerSettings(steps=STEPS, guidance=1.0), progress=False
    )
    assert torch.allclose(reconstruct(model, inversion, settings), guided_1, atol=1e-4)


def test_unknown_method_is_named(model, photo):
    with pytest.raises(ValueError, match="'nulltext'.*null_text"):
        invert(model, photo, PROMPT, method="nulltext", progress=False)


def test_cache_reuses_only_identical_inputs(model, photo, tmp_path):
    settings = SamplerSettings(steps=2, guidance=5.0)
    kwargs = dict(cache_dir=tmp_path, method="null_text", settings=settings, inner_steps=2, progress=False)
    first, hit = cached_invert(model, photo, PROMPT, **kwargs)
    assert not hit
    again, hit = cached_invert(model, photo, PROMPT, **kwargs)
    assert hit and torch.equal(again.x_T, first.x_T)
    assert all(torch.equal(a, b) for a, b in zip(again.uncond_embeddings, first.uncond_embeddings))
    _, hit = cached_invert(model, photo, "a blue circle on a black background", **kwargs)
    assert not hit, "a changed prompt must not reuse a stale inversion"
    changed = photo.copy()
    changed[0, 0] ^= 1
    _, hit = cached_invert(model, changed, PROMPT, **kwargs)
    assert not hit, "a changed image must not reuse a stale inversion"
    _, hit = cached_invert(model, photo, PROMPT, **{**kwargs, "settings": SamplerSettings(steps=3, guidance=5.0)})
    assert not hit


def test_load_image_handles_modes_crops_and_errors(tmp_path):
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((40, 60), 100, np.uint8)).save(gray)
    loaded = load_image(gray, height=32, width=32)
    assert loaded.shape == (32, 32, 3) and loaded.dtype == np.uint8 and (loaded == 100).all()
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.zeros((32, 32, 4), np.uint8)).save(rgba)  # fully transparent → white
    assert (load_image(rgba, height=32, width=32) == 255).all()
    wide = load_image(gray, height=16, width=48)
    assert wide.shape == (16, 48, 3)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        load_image(bad, height=32, width=32)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png", height=32, width=32)
    with pytest.raises(ValueError, match="margins"):
        load_image(gray, height=32, width=32, margins=(30, 0, 30, 0))


def test_psnr_and_restore_outside_mask():
    a = np.zeros((8, 8, 3), np.uint8)
    b = a.copy()
    b[:4] = 255
    assert psnr(a, a) == float("inf")
    assert psnr(a, b, mask=np.arange(64).reshape(8, 8) >= 32) == float("inf")
    mask = torch.zeros(1, 2, 2)
    mask[0, 0, 0] = 1  # top-left quarter keeps the edit
    out = restore_outside_mask(b, a, mask)
    assert (out[:4, :4] == 255).all() and (out[4:] == 0).all() and (out[:4, 4:] == 0).all()


def test_vae_reconstruction_is_the_decoded_posterior_mean(model, photo):
    image = vae_reconstruction(model, photo)
    assert image.dtype == np.uint8 and image.shape == photo.shape
    assert (image == decode(model, model.encode_images(image_to_tensor(photo)))[0]).all()


def test_ddim_inversion_guidance_is_settable_and_batches_share_the_caption(model, photo):
    z0 = model.encode_images(image_to_tensor(photo))
    settings = SamplerSettings(steps=STEPS, guidance=3.0)
    guided = ddim_invert(model, z0, PROMPT, settings=settings, progress=False)
    plain = ddim_invert(model, z0, PROMPT, settings=SamplerSettings(steps=STEPS, guidance=1.0), progress=False)
    assert not torch.allclose(guided[-1], plain[-1]), "the guidance scale must change the trajectory"
    inversion = invert(
        model,
        photo,
        PROMPT,
        method="ddim",
        settings=SamplerSettings(steps=STEPS, guidance=5.0),
        inversion_guidance=3.0,
        progress=False,
    )
    assert all(torch.allclose(a, b) for a, b in zip(inversion.trajectory, guided))
    pair = ddim_invert(model, torch.cat([z0, z0.flip(-1)]), PROMPT, settings=settings, progress=False)
    assert len(pair) == STEPS + 1 and pair[-1].shape[0] == 2
    assert torch.allclose(pair[-1][:1], guided[-1], atol=1e-4)
    with pytest.raises(ValueError, match=r"z0 has shape \(4, 8, 8\)"):
        ddim_invert(model, z0[0], PROMPT, settings=settings, progress=False)


@pytest.mark.parametrize("steps", [1, 3, 7])
def test_every_method_gives_one_embedding_per_step_for_any_step_count(model, photo, steps):
    settings = SamplerSettings(steps=steps, guidance=5.0)
    for method in ("null_text", "negative_prompt", "ddim"):
        inversion = invert(model, photo, PROMPT, method=method, settings=settings, inner_steps=1, progress=False)
        assert len(inversion.trajectory) == steps + 1 and torch.equal(inversion.x_T, inversion.trajectory[-1])
        assert inversion.seconds > 0
        if method != "ddim":
            assert len(inversion.uncond_embeddings) == steps
        reconstruct(model, inversion, settings)  # the sampler accepts what the inversion made


def test_null_text_refuses_a_trajectory_that_does_not_fit(model, photo):
    settings = SamplerSettings(steps=STEPS, guidance=5.0)
    trajectory = ddim_invert(
        model,
        model.encode_images(image_to_tensor(photo)),
        PROMPT,
        settings=SamplerSettings(steps=STEPS, guidance=1.0),
        progress=False,
    )
    # a shorter trajectory would otherwise pair step i with the wrong target (negative indices wrap around)
    with pytest.raises(ValueError, match=rf"{STEPS} latents for steps={STEPS}.*{STEPS + 1} latents"):
        null_text_optimization(model, trajectory[1:], PROMPT, settings=settings, progress=False)
    with pytest.raises(ValueError, match="batch of 2 latents.*one image"):
        null_text_optimization(
            model, [torch.cat([z, z]) for z in trajectory], PROMPT, settings=settings, progress=False
        )
    with pytest.raises(ValueError, match=r"trajectory\[2\] has shape \(1, 4, 4, 4\) but trajectory\[0\]"):
        null_text_optimization(
            model,
            trajectory[:2] + [trajectory[2][..., :4, :4]] + trajectory[3:],
            PROMPT,
            settings=settings,
            progress=False,
        )
    with pytest.raises(TypeError, match="caption must be one string"):
        null_text_optimization(model, trajectory, [PROMPT], settings=settings, progress=False)


def test_null_text_works_under_no_grad_and_inference_mode(model, photo):
    settings = SamplerSettings(steps=2, guidance=5.0)
    z0 = model.encode_images(image_to_tensor(photo))
    plain_trajectory = ddim_invert(model, z0, PROMPT, settings=SamplerSettings(steps=2, guidance=1.0), progress=False)
    expected = null_text_optimization(model, plain_trajectory, PROMPT, settings=settings, inner_steps=2, progress=False)
    with torch.inference_mode():  # a trajectory made here cannot join autograd unless copied
        trajectory = ddim_invert(model, z0, PROMPT, settings=SamplerSettings(steps=2, guidance=1.0), progress=False)
    with torch.no_grad():  # ∅ still gets its gradient
        embeddings, losses, used = null_text_optimization(
            model, trajectory, PROMPT, settings=settings, inner_steps=2, progress=False
        )
    assert used == expected[2] and losses == expected[1]
    assert all(torch.equal(a, b) for a, b in zip(embeddings, expected[0]))


def test_requires_grad_is_restored_when_null_text_fails_midway(model, photo, monkeypatch):
    model.requires_grad_(True)
    calls, forward = [0], model.unet.forward

    def failing_forward(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 6:  # inside the optimisation loop, after some Adam steps
            raise RuntimeError("interrupted")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.unet, "forward", failing_forward)
    try:
        with pytest.raises(RuntimeError, match="interrupted"):
            invert(model, photo, PROMPT, settings=SamplerSettings(steps=2, guidance=5.0), inner_steps=5, progress=False)
        assert calls[0] == 6
        assert all(p.requires_grad for p in model.parameters()), "requires_grad must be restored"
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.requires_grad_(False)


@pytest.mark.parametrize("caption", ["", "circle", "a big red circle and a small blue square on a black background"])
def test_null_text_handles_captions_of_any_length(model, photo, caption):
    caption = " ".join(caption.split()[: model.context_length - 2])  # whatever fits the tiny model's context
    inversion = invert(
        model, photo, caption, settings=SamplerSettings(steps=2, guidance=5.0), inner_steps=1, progress=False
    )
    assert len(inversion.uncond_embeddings) == 2 and all(np.isfinite(inversion.losses))


def test_invert_names_bad_inputs(model, photo):
    settings = SamplerSettings(steps=2, guidance=5.0)
    factor = model.config.latent_factor
    with pytest.raises(ValueError, match=rf"height={32 - factor // 2} is not a positive multiple of {factor}"):
        invert(model, photo[: 32 - factor // 2], PROMPT, settings=settings, progress=False)
    with pytest.raises(ValueError, match=r"uint8 \(H, W, 3\).*float32"):
        invert(model, photo.astype(np.float32), PROMPT, settings=settings, progress=False)
    with pytest.raises(TypeError, match="caption must be one string"):
        invert(model, photo, [PROMPT], settings=settings, progress=False)
    with pytest.raises(ValueError, match="eta=0.5.*deterministic"):
        invert(model, photo, PROMPT, settings=SamplerSettings(steps=2, eta=0.5), progress=False)


@pytest.mark.parametrize("kind", ["replace", "refine", "reweight", "blend"])
def test_every_edit_kind_runs_on_an_inverted_image_with_two_targets(model, photo, kind):
    from p2p.edit import BlendSpec, EditSpec, edit

    settings = SamplerSettings(steps=STEPS, guidance=5.0)
    inversion = invert(model, photo, PROMPT, settings=settings, inner_steps=1, progress=False)
    targets = {
        "replace": ["a blue circle on a black background", "a green circle on a black background"],
        "refine": ["a big red circle on a black background", "a red circle on a white background"],
        "reweight": [PROMPT, PROMPT],
        "blend": ["a blue circle on a black background", "a green circle on a black background"],
    }[kind]
    spec = EditSpec(
        kind="replace" if kind == "blend" else kind, reweight={"red": [2.0, -1.0]} if kind == "reweight" else {}
    )
    blend = BlendSpec(words=["circle"], threshold=0.0) if kind == "blend" else None
    result = edit(
        model,
        [PROMPT, *targets],
        latent=inversion.x_T,
        spec=spec,
        blend=blend,
        settings=settings,
        uncond_embeddings=inversion.uncond_embeddings,
        progress=False,
    )
    assert result.images.shape == (3, *photo.shape)
    # the source row is the inversion's own reconstruction: the edit never touches it
    assert torch.allclose(result.latents[:1], reconstruct(model, inversion, settings), atol=1e-4)
    assert not torch.allclose(result.latents[1], result.latents[2]), "each target gets its own edit"


CACHE_SETTINGS = SamplerSettings(steps=2, guidance=5.0)


def cache_kwargs(tmp_path, **changes):
    return {
        "cache_dir": tmp_path,
        "method": "null_text",
        "settings": CACHE_SETTINGS,
        "inner_steps": 1,
        "progress": False,
        **changes,
    }


def test_cache_key_covers_every_setting_and_the_weights(model, photo, tmp_path):
    first, hit = cached_invert(model, photo, PROMPT, **cache_kwargs(tmp_path))
    assert not hit and first.seconds > 0
    again, hit = cached_invert(model, photo, PROMPT, **cache_kwargs(tmp_path))
    assert hit and again.seconds == pytest.approx(first.seconds), "a hit reports what the inversion once cost"
    for changes in (
        {"settings": SamplerSettings(steps=2, guidance=4.0)},
        {"settings": SamplerSettings(steps=2, guidance=5.0, offset=0)},
        {"inner_steps": 2},
        {"null_init": "negative_prompt"},
        {"inversion_guidance": 2.0},
        {"tolerance_scale": 0.5},
        {"method": "negative_prompt"},
        {"method": "ddim"},
    ):
        _, hit = cached_invert(model, photo, PROMPT, **cache_kwargs(tmp_path, **changes))
        assert not hit, changes
    _, hit = cached_invert(model, np.ascontiguousarray(photo[:, ::-1]), PROMPT, **cache_kwargs(tmp_path))
    assert not hit, "a mirrored image has the same pixel values but is another image"
    parameter = next(model.parameters())
    with torch.no_grad():
        parameter.add_(1e-3)
    try:
        _, hit = cached_invert(model, photo, PROMPT, **cache_kwargs(tmp_path))
        assert not hit, "other weights must not reuse the inversion"
    finally:
        with torch.no_grad():
            parameter.sub_(1e-3)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "incomplete"])
def test_a_damaged_cache_entry_is_recomputed(model, photo, tmp_path, damage, caplog):
    from p2p.real.cache import save_inversion

    first, _ = cached_invert(model, photo, PROMPT, **cache_kwargs(tmp_path))
    (entry,) = tmp_path.glob("*.safetensors")
    if damage == "incomplete":  # a readable file that holds fewer null embeddings than the key promises
        first.uncond_embeddings = first.uncond_embeddings[:1]
        entry.unlink()
        save_inversion(first, entry)
    else:
        entry.write_bytes(
            {
                "garbage": b"not a safetensors file" * 10,
                "empty": b"",
                "truncated": entry.read_bytes()[: len(entry.read_bytes()) // 2],
            }[damage]
        )
    recomputed, hit = cached_invert(model, photo, PROMPT, **cache_kwargs(tmp_path))
    assert not hit and len(recomputed.uncond_embeddings) == 2
    assert "recomputing" in caplog.text and entry.name in caplog.text
    again, hit = cached_invert(model, photo, PROMPT, **cache_kwargs(tmp_path))  # the rewritten entry serves again
    assert hit and all(torch.equal(a, b) for a, b in zip(again.uncond_embeddings, recomputed.uncond_embeddings))


def test_cache_writes_are_atomic(model, photo, tmp_path, monkeypatch):
    import p2p.real.cache as cache

    first, _ = cached_invert(model, photo, PROMPT, **cache_kwargs(tmp_path))
    (entry,) = tmp_path.glob("*.safetensors")
    before = entry.read_bytes()
    temporary_names = []

    def interrupted_save(tensors, filename, metadata):  # a run killed while writing
        temporary_names.append(filename)
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "save_file", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        cache.save_inversion(first, entry)
    with pytest.raises(KeyboardInterrupt):
        cache.save_inversion(first, entry)
    assert entry.read_bytes() == before, "the old entry stays whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == [entry.name], "no temporary file is left behind"
    assert len(set(temporary_names)) == 2 and all(Path(n).parent == tmp_path for n in temporary_names), (
        "each writer has its own temporary file in the cache folder (so the rename is atomic)"
    )


def test_cache_dir_that_is_a_file_is_named(model, photo, tmp_path):
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("")
    with pytest.raises(UserError, match="cache_dir .*cache' is a file"):
        cached_invert(model, photo, PROMPT, **cache_kwargs(not_a_folder))


def test_psnr_and_vae_reconstruction_name_mismatched_shapes(model, photo):
    with pytest.raises(ValueError, match=r"one shape, got \(32, 32, 3\) and \(32, 16, 3\)"):
        psnr(photo, photo[:, :16])
    with pytest.raises(ValueError, match=r"mask has shape \(4, 4\)"):
        psnr(photo, photo, mask=np.ones((4, 4), bool))
    factor = model.config.latent_factor
    with pytest.raises(ValueError, match=rf"height={32 - factor // 2} is not a positive multiple"):
        vae_reconstruction(model, photo[: 32 - factor // 2])  # would silently come back smaller


def test_null_text_shows_a_progress_bar_with_its_loss(model, photo, capsys):
    invert(model, photo, PROMPT, settings=SamplerSettings(steps=2, guidance=5.0), inner_steps=1, progress=True)
    shown = capsys.readouterr().err
    assert "null-text inversion" in shown and "loss=" in shown and "DDIM inversion" in shown
    invert(model, photo, PROMPT, settings=SamplerSettings(steps=2, guidance=5.0), inner_steps=1, progress=False)
    assert "null-text inversion" not in capsys.readouterr().err


def test_null_text_restores_a_partly_trainable_model_as_it_was(model, photo):
    parameters = list(model.parameters())
    for i, p in enumerate(parameters):
        p.requires_grad_(i % 2 == 0)  # e.g. a model being fine-tuned in part
    try:
        invert(model, photo, PROMPT, settings=SamplerSettings(steps=2, guidance=5.0), inner_steps=2, progress=False)
        assert [p.requires_grad for p in parameters] == [i % 2 == 0 for i in range(len(parameters))]
        assert all(p.grad is None for p in parameters)
    finally:
        model.requires_grad_(False)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_edit_photo_checkpoints_the_unet_during_null_text_only(model, photo, checkpointing):
    """The setting reaches every UNet call that needs gradients, gives the same ∅ either way, and is restored."""
    from p2p.real.photo import InversionSettings, edit_photo

    seen = []
    hook = model.unet.register_forward_pre_hook(
        lambda unet, args: seen.append(unet.gradient_checkpointing) if torch.is_grad_enabled() else None
    )
    try:
        result = edit_photo(
            model,
            photo,
            [PROMPT],
            spec=None,
            blend=None,
            settings=SamplerSettings(steps=2, guidance=5.0),
            inversion=InversionSettings(inner_steps=2, tolerance_scale=0.0, gradient_checkpointing=checkpointing),
            cache_dir=None,
            progress=False,
            reconstruct=False,
        )
    finally:
        hook.remove()
    assert seen and set(seen) == {checkpointing}
    assert model.unet.gradient_checkpointing is False
    reference = invert(
        model, photo, PROMPT, settings=SamplerSettings(steps=2, guidance=5.0), inner_steps=2, tolerance_scale=0.0
    )
    for ours, theirs in zip(result.inversion.uncond_embeddings, reference.uncond_embeddings):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_checkpointing_cost_times_both_settings_interleaved(model):
    from p2p.experiments.checkpointing_cost import compare

    result = compare(model, height=32, width=32, repeats=2)
    assert len(result["on_seconds"]) == len(result["off_seconds"]) == 2
    assert min(result["on_seconds"] + result["off_seconds"]) > 0
    assert result["ratio"] == result["median_on"] / result["median_off"]
    assert model.unet.gradient_checkpointing is False and all(p.requires_grad is False for p in model.parameters())
