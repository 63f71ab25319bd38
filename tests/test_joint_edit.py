"""Prompt-to-Prompt on joint attention (p2p/joint*.py) on tiny random SD3, SD3.5 and FLUX models: the identities of
issue 33 (a word replaced by itself changes nothing; zero windows equal plain same-seed sampling of the target; the
source inside an edit batch equals the source alone), every joint site reached and edited (FLUX's single-stream
blocks included), rows that sum to one under `logits` / `rescale`, and slices of query rows equal to whole maps."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from joint_models import FAMILIES, HEIGHT, STEPS, WIDTH, tiny_model
from test_mmdit_t5 import spiece_model  # noqa: F401 (fixture)

from models.attention import AttentionSite, JointRequest
from models.flow_model import FlowConditioning
from p2p.controllers import Compose
from p2p.edit import BlendSpec, EditSpec, StoreSpec
from p2p.flow import FlowSamplerSettings, conditioning, initial_noise, sample
from p2p.joint import RENORM_MODES, JointEdit, model_blocks, select_blocks
from p2p.joint_edit import JointSpec, build_flow_controllers, edit_flow, source_pooled

SOURCE, TARGET = "a red cat riding a bicycle", "a red dog riding a bicycle"
ATOL = 2e-5  # float32 noise between batch compositions of the same computation


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, randomize, spiece_model):  # noqa: F811
    return tiny_model(request.param, randomize, spiece_model)


def settings(model) -> FlowSamplerSettings:
    return FlowSamplerSettings(steps=STEPS, guidance=model.config.guidance)


def latents(model, prompts, *, spec=None, joint=None, blend=None, store=None):
    result = edit_flow(
        model,
        prompts,
        seed=3,
        spec=spec,
        joint=joint,
        blend=blend,
        store=store,
        settings=settings(model),
        height=HEIGHT,
        width=WIDTH,
        progress=False,
    )
    return result


def everything(renorm: str, **changes) -> JointSpec:
    """Every option on, slices smaller than the text: the strictest setting for an identity."""
    return dataclasses.replace(JointSpec(renorm=renorm, text_rows=True, pooled=True, query_chunk=5), **changes)


@pytest.mark.parametrize("renorm", RENORM_MODES)
def test_a_word_replaced_by_itself_changes_nothing(model, renorm):
    spec = EditSpec(kind="replace", cross_replace_steps=1.0, self_replace_steps=1.0)
    out = latents(model, [SOURCE, SOURCE], spec=spec, joint=everything(renorm)).latents
    assert (out[1] - out[0]).abs().max().item() <= ATOL


@pytest.mark.parametrize("kind", ["replace", "refine"])
def test_zero_windows_equal_plain_sampling_of_the_target(model, kind):
    spec = EditSpec(kind=kind, cross_replace_steps=0.0, self_replace_steps=0.0)
    edited = latents(model, [SOURCE, TARGET], spec=spec, joint=everything("logits")).latents
    alone = latents(model, [TARGET]).latents
    assert (edited[1] - alone[0]).abs().max().item() <= ATOL
    plain = latents(model, [SOURCE, TARGET]).latents
    assert (edited - plain).abs().max().item() <= ATOL


@pytest.mark.parametrize("renorm", RENORM_MODES)
def test_the_source_in_an_edit_batch_equals_the_source_alone_and_the_target_changes(model, renorm):
    spec = EditSpec(kind="replace", cross_replace_steps=0.8, self_replace_steps=0.4)
    edited = latents(model, [SOURCE, TARGET], spec=spec, joint=everything(renorm)).latents
    alone = latents(model, [SOURCE]).latents
    assert (edited[0] - alone[0]).abs().max().item() <= ATOL
    plain_target = latents(model, [TARGET]).latents[0]
    assert (edited[1] - plain_target).abs().max().item() > 1e-3  # the injection did something


class Spy:
    """Wants every site the editor wants; records which blocks it was called at, and the slices it got."""

    def __init__(self, editor):
        self.editor, self.num_prompts, self.calls = editor, editor.num_prompts, []

    def begin_step(self, step):
        pass

    def wants(self, site):
        return self.editor.wants(site)

    def __call__(self, probs, site):
        self.calls.append((site.name, site.rows, probs.shape[0]))
        return probs


@pytest.mark.parametrize("blocks", ["all", "double", "single", [0, -1]])
def test_the_editor_reaches_the_chosen_blocks_single_stream_included(model, blocks):
    names = model_blocks(model.config)
    if blocks == "single" and model.config.family == "sd3":
        with pytest.raises(Exception, match="no such blocks"):
            select_blocks(model.config, blocks)
        return
    spec = EditSpec(kind="replace", cross_replace_steps=1.0, self_replace_steps=1.0)
    _, _, editor, _ = build_flow_controllers(
        model,
        [SOURCE, TARGET],
        spec=spec,
        blend=None,
        store=None,
        joint=JointSpec(blocks=blocks, query_chunk=4),
        num_steps=STEPS,
        latent_hw=(HEIGHT // 8, WIDTH // 8),
    )
    spy = Spy(editor)
    controller = Compose([spy, editor])
    cond, uncond = conditioning(model, [SOURCE, TARGET], negative_prompt="", guidance=model.config.guidance)
    latent = initial_noise(model, 3, height=HEIGHT, width=WIDTH)
    sample(model, cond, uncond=uncond, latent=latent, settings=settings(model), controller=controller, progress=False)
    reached = {".".join(name.split(".")[:2]) for name, _, _ in spy.calls}
    assert reached == select_blocks(model.config, blocks) and reached <= set(names)
    if blocks == "all" and model.config.family == "flux":
        assert any(n.startswith("single_blocks") for n in reached)
    if model.config.family == "sd35" and blocks == "all":  # the image-only attn2 of block 0 is injected too
        assert any(name.endswith("attn2") for name, _, _ in spy.calls)
    assert all(stop - start <= 4 for _, (start, stop), _ in spy.calls)  # maps came in slices, never whole
    assert {batch for _, _, batch in spy.calls} == {2}  # SD3's unconditional half took the fused path


def random_site(num_text=5, hw=(2, 3), rows=None) -> AttentionSite:
    segments = (("clip", 0, 2), ("t5", 2, num_text))
    site = AttentionSite("joint_blocks.0", "joint", hw, num_text, num_text_queries=num_text, text_segments=segments)
    return dataclasses.replace(site, query_rows=rows or (0, site.num_queries))


def random_editor(renorm, *, text_rows=True, reweight=None) -> JointEdit:
    generator = torch.Generator().manual_seed(0)
    mapper = torch.rand(1, 5, 5, generator=generator)
    mapper = mapper / mapper.sum(dim=2, keepdim=True)  # each source token spreads its weight
    editor = JointEdit(
        num_prompts=2,
        kind="replace",
        cross_alphas=torch.ones(1, 1, 5),
        self_steps=range(1),
        cross_blocks=frozenset({"joint_blocks.0"}),
        self_blocks=frozenset({"joint_blocks.0"}),
        renorm=renorm,
        mapper=mapper,
        reweight=reweight,
        text_rows=text_rows,
    )
    editor.begin_step(0)
    return editor


@pytest.mark.parametrize("renorm", ["logits", "rescale"])
@pytest.mark.parametrize("reweight", [None, torch.tensor([[1.0, 3.0, 1.0, 0.5, 1.0]])])
def test_logits_and_rescale_keep_rows_summing_to_one(renorm, reweight):
    site = random_site()
    scores = torch.randn(4, 2, site.num_queries, site.num_queries, generator=torch.Generator().manual_seed(1)) * 3
    maps = scores if renorm == "logits" else scores.softmax(-1)
    out = random_editor(renorm, reweight=reweight)(maps, site)
    assert torch.allclose(out.sum(-1), torch.ones(()), atol=1e-5)
    assert (out[3] - scores[3].softmax(-1)).abs().max() > 1e-2  # the target was edited


def test_probs_copies_the_edited_columns_as_they_are():
    site = random_site()
    probs = torch.randn(4, 2, site.num_queries, site.num_queries).softmax(-1)
    editor = random_editor("probs", text_rows=False)
    out = editor(probs, site)
    expected_text = torch.einsum("hqi,ij->hqj", probs[2, :, 5:, :5], editor.mapper[0])
    assert torch.allclose(out[3, :, 5:, :5], expected_text, atol=1e-6)
    assert torch.equal(out[3, :, 5:, 5:], probs[2, :, 5:, 5:])  # self window: the source's image columns
    assert torch.equal(out[:3], probs[:3])  # unconditional half and source untouched


@pytest.mark.parametrize("renorm", RENORM_MODES)
def test_slices_of_query_rows_equal_the_whole_map(renorm):
    site = random_site()
    scores = torch.randn(4, 2, site.num_queries, site.num_queries)
    maps = scores if renorm == "logits" else scores.softmax(-1)
    whole = random_editor(renorm)(maps, site)
    editor = random_editor(renorm)
    chunk = editor.joint_request(site).query_chunk
    assert isinstance(editor.joint_request(site), JointRequest) and chunk >= site.num_text_queries
    for start, stop in [(0, 6), (6, 8), (8, 11)]:  # the text rows (5) come whole in the first slice
        part = editor(maps[:, :, start:stop], random_site(rows=(start, stop)))
        assert torch.allclose(part, whole[:, :, start:stop], atol=1e-6)


def test_sliced_runs_equal_whole_map_runs_with_store_and_blend(model):
    spec = EditSpec(kind="replace", cross_replace_steps=0.8, self_replace_steps=0.4)
    blend = BlendSpec(words=[["cat"], ["dog"]], threshold=0.3)
    runs = [
        latents(model, [SOURCE, TARGET], spec=spec, joint=JointSpec(query_chunk=chunk), blend=blend, store=StoreSpec())
        for chunk in (0, 4)
    ]
    assert (runs[0].latents - runs[1].latents).abs().max().item() <= ATOL
    assert runs[0].store.maps.keys() == runs[1].store.maps.keys() and runs[0].store.maps
    for name, whole in runs[0].store.maps.items():
        assert torch.allclose(whole, runs[1].store.maps[name], atol=1e-6)
    assert torch.equal(runs[0].blend.last_mask, runs[1].blend.last_mask)


def test_stored_maps_are_image_rows_by_text_columns_head_averaged(model):
    spec = EditSpec(kind="replace", cross_replace_steps=0.8, self_replace_steps=0.4)
    store = latents(model, [SOURCE, TARGET], spec=spec, store=StoreSpec()).store
    num_text = model.text_segments()[-1][2]
    for name, maps in store.maps.items():
        assert maps.shape == (2, (HEIGHT // 16) * (WIDTH // 16), num_text)
        assert (maps.sum(-1) / store.counts[name] < 1 + 1e-5).all()  # the text share of each image row


def test_source_pooled_vector_reaches_the_targets_only_in_their_cross_window():
    editor = random_editor("rescale")
    editor.cross_alphas = torch.tensor([[[1.0] * 5], [[0.0] * 5]])  # step 0 inside, step 1 outside
    cond = FlowConditioning(torch.zeros(2, 5, 4), torch.tensor([[1.0, 2.0], [3.0, 4.0]]), (("t5", 0, 5),))
    callback = source_pooled(editor)
    assert torch.equal(callback(0, cond).pooled, torch.tensor([[1.0, 2.0], [1.0, 2.0]]))
    assert callback(1, cond) is cond


@pytest.mark.parametrize("option", ["text_rows", "pooled"])
def test_text_stream_options_change_the_edit(model, option):
    spec = EditSpec(kind="replace", cross_replace_steps=0.8, self_replace_steps=0.4)
    off = latents(model, [SOURCE, TARGET], spec=spec, joint=JointSpec()).latents
    on = latents(model, [SOURCE, TARGET], spec=spec, joint=JointSpec(**{option: True})).latents
    assert (on[0] - off[0]).abs().max().item() <= ATOL  # the source never changes
    assert (on[1] - off[1]).abs().max().item() > 3 * ATOL  # small on FLUX: 6 image tokens beside 24 text


def test_reweight_alone_fades_a_word_in_both_segments(model):
    prompts = [SOURCE, SOURCE]
    neutral = latents(model, prompts, spec=EditSpec(kind="reweight", reweight={"cat": 1.0})).latents
    assert (neutral[1] - neutral[0]).abs().max().item() <= ATOL
    faded = latents(model, prompts, spec=EditSpec(kind="reweight", reweight={"cat": 4.0})).latents
    assert (faded[1] - faded[0]).abs().max().item() > 1e-4


def permutation_editor(renorm: str, *, self_steps=range(0)) -> JointEdit:
    mapper = torch.eye(5)[[1, 0, 2, 4, 3]][None]  # source token i → target token mapper[i]: a word-order swap
    editor = JointEdit(
        num_prompts=2,
        kind="replace",
        cross_alphas=torch.ones(1, 1, 5),
        self_steps=self_steps,
        cross_blocks=frozenset({"joint_blocks.0"}),
        self_blocks=frozenset({"joint_blocks.0"}),
        renorm=renorm,
        mapper=mapper,
    )
    editor.begin_step(0)
    return editor


def test_each_renormalisation_does_what_its_name_says():
    """Image rows of the target, cross window only: text columns from the source through the mapper, then
    probs: as they are; logits: softmax([source text logits | target image logits]); rescale: the copied text
    columns exactly, the target's image columns scaled to fill the row."""
    site = random_site()
    scores = torch.randn(4, 2, site.num_queries, site.num_queries, generator=torch.Generator().manual_seed(2)) * 2
    probs = scores.softmax(-1)
    order = [1, 0, 2, 4, 3]  # target column j reads source column order[j] (the permutation is its own inverse)
    src_text, tgt_image = probs[2, :, 5:, :5][..., order], probs[3, :, 5:, 5:]
    out = permutation_editor("probs")(probs, site)[3, :, 5:]
    assert torch.allclose(out, torch.cat([src_text, tgt_image], -1), atol=1e-6)
    out = permutation_editor("logits")(scores, site)[3, :, 5:]
    expected = torch.cat([scores[2, :, 5:, :5][..., order], scores[3, :, 5:, 5:]], -1).softmax(-1)
    assert torch.allclose(out, expected, atol=1e-6)
    out = permutation_editor("rescale")(probs, site)[3, :, 5:]
    assert torch.allclose(out[..., :5], src_text, atol=1e-6)
    ratio = out[..., 5:] / tgt_image  # one factor per row: the image columns keep their proportions
    assert torch.allclose(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-4)
    assert torch.allclose(out.sum(-1), torch.ones(()), atol=1e-5)


