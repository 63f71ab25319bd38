"""Controllers on synthetic attention maps (no diffusion model): what each one touches, and what it leaves alone.

Batch layout at the hook: rows `[uncond × P, cond × P]`, source first in each half (P2P_SPEC §1). Expected
values are written out per column from P2P_SPEC §4–§6, independently of the batched formulas.
"""

import logging

import pytest
import torch
from torch import nn

from models.attention import AttentionSite, CrossAttention, HybridAttention, attach_controller
from p2p.blend import LocalBlend
from p2p.controllers import AttentionStore, Compose, LayerFilter
from p2p.edit import EditSpec, build_edit
from p2p.tokens import CONTEXT_LENGTH as TEXT

STEPS = 4
LATENT = (8, 8)
CAT = ["a cat riding a bicycle", "a dog riding a bicycle"]

CROSS_8 = AttentionSite("input_blocks.1.1.transformer_blocks.0.attn2", "cross", (8, 8), TEXT)
SELF_8 = AttentionSite("input_blocks.1.1.transformer_blocks.0.attn1", "self", (8, 8), 0)
SELF_2 = AttentionSite("input_blocks.5.1.transformer_blocks.0.attn1", "self", (2, 2), 0)
HYBRID_4 = AttentionSite("input_blocks.3.1.transformer_blocks.0.attn1", "hybrid", (4, 4), TEXT)
HYBRID_2 = AttentionSite("middle_block.1.transformer_blocks.0.attn1", "hybrid", (2, 2), TEXT)


def _keys(site):
    return site.num_text_keys + (site.num_queries if site.kind != "cross" else 0)


def _probs(site, *, num_prompts=2, heads=2, seed=0):
    """Random maps (2P, heads, queries, keys) that differ per row, as the attention softmax gives them."""
    generator = torch.Generator().manual_seed(seed)
    scores = 3 * torch.randn(2 * num_prompts, heads, site.num_queries, _keys(site), generator=generator)
    return scores.softmax(dim=-1)


def _edit(spec, prompts=CAT):
    return build_edit(spec, prompts, num_steps=STEPS, latent_hw=LATENT)


def _run(controller, probs, site, *, step):
    controller.begin_step(step)
    return controller(probs, site)


# --- wants: the fused path wherever nothing is edited -----------------------------------------------------


def test_attention_edit_wants_only_inside_its_windows_and_below_the_self_threshold():
    # cross steps [0, 2); self steps [1, 3) in layers with ≤ (8/4)² = 4 queries
    controller = _edit(EditSpec(kind="replace", cross_replace_steps=0.5, self_replace_steps=(0.25, 0.75)))
    expected = {  # step: (cross 8×8, self 8×8, self 2×2, hybrid 4×4, hybrid 2×2)
        0: (True, False, False, True, True),
        1: (True, False, True, True, True),
        2: (False, False, True, False, False),  # hybrid: text columns only, so outside the cross window: no
        3: (False, False, False, False, False),
    }
    for step, wanted in expected.items():
        controller.begin_step(step)
        got = tuple(controller.wants(site) for site in (CROSS_8, SELF_8, SELF_2, HYBRID_4, HYBRID_2))
        assert got == wanted, step


def test_a_window_with_no_injected_token_is_not_wanted():
    controller = _edit(
        EditSpec(kind="replace", cross_replace_steps={"default_": 0.0, "dog": (0.5, 0.75)}, self_replace_steps=0.0)
    )
    assert [controller.begin_step(s) or controller.wants(CROSS_8) for s in range(STEPS)] == [False, False, True, False]


