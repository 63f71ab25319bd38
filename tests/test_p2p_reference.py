"""The fast edit (`p2p.edit.edit`) equals the slow loop-by-loop reference (tests/p2p_reference.py) for every
edit kind of P2P_SPEC §4–§5, on small random-weight models (CPU, a few steps).

Both run through the same sampling loop (`p2p.pipeline.sample`) from the same x_T; only the controller and
the latent callback differ. Each case also checks that the edit really changes the targets, so agreement
is never the trivial "both did nothing".
"""

import dataclasses

import pytest
import torch
from p2p_reference import ReferenceP2P

from models.stable_diffusion import StableDiffusion, preset
from p2p.edit import BlendSpec, EditSpec, edit
from p2p.pipeline import SamplerSettings, initial_latent, sample

STEPS = 4
SEED = 3
SETTINGS = SamplerSettings(steps=STEPS, guidance=5.0)
TOLERANCE = 1e-4  # latents, max abs diff; float32 sums in a different order
MIN_EFFECT = 1e-3  # the edit must move some target latent at least this far from plain sampling

CAT = ["a cat riding a bicycle", "a dog riding a bicycle"]


def _model(context_length: int | None = None, **unet_changes):
    torch.manual_seed(0)
    config = preset("tiny")
    config.unet = dataclasses.replace(config.unet, **unet_changes)
    if context_length is not None:
        config.text = dataclasses.replace(config.text, context_length=context_length)
    return StableDiffusion(config).eval()


@pytest.fixture(scope="module")
def tiny():
    """8×8 latents; cross attention at 8×8, hybrid (text keys first) at 4×4 and 2×2."""
    return _model()


@pytest.fixture(scope="module")
def cross_only():
    """Pure SD layers (attn1 self + attn2 cross) at 8×8, 4×4 and 2×2, with SD's 77 text positions (the tiny
    model has fewer), so every kind is checked at both context lengths."""
    return _model(context_length=77, attention_kinds=("cross", "cross", "cross"))


def _compare(model, prompts, *, spec, blend=None, height=32, width=32, **reference):
    fast = edit(
        model, prompts, seed=SEED, spec=spec, blend=blend, settings=SETTINGS, height=height, width=width, progress=False
    )
    latent = initial_latent(SEED, height=height, width=width, latent_factor=model.config.latent_factor)
    ref = ReferenceP2P(
        prompts=prompts, num_steps=STEPS, latent_hw=tuple(latent.shape[-2:]), context=model.context_length, **reference
    )
    slow = sample(
        model, prompts, latent=latent, settings=SETTINGS, controller=ref, latent_callback=ref.blend, progress=False
    )
    plain = sample(model, prompts, latent=latent, settings=SETTINGS, progress=False)
    assert (fast.latents - slow).abs().max() <= TOLERANCE, (fast.latents - slow).abs().amax(dim=(1, 2, 3))
    assert (fast.latents[1:] - plain[1:]).abs().max() > MIN_EFFECT, "the edit did not change the targets"
    torch.testing.assert_close(fast.latents[0], plain[0], atol=TOLERANCE, rtol=0)  # the source is never edited
    return fast, ref


# --- replace ---------------------------------------------------------------------------------------


def test_replace_word_swap(tiny):
    _compare(
        tiny,
        CAT,
        spec=EditSpec(kind="replace", cross_replace_steps=0.75, self_replace_steps=0.5),
        kind="replace",
        cross=0.75,
        self_window=0.5,
    )


def test_replace_multi_token_swap_and_two_targets(tiny):
    # 'lasagne' is two tokens: pizza's column spreads over both, and 'outside', EOT and padding shift by one
    prompts = ["a cat eating pizza outside", "a cat eating lasagne outside", "a dog eating pizza outside"]
    _compare(
        tiny,
        prompts,
        spec=EditSpec(kind="replace", cross_replace_steps=1.0, self_replace_steps=0.25),
        kind="replace",
        cross=1.0,
        self_window=0.25,
    )


# --- refine ----------------------------------------------------------------------------------------


