"""Identities every Prompt-to-Prompt edit must satisfy (P2P_SPEC §1, §3–§5, §9; issue 3 "How it must be proven"),
on the tiny random-weight model (CPU, a few steps).

An edit with nothing to change is plain sampling; the source is never edited; LocalBlend leaves the source's
latent outside its mask; targets do not interact; a run leaves nothing behind for the next; a named word
that is not in its prompt raises.
"""

import logging
from types import SimpleNamespace

import pytest
import torch

from models.stable_diffusion import StableDiffusion, preset
from p2p.controllers import AttentionStore, Compose, LayerFilter
from p2p.edit import BlendSpec, EditSpec, build_blend, build_edit, default_blend_downsamplings, edit
from p2p.pipeline import SamplerSettings, initial_latent, sample

STEPS = 4
SEED = 5
SETTINGS = SamplerSettings(steps=STEPS, guidance=5.0)
TOLERANCE = 1e-4  # latents, max abs diff
CAT = ["a cat riding a bicycle", "a dog riding a bicycle"]
ALL_SELF_LAYERS = dict(self_max_side=8)  # the 8×8 self layers too: nothing escapes the self rule


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return StableDiffusion(preset("tiny")).eval()


def _latent(model):
    return initial_latent(SEED, height=32, width=32, latent_factor=model.config.latent_factor)


def _plain(model, prompts):
    return sample(model, prompts, latent=_latent(model), settings=SETTINGS, progress=False)


def _edit(model, prompts, **kwargs):
    return edit(model, prompts, seed=SEED, settings=SETTINGS, progress=False, **kwargs)


def _max_diff(a, b):
    return float((a - b).abs().max())


# --- edits that change nothing are plain sampling ------------------------------------------------------


def test_replace_with_identical_prompts_is_plain_sampling(tiny):
    prompts = ["a cat riding a bicycle"] * 2
    result = _edit(
        tiny, prompts, spec=EditSpec(kind="replace", cross_replace_steps=1.0, self_replace_steps=1.0, **ALL_SELF_LAYERS)
    )
    assert _max_diff(result.latents, _plain(tiny, prompts)) <= TOLERANCE


def test_reweight_one_is_a_no_op(tiny):
    same = ["a cat on a mat"] * 2
    alone = _edit(
        tiny,
        same,
        spec=EditSpec(kind="reweight", cross_replace_steps=1.0, self_replace_steps=0.0, reweight={"cat": 1.0}),
    )
    assert _max_diff(alone.latents, _plain(tiny, same)) <= TOLERANCE
    replace = EditSpec(kind="replace", cross_replace_steps=0.75, self_replace_steps=0.5)
    with_one = EditSpec(kind="replace", cross_replace_steps=0.75, self_replace_steps=0.5, reweight={"dog": 1.0})
    assert _max_diff(_edit(tiny, CAT, spec=with_one).latents, _edit(tiny, CAT, spec=replace).latents) <= TOLERANCE


@pytest.mark.parametrize(
    "kind,prompts",
    [
        ("replace", ["a cat riding a bicycle", "a dog riding a bicycle", "a cat riding a horse"]),
        ("refine", ["a cat riding a bicycle", "a fluffy cat riding a red bicycle"]),
    ],
)
def test_cross_zero_and_self_zero_is_plain_sampling_of_each_prompt_alone(tiny, kind, prompts):
    result = _edit(tiny, prompts, spec=EditSpec(kind=kind, cross_replace_steps=0.0, self_replace_steps=0.0))
    for row, prompt in enumerate(prompts):
        assert _max_diff(result.latents[row], _plain(tiny, [prompt])[0]) <= TOLERANCE, prompt


def test_source_row_equals_the_source_generated_alone(tiny):
    prompts = ["a cat riding a bicycle", "a dog riding a bicycle", "a cat riding a horse"]
    spec = EditSpec(
        kind="replace",
        cross_replace_steps=0.75,
        self_replace_steps=0.5,
        reweight={"riding": [3.0, -1.0]},
        **ALL_SELF_LAYERS,
    )
    blend = BlendSpec(words=[["cat"], ["dog"], ["horse"]], threshold=0.88, resolution_downsamplings=0)
    result = _edit(tiny, prompts, spec=spec, blend=blend)
    source_alone = _plain(tiny, prompts[:1])[0]
    assert _max_diff(result.latents[0], source_alone) <= TOLERANCE
    assert _max_diff(result.latents[1], _plain(tiny, prompts[1:2])[0]) > 1e-3  # the targets were edited