class Spy:
    """Wraps a controller and records which sites it was called for."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def begin_step(self, step):
        self.inner.begin_step(step)

    def wants(self, site):
        return self.inner.wants(site)

    def __call__(self, probs, site):
        self.calls.append(site.name)
        return self.inner(probs, site)


@pytest.mark.parametrize("kind", ["cross", "hybrid"])
def test_unwanted_sites_keep_the_fused_path_bit_for_bit(kind):
    torch.manual_seed(0)
    heads, dim_head, query_hw, context_dim = 2, 8, (2, 2), 16
    if kind == "cross":
        module = CrossAttention(query_dim=16, context_dim=context_dim, heads=heads, dim_head=dim_head)
    else:
        module = HybridAttention(query_dim=16, context_dim=context_dim, heads=heads, dim_head=dim_head)
    layers = nn.ModuleDict({"attn": module})
    module.site_name = "attn"
    x, context = torch.randn(4, 4, 16), torch.randn(4, TEXT, context_dim)  # 2 prompts × [uncond, cond]
    plain = module(x, context, query_hw=query_hw)
    spy = Spy(_edit(EditSpec(kind="replace", cross_replace_steps=0.5, self_replace_steps=0.5)))

    spy.begin_step(3)  # outside every window
    with attach_controller(layers, spy):
        untouched = module(x, context, query_hw=query_hw)
    assert spy.calls == [] and torch.equal(untouched, plain)

    spy = Spy(_edit(EditSpec(kind="replace", cross_replace_steps=0.5, self_replace_steps=0.5)))  # one run each
    spy.begin_step(0)  # inside: the map is materialised and edited
    with attach_controller(layers, spy):
        edited = module(x, context, query_hw=query_hw)
    assert spy.calls == ["attn"]
    torch.testing.assert_close(edited[:3], plain[:3], atol=1e-5, rtol=0)  # uncond half and the source row
    assert (edited[3] - plain[3]).abs().max() > 1e-3  # the target row


# --- what an edit changes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("site", [CROSS_8, SELF_2, HYBRID_2], ids=lambda s: f"{s.kind} {s.query_hw}")
def test_only_the_conditional_targets_change_and_the_input_is_not_edited_in_place(site):
    controller = _edit(EditSpec(kind="replace", cross_replace_steps=1.0, self_replace_steps=1.0))
    probs = _probs(site, num_prompts=2)
    before = probs.clone()
    out = _run(controller, probs, site, step=0)
    assert torch.equal(probs, before)
    assert torch.equal(out[:2], probs[:2])  # unconditional half
    assert torch.equal(out[2], probs[2])  # conditional source
    assert (out[3] - probs[3]).abs().max() > 0.1  # conditional target


def test_replace_spreads_a_multi_token_swap_and_shifts_the_tail():
    # "pizza" (position 4) → "lasagne" (positions 4, 5); "outside" and EOT move one to the right, padding stays
    prompts = ["a cat eating pizza outside", "a cat eating lasagne outside"]
    controller = _edit(EditSpec(kind="replace", cross_replace_steps=1.0, self_replace_steps=0.0), prompts)
    probs = _probs(CROSS_8)
    out = _run(controller, probs, CROSS_8, step=0)
    source, target = probs[2], out[3]
    for j in range(4):  # start token, a, cat, eating
        assert torch.equal(target[..., j], source[..., j]), j
    torch.testing.assert_close(target[..., 4], source[..., 4] / 2)
    torch.testing.assert_close(target[..., 5], source[..., 4] / 2)
    for j in (6, 7):  # outside, EOT: one position later than in the source
        assert torch.equal(target[..., j], source[..., j - 1]), j
    for j in range(8, TEXT):  # padding: the same position (source padding 7 has no partner)
        assert torch.equal(target[..., j], source[..., j]), j


def test_refine_takes_aligned_columns_from_the_source_and_keeps_new_tokens_own():
    prompts = ["a cat", "a fluffy cat"]  # target: SOT a fluffy cat EOT → source: SOT a — cat EOT
    controller = _edit(EditSpec(kind="refine", cross_replace_steps=1.0, self_replace_steps=0.0), prompts)
    probs = _probs(CROSS_8)
    out = _run(controller, probs, CROSS_8, step=0)
    source, target = probs[2], probs[3]
    expected = {
        0: source[..., 0],
        1: source[..., 1],
        2: target[..., 2],
        3: source[..., 2],
        4: source[..., 3],
        5: source[..., 5],
        TEXT - 1: source[..., TEXT - 1],
    }  # padding keeps its position
    for j, column in expected.items():
        assert torch.equal(out[3][..., j], column), j


def test_tokens_outside_their_window_keep_the_target_column():
    controller = _edit(
        EditSpec(kind="replace", cross_replace_steps={"default_": 0.0, "dog": 1.0}, self_replace_steps=0.0)
    )
    probs = _probs(CROSS_8)
    out = _run(controller, probs, CROSS_8, step=0)
    dog = 2  # SOT a dog …
    assert torch.equal(out[3][..., dog], probs[2][..., dog])
    others = [j for j in range(TEXT) if j != dog]
    assert torch.equal(out[3][..., others], probs[3][..., others])


def test_reweight_multiplies_one_word_per_target_including_negative_scales():
    prompts = ["a cat on a mat"] * 3
    controller = _edit(
        EditSpec(kind="reweight", cross_replace_steps=1.0, self_replace_steps=0.0, reweight={"cat": [2.5, -1.0]}),
        prompts,
    )
    probs = _probs(CROSS_8, num_prompts=3)
    out = _run(controller, probs, CROSS_8, step=0)
    source, cat = probs[3], 2
    for row, scale in ((4, 2.5), (5, -1.0)):
        torch.testing.assert_close(out[row][..., cat], scale * source[..., cat], atol=0, rtol=0)
        rest = [j for j in range(TEXT) if j != cat]
        assert torch.equal(out[row][..., rest], source[..., rest])  # no renormalisation


def test_self_layers_take_the_whole_source_map_inside_the_window_only():
    controller = _edit(EditSpec(kind="replace", cross_replace_steps=0.0, self_replace_steps=(0.25, 0.5)))
    probs = _probs(SELF_2)
    assert torch.equal(_run(controller, probs, SELF_2, step=1)[3], probs[2])
    controller.begin_step(2)
    assert not controller.wants(SELF_2)


def test_hybrid_layers_edit_only_their_text_columns():
    text, pixels = slice(0, TEXT), slice(TEXT, None)
    # cross steps [0, 2), self steps [1, 3); self rule up to 2×2
    controller = _edit(
        EditSpec(kind="reweight", cross_replace_steps=0.5, self_replace_steps=(0.25, 0.75), reweight={"cat": 3.0}),
        ["a cat", "a cat"],
    )
    scaled = torch.ones(TEXT)
    scaled[2] = 3.0  # SOT a cat
    probs = _probs(HYBRID_2)
    source, target = probs[2], probs[3]

    cross_only = _run(controller, probs, HYBRID_2, step=0)[3]
    torch.testing.assert_close(cross_only[..., text], source[..., text] * scaled, atol=0, rtol=0)
    assert torch.equal(cross_only[..., pixels], target[..., pixels])

    both = _run(controller, probs, HYBRID_2, step=1)[3]  # inside the self window too: pixels still untouched
    torch.testing.assert_close(both[..., text], source[..., text] * scaled, atol=0, rtol=0)
    assert torch.equal(both[..., pixels], target[..., pixels])

    controller.begin_step(2)  # self window only: nothing to do in a hybrid layer
    assert not controller.wants(HYBRID_2)
    self_only = controller(probs, HYBRID_2)
    assert torch.equal(self_only, probs)


def test_a_batch_of_the_wrong_size_is_refused():
    controller = _edit(EditSpec(kind="replace"))
    with pytest.raises(RuntimeError, match="expected 2 × 2 prompts"):
        _run(controller, _probs(CROSS_8, num_prompts=3), CROSS_8, step=0)


def test_self_threshold_follows_the_unet_levels_for_odd_latents():
    controller = build_edit(EditSpec(kind="replace", self_replace_steps=1.0), CAT, num_steps=STEPS, latent_hw=(10, 10))
    controller.begin_step(0)
    # grids of a 10×10 latent: 10×10, 5×5, 3×3 (the level two downsamplings deep = "latent/4")
    assert controller.wants(AttentionSite("middle_block.1.transformer_blocks.0.attn1", "self", (3, 3), 0))


# --- the attention store --------------------------------------------------------------------------------


def test_store_records_unedited_head_averaged_maps_before_the_edit():
    store = AttentionStore(num_prompts=2, layers=LayerFilter(kinds=("cross",)))
    edit = _edit(EditSpec(kind="replace", cross_replace_steps=1.0, self_replace_steps=0.0))
    controller = Compose([store, edit])
    probs = _probs(CROSS_8)
    out = _run(controller, probs, CROSS_8, step=0)
    assert not torch.equal(out[3], probs[3])  # the edit ran …
    expected = torch.stack([probs[2].mean(dim=0), probs[3].mean(dim=0)])  # … but the store kept the prompts' own
    torch.testing.assert_close(store.maps[CROSS_8.name], expected, atol=0, rtol=0)


def test_store_does_not_alias_the_probs_and_averages_over_steps():
    store = AttentionStore(num_prompts=2, layers=LayerFilter(kinds=("cross",)), per_step=True)
    first, second = _probs(CROSS_8, seed=1), _probs(CROSS_8, seed=2)
    expected_first = first[2:].mean(dim=1)
    _run(store, first, CROSS_8, step=0)
    first.mul_(0)  # the model's buffer is reused or edited later: the store must not see it
    assert torch.equal(store.steps[0][CROSS_8.name], expected_first)
    _run(store, second, CROSS_8, step=1)
    torch.testing.assert_close(store.average(CROSS_8.name), (expected_first + second[2:].mean(dim=1)) / 2)
    assert store.counts[CROSS_8.name] == 2
    assert store.steps[0][CROSS_8.name].data_ptr() != store.maps[CROSS_8.name].data_ptr()


def test_store_keeps_hybrid_layers_whole_text_first_and_filters_layers():
    store = AttentionStore(num_prompts=2, layers=LayerFilter(kinds=("cross", "hybrid"), max_queries=4))
    assert store.wants(HYBRID_2) and not store.wants(HYBRID_4) and not store.wants(SELF_2)
    probs = _probs(HYBRID_2)
    _run(store, probs, HYBRID_2, step=0)
    stored = store.maps[HYBRID_2.name]
    assert stored.shape == (2, 4, TEXT + 4)  # (prompts, queries, text keys then pixel keys)
    torch.testing.assert_close(stored[..., :TEXT], probs[2:, ..., :TEXT].mean(dim=1), atol=0, rtol=0)
    torch.testing.assert_close(stored[..., TEXT:], probs[2:, ..., TEXT:].mean(dim=1), atol=0, rtol=0)


# --- LocalBlend on hand-made maps --------------------------------------------------------------------------


def _word_maps(prompts, hot):
    """Cross maps at 4×4 that are zero except one pixel per prompt in all of its text columns."""
    probs = torch.zeros(2 * len(prompts), 2, 16, TEXT)
    for p, (y, x) in enumerate(hot):
        probs[len(prompts) + p, :, y * 4 + x, :] = 1.0
    return probs


def test_local_blend_mask_is_pooled_upsampled_and_united_with_the_source():
    site = AttentionSite("input_blocks.1.1.transformer_blocks.0.attn2", "cross", (4, 4), TEXT)
    blend = LocalBlend(
        prompts=CAT, words=[["cat"], ["dog"]], latent_hw=(8, 8), num_steps=2, threshold=0.3, resolution_downsamplings=1
    )  # maps at 4×4, latents at 8×8
    blend.begin_step(0)
    assert blend.wants(site)
    blend(_word_maps(CAT, hot=[(3, 3), (1, 1)]), site)
    latents = torch.randn(2, 4, 8, 8)
    out = blend.blend_latents(0, latents)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[0:6, 0:6] = True  # target: 3×3 around (1, 1) → rows/cols 0–2 → ×2
    expected[4:8, 4:8] = True  # source: 3×3 around (3, 3) → rows/cols 2–3 → ×2
    assert torch.equal(blend.last_mask[1, 0].bool(), expected)
    assert torch.equal(out[1][:, ~expected], latents[0][:, ~expected])
    torch.testing.assert_close(out[1][:, expected], latents[1][:, expected])
    assert torch.equal(out[0], latents[0])


def test_local_blend_with_an_empty_mask_warns_and_leaves_that_target_alone(caplog):
    prompts = ["a cat riding a bicycle", "a dog riding a bicycle", "a cat riding a horse"]
    site = AttentionSite("input_blocks.1.1.transformer_blocks.0.attn2", "cross", (8, 8), TEXT)
    blend = LocalBlend(
        prompts=prompts, words=[[], ["dog"], []], latent_hw=(8, 8), num_steps=2, resolution_downsamplings=0
    )
    blend.begin_step(0)
    blend(_probs(site, num_prompts=3), site)
    latents = torch.randn(3, 4, 8, 8)
    with caplog.at_level(logging.WARNING, logger="p2p.blend"):
        out = blend.blend_latents(0, latents)
    assert "empty mask for prompt(s) [2]" in caplog.text
    torch.testing.assert_close(out[2], latents[2])  # not collapsed onto the source
    assert torch.equal(out[0], latents[0])


def test_local_blend_waits_for_its_start_step():
    site = AttentionSite("input_blocks.1.1.transformer_blocks.0.attn2", "cross", (8, 8), TEXT)
    blend = LocalBlend(
        prompts=CAT, words=[["cat"], ["dog"]], latent_hw=(8, 8), num_steps=4, start_step=2, resolution_downsamplings=0
    )
    latents = torch.randn(2, 4, 8, 8)
    for step in range(2):
        blend.begin_step(step)
        blend(_probs(site, seed=step), site)
        assert blend.blend_latents(step, latents) is latents
    assert blend.last_mask is None