def test_refine_inserted_words(tiny):
    prompts = ["a cat riding a bicycle", "a fluffy cat riding a red bicycle", "a cat riding a bicycle"]
    _compare(
        tiny,
        prompts,
        spec=EditSpec(kind="refine", cross_replace_steps=0.75, self_replace_steps=0.5),
        kind="refine",
        cross=0.75,
        self_window=0.5,
    )


def test_refine_removed_words(tiny):
    prompts = ["a small cat riding a red bicycle on a hill", "a cat riding a bicycle"]
    _compare(
        tiny,
        prompts,
        spec=EditSpec(kind="refine", cross_replace_steps=1.0, self_replace_steps=0.0),
        kind="refine",
        cross=1.0,
    )


# --- reweight ---------------------------------------------------------------------------------------


def test_reweight_alone_positive_and_negative_per_target(tiny):
    prompts = ["a cat on a mat"] * 3
    spec = EditSpec(
        kind="reweight", cross_replace_steps=1.0, self_replace_steps=0.0, reweight={"cat": [3.0, -1.5], "mat": 0.5}
    )
    _compare(tiny, prompts, spec=spec, kind="none", cross=1.0, reweight={"cat": [3.0, -1.5], "mat": 0.5})


def test_reweight_on_replace_inside_its_window_only(tiny):
    spec = EditSpec(kind="replace", cross_replace_steps=0.5, self_replace_steps=0.0, reweight={"dog": 4.0})
    _compare(tiny, CAT, spec=spec, kind="replace", cross=0.5, reweight={"dog": 4.0})


def test_reweight_on_refine(tiny):
    prompts = ["a cat riding a bicycle", "a fluffy cat riding a red bicycle"]
    spec = EditSpec(
        kind="refine", cross_replace_steps=1.0, self_replace_steps=0.25, reweight={"fluffy": -2.0, "red": 5.0}
    )
    _compare(
        tiny, prompts, spec=spec, kind="refine", cross=1.0, self_window=0.25, reweight={"fluffy": -2.0, "red": 5.0}
    )


# --- schedules ---------------------------------------------------------------------------------------


def test_per_word_windows_with_default(tiny):
    schedule = {"default_": 0.5, "dog": (0.25, 1.0)}
    _compare(
        tiny,
        CAT,
        spec=EditSpec(kind="replace", cross_replace_steps=schedule, self_replace_steps=0.0),
        kind="replace",
        cross=schedule,
    )


def test_per_word_window_without_default_means_whole_run(tiny):
    prompts = ["a cat riding a bicycle", "a fluffy cat riding a red bicycle"]
    schedule = {"bicycle": (0.5, 0.75)}
    _compare(
        tiny,
        prompts,
        spec=EditSpec(kind="refine", cross_replace_steps=schedule, self_replace_steps=0.0),
        kind="refine",
        cross=schedule,
    )


def test_object_preservation_injects_one_word(tiny):
    _compare(
        tiny,
        CAT,
        spec=EditSpec(kind="replace", cross_replace_steps=0.75, self_replace_steps=0.0, preserve=["bicycle"]),
        kind="replace",
        cross=0.75,
        preserve=["bicycle"],
    )


@pytest.mark.parametrize(
    "threshold", [dict(self_max_fraction=0.5), dict(self_max_side=8)], ids=["latent/2 (4x4 self)", "side 8 (8x8 self)"]
)
def test_self_window_thresholds(cross_only, threshold):
    spec = EditSpec(kind="replace", cross_replace_steps=0.0, self_replace_steps=(0.25, 0.75), **threshold)
    _compare(
        cross_only,
        CAT,
        spec=spec,
        kind="replace",
        cross=0.0,
        self_window=(0.25, 0.75),
        self_fraction=threshold.get("self_max_fraction", 0.25),
        self_side=threshold.get("self_max_side"),
    )