def test_the_prediction_hook_sees_each_steps_x0_and_changes_nothing(tiny):
    seen = []
    latents = sample(
        tiny,
        CAT,
        latent=_latent(tiny),
        settings=SETTINGS,
        progress=False,
        on_prediction=lambda step, x0: seen.append((step, x0)),
    )
    assert torch.equal(latents, _plain(tiny, CAT))
    assert [step for step, _ in seen] == list(range(STEPS))
    assert all(x0.shape == latents.shape for _, x0 in seen)
    # the last step lands at ᾱ = alphas_cumprod[0] ≈ 0.9991, a hair from its own x0 prediction
    assert _max_diff(seen[-1][1], latents) < 0.2 < _max_diff(seen[0][1], latents)


# --- LocalBlend ------------------------------------------------------------------------------------------


def test_outside_the_blend_mask_the_target_is_exactly_the_source(tiny):
    blend = BlendSpec(words=[["cat"], ["dog"]], threshold=0.88, resolution_downsamplings=0)
    result = _edit(
        tiny, CAT, spec=EditSpec(kind="replace", cross_replace_steps=0.75, self_replace_steps=0.5), blend=blend
    )
    outside = result.blend.last_mask[1, 0] == 0  # (h, w) of the last step's blend, the one that made the latents
    assert 0 < int(outside.sum()) < outside.numel(), "the test needs a mask with an inside and an outside"
    source, target = result.latents[0], result.latents[1]
    assert torch.equal(target[:, outside], source[:, outside])
    assert _max_diff(target[:, ~outside], source[:, ~outside]) > 1e-3  # inside, the edit is kept


def test_an_empty_blend_mask_warns_and_does_not_collapse_the_edit(tiny, caplog):
    # target 2 and the source have no blend words: its mask (source ∪ own) is empty
    prompts = ["a cat riding a bicycle", "a dog riding a bicycle", "a cat riding a horse"]
    spec = EditSpec(kind="replace", cross_replace_steps=0.75, self_replace_steps=0.5)
    with caplog.at_level(logging.WARNING, logger="p2p.blend"):
        blended = _edit(
            tiny,
            prompts,
            spec=spec,
            blend=BlendSpec(words=[[], ["dog"], []], threshold=0.3, resolution_downsamplings=0),
        )
    assert any("empty mask" in r.getMessage() and "[2]" in r.getMessage() for r in caplog.records), caplog.text
    assert torch.all(blended.blend.last_mask[2] == 1)  # left unblended rather than pulled onto the source
    unblended = _edit(tiny, prompts, spec=spec)
    assert _max_diff(blended.latents[2], unblended.latents[2]) <= 1e-5
    assert _max_diff(blended.latents[2], blended.latents[0]) > 1e-2


# --- any number of targets ----------------------------------------------------------------------------


def test_three_targets_each_equal_their_own_two_prompt_edit(tiny):
    source = "a cat riding a bicycle"
    targets = ["a dog riding a bicycle", "a fox riding a bicycle", "a cat riding a horse"]
    spec = EditSpec(kind="replace", cross_replace_steps=0.75, self_replace_steps=0.5, reweight={"riding": 2.0})
    together = _edit(tiny, [source, *targets], spec=spec).latents
    assert together.shape[0] == 4
    for t, target in enumerate(targets, start=1):
        pair = _edit(tiny, [source, target], spec=spec).latents
        assert _max_diff(together[t], pair[1]) <= TOLERANCE, target


# --- no state between runs --------------------------------------------------------------------------------


def test_the_same_edit_twice_is_identical(tiny):
    spec = EditSpec(kind="refine", cross_replace_steps={"default_": 0.75, "red": (0.25, 1.0)}, self_replace_steps=0.5)
    blend = BlendSpec(words=[["bicycle"], ["bicycle"]], threshold=0.88, resolution_downsamplings=0)
    prompts = ["a cat riding a bicycle", "a cat riding a red bicycle"]
    first, second = (_edit(tiny, prompts, spec=spec, blend=blend) for _ in range(2))
    assert torch.equal(first.latents, second.latents)
    assert torch.equal(first.blend.last_mask, second.blend.last_mask)


def test_a_reused_attention_edit_is_refused(tiny):
    controller = build_edit(
        EditSpec(kind="replace", cross_replace_steps=0.75, self_replace_steps=0.5),
        CAT,
        num_steps=STEPS,
        latent_hw=(8, 8),
    )
    sample(tiny, CAT, latent=_latent(tiny), settings=SETTINGS, controller=controller, progress=False)
    with pytest.raises(RuntimeError, match="built for one run"):
        sample(tiny, CAT, latent=_latent(tiny), settings=SETTINGS, controller=controller, progress=False)


