"""The one hook on MM-DiT joint attention: every joint site (FLUX's single-stream blocks included) reaches the
controller, an identity controller changes nothing, and the site says where the text is, read from the shapes.

Tiny SD3.5-medium-like (QK norm, image-only `attn2` in block 0, pre_only last block) and FLUX configs, random weights.
"""

from __future__ import annotations

import pytest
import torch
from test_mmdit_flux import inputs as flux_inputs
from test_mmdit_flux import tiny as tiny_flux
from test_mmdit_sd3 import inputs as sd3_inputs
from test_mmdit_sd3 import random_mmdit
from test_mmdit_sd3 import tiny as tiny_sd3

from models.attention import AttentionSite, JointAttention, attach_controller, attention_modules
from models.flux import Flux


class Recorder:
    """Wants every site, returns the map unchanged, keeps what it saw."""

    def __init__(self):
        self.seen: dict[str, tuple[AttentionSite, torch.Tensor]] = {}

    def wants(self, site: AttentionSite) -> bool:
        return True

    def __call__(self, probs: torch.Tensor, site: AttentionSite) -> torch.Tensor:
        self.seen[site.name] = (site, probs)
        return probs


@pytest.fixture(scope="module")
def sd3(randomize):
    return random_mmdit(tiny_sd3(qk_norm=True, x_self_attn_blocks=(0,)), randomize, seed=4)


@pytest.fixture(scope="module")
def flux(random_model):
    return random_model(lambda: Flux(tiny_flux()), seed=5)


@torch.no_grad()
def run(model, kw, controller=None):
    with attach_controller(model, controller):
        return model(**kw)


def test_sites_are_every_block_by_state_dict_prefix(sd3, flux):
    assert sorted(attention_modules(sd3)) == sorted(
        ["joint_blocks.0", "joint_blocks.1", "joint_blocks.2", "joint_blocks.0.x_block.attn2"]
    )
    assert sorted(attention_modules(flux)) == [
        "double_blocks.0",
        "double_blocks.1",
        "single_blocks.0",
        "single_blocks.1",
    ]
    state = sd3.state_dict()
    assert all(any(k.startswith(name + ".") for k in state) for name in attention_modules(sd3))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_identity_controller_reaches_every_site_and_changes_nothing(family, sd3, flux):
    model, kw = (sd3, sd3_inputs(sd3.config)) if family == "sd3" else (flux, flux_inputs(flux.config))
    plain = run(model, kw)
    recorder = Recorder()
    hooked = run(model, kw, recorder)  # every site takes the explicit float32 softmax path
    assert (hooked - plain).abs().max().item() <= 1e-5
    assert set(recorder.seen) == set(attention_modules(model))
    for _site, probs in recorder.seen.values():
        assert probs.dtype == torch.float32
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)


@pytest.mark.parametrize("num_t5,latent_hw", [(16, (8, 12)), (40, (12, 8))])
def test_sd3_site_tells_where_clip_and_t5_are(sd3, num_t5, latent_hw):
    """The site's text range and CLIP/T5 segments follow the context's length; query_hw follows the latent."""
    clip = sd3.config.clip_text_positions
    kw = sd3_inputs(sd3.config, num_text=clip + num_t5, size=latent_hw)
    recorder = Recorder()
    run(sd3, kw, recorder)
    grid_hw = (latent_hw[0] // 2, latent_hw[1] // 2)
    num_image = grid_hw[0] * grid_hw[1]
    for name, (site, probs) in recorder.seen.items():
        assert site.query_hw == grid_hw
        if name.endswith("attn2"):  # SD3.5-medium's image-only attention: a plain self site
            assert (site.kind, site.num_text_keys, site.num_text_queries) == ("self", 0, 0)
            assert probs.shape == (2, sd3.config.num_heads, num_image, num_image)
            continue
        assert site.kind == "joint"
        assert site.num_text_keys == site.num_text_queries == clip + num_t5
        assert site.text_segments == (("clip", 0, clip), ("t5", clip, clip + num_t5))
        assert site.num_queries == clip + num_t5 + num_image
        assert probs.shape == (2, sd3.config.num_heads, site.num_queries, site.num_queries)


@pytest.mark.parametrize("num_t5,latent_hw", [(11, (8, 12)), (30, (4, 4))])
def test_flux_site_tells_where_t5_is(flux, num_t5, latent_hw):
    kw = flux_inputs(flux.config, num_text=num_t5, latent_hw=latent_hw)
    recorder = Recorder()
    run(flux, kw, recorder)
    grid_hw = (latent_hw[0] // 2, latent_hw[1] // 2)
    for site, probs in recorder.seen.values():
        assert (site.kind, site.query_hw, site.num_text_keys) == ("joint", grid_hw, num_t5)
        assert site.text_segments == (("t5", 0, num_t5),)
        assert probs.shape[-1] == num_t5 + grid_hw[0] * grid_hw[1]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_text_comes_first_in_rows_and_columns(family, sd3, flux):
    """In the first block, text→text logits depend on the text alone: changing the image leaves the text rows'
    ratios over text columns unchanged (softmax ratios = logit differences) and changes the image ones."""
    model, kw, name = (
        (sd3, sd3_inputs(sd3.config), "joint_blocks.0")
        if family == "sd3"
        else (flux, flux_inputs(flux.config), "double_blocks.0")
    )
    first, second = Recorder(), Recorder()
    run(model, kw, first)
    image_key = "x" if family == "sd3" else "img"
    run(model, kw | {image_key: kw[image_key] + 1.0}, second)
    (site, before), (_, after) = first.seen[name], second.seen[name]
    n = site.num_text_keys
    text_logits = lambda probs: probs[:, :, :n, :n].log() - probs[:, :, :n, :1].log()  # noqa: E731
    assert torch.allclose(text_logits(before), text_logits(after), atol=1e-4)
    image_logits = lambda probs: probs[:, :, n:, n:].log() - probs[:, :, n:, n : n + 1].log()  # noqa: E731
    assert not torch.allclose(image_logits(before), image_logits(after), atol=1e-2)


def test_a_site_that_bypasses_the_controller_is_reported(flux):
    """The count check covers the single-stream blocks: one that never meets the controller fails the run."""
    kw = flux_inputs(flux.config)
    core = flux.single_blocks[1].attention

    def bypass(q, k, v, **site_kwargs):  # another attention path that never calls the controller
        controller, core.controller = core.controller, None
        try:
            return JointAttention.forward(core, q, k, v, **site_kwargs)
        finally:
            core.controller = controller

    core.forward = bypass
    try:
        with pytest.raises(RuntimeError, match=r"never reached: \['single_blocks.1'\]"):
            run(flux, kw, Recorder())
    finally:
        del core.forward