def test_hybrid_pixel_columns_are_never_injected(tiny):
    """P2P_SPEC §2: in hybrid layers edits touch only the text columns. The tiny UNet's only pure self layers
    are at 8×8, so a self window that reaches down to 4×4 (its hybrid layers) but not 8×8 changes nothing."""
    spec = EditSpec(kind="replace", cross_replace_steps=0.0, self_replace_steps=1.0, self_max_fraction=0.5)
    fast = edit(tiny, CAT, seed=SEED, spec=spec, settings=SETTINGS, height=32, width=32, progress=False)
    latent = initial_latent(SEED, height=32, width=32, latent_factor=tiny.config.latent_factor)
    plain = sample(tiny, CAT, latent=latent, settings=SETTINGS, progress=False)
    torch.testing.assert_close(fast.latents, plain, atol=TOLERANCE, rtol=0)


# --- LocalBlend ---------------------------------------------------------------------------------------


# A random model's maps are flat (a word's map spans about 0.6–1 of its max), so the thresholds sit high enough
# for masks that are neither empty nor full. At 2×2 a 3×3 max-pool makes every map flat: dilation 0 there.
@pytest.mark.parametrize(
    "downsamplings,grid,dilation,threshold",
    [(0, (8, 8), 1, 0.88), (1, (4, 4), 1, 0.96), (2, (2, 2), 0, 0.93)],
    ids=["8x8 cross", "4x4 hybrid", "2x2 hybrid (default grid)"],
)
def test_local_blend(tiny, downsamplings, grid, dilation, threshold):
    words = [["cat"], ["dog"]]
    blend = BlendSpec(words=words, threshold=threshold, dilation=dilation, resolution_downsamplings=downsamplings)
    fast, ref = _compare(
        tiny,
        CAT,
        spec=EditSpec(kind="replace", cross_replace_steps=0.75, self_replace_steps=0.5),
        blend=blend,
        kind="replace",
        cross=0.75,
        self_window=0.5,
        blend_words=words,
        blend_grid=grid,
        blend_threshold=threshold,
        blend_dilation=dilation,
    )
    torch.testing.assert_close(fast.blend.last_mask[1:], ref.last_mask[1:], atol=0, rtol=0)
    assert 0 < float(fast.blend.last_mask[1].mean()) < 1, "a trivial mask would not test the blend"


def test_local_blend_start_and_target_subtract_words(tiny):
    words, subtract = [["cat"], ["dog"]], [[], ["bicycle"]]
    blend = BlendSpec(
        words=words,
        threshold=0.8,
        start=0.5,
        subtract_words=subtract,
        subtract_threshold=0.75,
        resolution_downsamplings=0,
    )
    fast, ref = _compare(
        tiny,
        CAT,
        spec=EditSpec(kind="replace", cross_replace_steps=0.75, self_replace_steps=0.0),
        blend=blend,
        kind="replace",
        cross=0.75,
        blend_words=words,
        blend_grid=(8, 8),
        blend_threshold=0.8,
        blend_start=0.5,
        subtract_words=subtract,
        subtract_threshold=0.75,
    )
    torch.testing.assert_close(fast.blend.last_mask[1:], ref.last_mask[1:], atol=0, rtol=0)
    assert 0 < float(fast.blend.last_mask[1].mean()) < 1


def test_local_blend_subtract_words_of_source_and_target(tiny):
    words, subtract = [["cat"], ["dog"]], [["bicycle"], ["bicycle"]]
    blend = BlendSpec(
        words=words, threshold=0.8, subtract_words=subtract, subtract_threshold=0.75, resolution_downsamplings=0
    )
    fast, ref = _compare(
        tiny,
        CAT,
        spec=EditSpec(kind="replace", cross_replace_steps=0.75, self_replace_steps=0.0),
        blend=blend,
        kind="replace",
        cross=0.75,
        blend_words=words,
        blend_grid=(8, 8),
        blend_threshold=0.8,
        subtract_words=subtract,
        subtract_threshold=0.75,
    )
    torch.testing.assert_close(fast.blend.last_mask[1:], ref.last_mask[1:], atol=0, rtol=0)


# --- sizes and layer kinds ------------------------------------------------------------------------------