def _refused_or_identical(run):
    """Run twice with one controller: the second run must raise, or give exactly what the first gave."""
    first = run()
    try:
        second = run()
    except (RuntimeError, ValueError):
        return
    for a, b in zip(first, second):
        assert torch.equal(a, b), "a reused controller silently carried state from its previous run"


def test_a_reused_local_blend_is_refused_or_identical(tiny):
    blender = build_blend(
        BlendSpec(words=[["cat"], ["dog"]], threshold=0.88), CAT, num_steps=STEPS, latent_hw=(8, 8), downsamplings=0
    )
    controller = Compose([blender, build_edit(EditSpec(kind="replace"), CAT, num_steps=STEPS, latent_hw=(8, 8))])
    _refused_or_identical(
        lambda: (
            sample(
                tiny,
                CAT,
                latent=_latent(tiny),
                settings=SETTINGS,
                controller=controller,
                latent_callback=blender.blend_latents,
                progress=False,
            ),
            blender.last_mask.clone(),
        )
    )


def test_a_reused_attention_store_is_refused_or_identical(tiny):
    store = AttentionStore(num_prompts=2, layers=LayerFilter(kinds=("cross", "hybrid")))

    def run():
        sample(tiny, CAT, latent=_latent(tiny), settings=SETTINGS, controller=store, progress=False)
        return [store.maps[name].clone() for name in sorted(store.maps)] + [torch.tensor(sorted(store.counts.values()))]

    _refused_or_identical(run)


# --- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,blend",
    [
        (EditSpec(kind="replace", reweight={"horse": 2.0}), None),
        (EditSpec(kind="replace", cross_replace_steps={"default_": 0.8, "horse": 0.4}), None),
        (EditSpec(kind="replace", preserve=["horse"]), None),
        (EditSpec(kind="replace"), BlendSpec(words=[["cat"], ["horse"]])),
        (EditSpec(kind="replace"), BlendSpec(words=[["cat"], ["dog"]], subtract_words=[["horse"], []])),
    ],
    ids=["reweight", "schedule", "preserve", "blend", "subtract"],
)
def test_a_missing_word_raises_naming_it(tiny, spec, blend):
    with pytest.raises(ValueError, match="'horse'"):
        _edit(tiny, CAT, spec=spec, blend=blend)


def test_replace_between_different_word_counts_raises_suggesting_refine(tiny):
    with pytest.raises(ValueError, match="refine"):
        _edit(tiny, ["a cat riding a bicycle", "a fluffy cat riding a bicycle"], spec=EditSpec(kind="replace"))


@pytest.mark.parametrize(
    "name,latent,expected", [("sd15", 64, 2), ("sd15", 96, 2), ("sd15", 32, 2), ("sd15", 16, 1), ("tiny", 8, 0)]
)
def test_default_blend_grid_is_latent_over_4_but_never_under_8_cells(name, latent, expected):
    # SD 512 px: the reference's 16×16; a smaller image or the tiny model: the finest level with ≥ 8 cells,
    # where a 3×3 dilation still leaves most of the image outside the mask
    model = SimpleNamespace(config=preset(name))
    assert default_blend_downsamplings(model, (latent, latent)) == expected


def test_restore_pixels_copies_the_source_image_outside_the_blend_mask(tiny):
    blend = BlendSpec(words=[["cat"], ["dog"]], threshold=0.9, resolution_downsamplings=0, dilation=0)
    latent_only = edit(
        tiny, CAT, seed=SEED, spec=EditSpec(kind="replace"), blend=blend, settings=SETTINGS, progress=False
    )
    restored = edit(
        tiny,
        CAT,
        seed=SEED,
        spec=EditSpec(kind="replace"),
        settings=SETTINGS,
        progress=False,
        blend=BlendSpec(**{**blend.__dict__, "restore_pixels": True}),
    )
    mask = torch.nn.functional.interpolate(restored.blend.last_mask[1:2].float(), size=(32, 32))[0, 0].bool().numpy()
    assert 0 < mask.mean() < 1
    assert (restored.images[1][~mask] == restored.images[0][~mask]).all()  # outside: the source's pixels, exactly
    assert (restored.images[1][mask] == latent_only.images[1][mask]).all()  # inside: the edit, untouched
    assert (latent_only.images[1][~mask] != latent_only.images[0][~mask]).any()  # the decoder alone spreads changes
    assert (restored.images[0] == latent_only.images[0]).all()  # the source is never changed