def test_local_blend_keeps_the_source_outside_its_mask(model):
    """x_tgt ← x_src + mask·(x_tgt − x_src) after every step: outside the last mask the latents are the source's."""
    spec = EditSpec(kind="replace", cross_replace_steps=0.8, self_replace_steps=0.4)
    blend = BlendSpec(words=[["cat"], ["dog"]], threshold=0.97, dilation=0, restore_pixels=True)
    result = latents(model, [SOURCE, TARGET], spec=spec, blend=blend)
    outside = ~result.blend.last_mask[1, 0].bool()
    assert torch.equal(result.latents[1][:, outside], result.latents[0][:, outside])


def test_joint_blend_puts_each_image_row_on_its_patch(spiece_model):  # noqa: F811
    """Synthetic maps where "dog" draws one patch: the mask is that patch, upsampled to the latent, whatever the
    slices the rows came in."""
    from joint_models import words_only_model

    from p2p.joint_maps import JointBlend
    from p2p.joint_tokens import JointWords

    words = JointWords(words_only_model("sd3", spiece_model))
    n_text, grid = words.length, (3, 2)
    blend = JointBlend(
        blocks=frozenset({"joint_blocks.0"}),
        prompts=[SOURCE, TARGET],
        words=[["cat"], ["dog"]],
        latent_hw=(6, 4),
        num_steps=1,
        threshold=0.5,
        dilation=0,
        context_length=n_text,
        lookup=words,
    )
    site = AttentionSite("joint_blocks.0", "joint", grid, n_text, num_text_queries=n_text)
    assert blend.wants(site)
    probs = torch.full((4, 2, site.num_queries, site.num_queries), 1e-3)
    dog = words.positions(TARGET, "dog")
    cat = words.positions(SOURCE, "cat")
    probs[3, :, n_text + 4, dog] = 1.0  # the target's image row 4 = patch (2, 0) attends to "dog"
    probs[2, :, n_text + 1, cat] = 1.0  # the source's image row 1 = patch (0, 1) attends to "cat"
    for start, stop in [(0, n_text + 2), (n_text + 2, n_text + 5), (n_text + 5, site.num_queries)]:
        blend(probs[:, :, start:stop], dataclasses.replace(site, query_rows=(start, stop)))
    expected = torch.zeros(6, 4)
    expected[4:6, 0:2] = 1  # patch (2, 0) in latent pixels
    expected[0:2, 2:4] = 1  # the source's patch (0, 1): the mask is their union
    assert torch.equal(blend.mask()[1, 0], expected)