def test_non_square_latents(tiny):
    # 32×48 px → 8×12 latents → 4×6 and 2×3 grids; self at latent/4 = the 2×3 hybrid layers
    words = [["cat"], ["dog"]]
    blend = BlendSpec(words=words, threshold=0.95, resolution_downsamplings=1)
    fast, ref = _compare(
        tiny,
        CAT,
        spec=EditSpec(kind="replace", cross_replace_steps=0.75, self_replace_steps=0.5, reweight={"dog": 2.0}),
        blend=blend,
        height=32,
        width=48,
        kind="replace",
        cross=0.75,
        self_window=0.5,
        reweight={"dog": 2.0},
        blend_words=words,
        blend_grid=(4, 6),
        blend_threshold=0.95,
    )
    assert fast.latents.shape[-2:] == (8, 12)
    torch.testing.assert_close(fast.blend.last_mask[1:], ref.last_mask[1:], atol=0, rtol=0)
    assert 0 < float(fast.blend.last_mask[1].mean()) < 1


def test_cross_only_sd_layers(cross_only):
    prompts = ["a cat riding a bicycle", "a fluffy cat riding a red bicycle"]
    spec = EditSpec(
        kind="refine",
        cross_replace_steps={"default_": 0.75, "red": 0.25},
        self_replace_steps=0.5,
        self_max_fraction=0.5,
        reweight={"fluffy": 2.0},
    )
    blend = BlendSpec(words=[["cat"], ["cat"]], threshold=0.3, resolution_downsamplings=1)
    fast, ref = _compare(
        cross_only,
        prompts,
        spec=spec,
        blend=blend,
        kind="refine",
        cross={"default_": 0.75, "red": 0.25},
        self_window=0.5,
        self_fraction=0.5,
        reweight={"fluffy": 2.0},
        blend_words=[["cat"], ["cat"]],
        blend_grid=(4, 4),
    )
    torch.testing.assert_close(fast.blend.last_mask[1:], ref.last_mask[1:], atol=0, rtol=0)


@pytest.fixture(scope="module")
def short_context():
    """The tiny layout with 16 text positions instead of CLIP's 77 (what the built-in model may use)."""
    return _model(context_length=16)


def test_short_context_replace_multi_token(short_context):
    # 'lasagne' is two tokens, so EOT and padding shift inside a 16-position context
    prompts = ["a cat eating pizza outside", "a cat eating lasagne outside"]
    spec = EditSpec(
        kind="replace",
        cross_replace_steps={"default_": 1.0, "lasagne": 0.5},
        self_replace_steps=0.5,
        reweight={"lasagne": 1.5},
    )
    _compare(
        short_context,
        prompts,
        spec=spec,
        kind="replace",
        cross={"default_": 1.0, "lasagne": 0.5},
        self_window=0.5,
        reweight={"lasagne": 1.5},
    )


def test_short_context_refine_and_blend(short_context):
    prompts = ["a cat riding a bicycle", "a fluffy cat riding a red bicycle"]
    blend = BlendSpec(words=[["cat"], ["cat"]], threshold=0.3, resolution_downsamplings=0)
    fast, ref = _compare(
        short_context,
        prompts,
        spec=EditSpec(kind="refine", cross_replace_steps=0.75),
        blend=blend,
        kind="refine",
        cross=0.75,
        blend_words=[["cat"], ["cat"]],
        blend_grid=(8, 8),
    )
    torch.testing.assert_close(fast.blend.last_mask[1:], ref.last_mask[1:], atol=0, rtol=0)


def test_edit_built_for_another_context_length_is_refused(short_context):
    from p2p.edit import build_edit

    controller = build_edit(EditSpec(kind="replace"), CAT, num_steps=STEPS, latent_hw=(8, 8))  # 77, the SD default
    latent = initial_latent(SEED, height=32, width=32, latent_factor=short_context.config.latent_factor)
    with pytest.raises(ValueError, match="16 text tokens but the edit was built for 77"):
        sample(short_context, CAT, latent=latent, settings=SETTINGS, controller=controller, progress=False)
