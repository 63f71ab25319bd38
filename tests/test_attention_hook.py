"""The one hook (STYLE.md, "The one hook"): what a controller sees, and that an idle hook changes nothing.

Runs on the tiny model's UNet (cross-attention at 8×8, Imagen hybrid attention at 4×4 and 2×2), random weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnAddedKVProcessor
from einops import rearrange

from models.attention import AttentionSite, CrossAttention, HybridAttention, attach_controller, attention_modules
from models.stable_diffusion import preset
from models.unet import UNetModel

TEXT_TOKENS = 77


class Recorder:
    """Wants every site (or none), returns the map unchanged, and keeps what it saw."""

    def __init__(self, *, wants: bool = True):
        self.wanted = wants
        self.seen: dict[str, tuple[AttentionSite, torch.Tensor]] = {}

    def wants(self, site: AttentionSite) -> bool:
        return self.wanted

    def __call__(self, probs: torch.Tensor, site: AttentionSite) -> torch.Tensor:
        self.seen[site.name] = (site, probs)
        return probs


@pytest.fixture(scope="module")
def unet(random_model) -> UNetModel:
    return random_model(lambda: UNetModel(preset("tiny").unet), seed=6)


@pytest.fixture(scope="module")
def unet_inputs(unet):
    generator = torch.Generator().manual_seed(0)
    return (
        torch.randn(2, 4, 8, 8, generator=generator),
        torch.tensor([981, 1]),
        torch.randn(2, TEXT_TOKENS, unet.config.context_dim, generator=generator),
    )


@torch.no_grad()
def run(unet, inputs, controller=None) -> torch.Tensor:
    with attach_controller(unet, controller):
        return unet(*inputs)


def test_identity_controller_changes_nothing(unet, unet_inputs):
    plain = run(unet, unet_inputs)
    recorder = Recorder()
    hooked = run(unet, unet_inputs, recorder)  # every site takes the explicit softmax path
    assert (hooked - plain).abs().max().item() <= 1e-5
    assert set(recorder.seen) == set(attention_modules(unet))  # each site by its state_dict prefix
    for name, (site, probs) in recorder.seen.items():
        assert f"{name}.to_q.weight" in unet.state_dict()
        assert probs.dtype == torch.float32 and probs.shape[:3] == (2, unet.get_submodule(name).heads, site.num_queries)
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)  # rows are distributions over keys


def test_controller_that_wants_nothing_changes_nothing(unet, unet_inputs):
    recorder = Recorder(wants=False)
    assert torch.equal(run(unet, unet_inputs, recorder), run(unet, unet_inputs))
    assert not recorder.seen


def test_sites_describe_their_maps(unet, unet_inputs):
    recorder = Recorder()
    run(unet, unet_inputs, recorder)
    kinds = {site.kind for site, _ in recorder.seen.values()}
    assert kinds == {"self", "cross", "hybrid"}
    for site, probs in recorder.seen.values():
        keys = probs.shape[-1]
        assert probs.shape[2] == site.query_hw[0] * site.query_hw[1]
        expected_text = {"self": 0, "cross": TEXT_TOKENS, "hybrid": TEXT_TOKENS}[site.kind]
        assert site.num_text_keys == expected_text, site
        assert (
            keys
            == {"self": site.num_queries, "cross": TEXT_TOKENS, "hybrid": TEXT_TOKENS + site.num_queries}[site.kind]
        ), site


def test_attach_refuses_a_second_controller(unet):
    with attach_controller(unet, Recorder()):
        with pytest.raises(RuntimeError, match="already attached"):
            with attach_controller(unet, Recorder()):
                pass
    assert all(m.controller is None for m in attention_modules(unet).values())  # detached on exit


def test_attach_reports_a_layer_the_controller_never_reached(unet, unet_inputs, monkeypatch):
    """A layer that computes attention some other way would make an edit silently incomplete."""
    name = "middle_block.1.transformer_blocks.0.attn1"
    bypassing = unet.get_submodule(name)

    def fused_only(q, k, v, *, query_hw, num_text_keys):  # another attention implementation, no hook
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=bypassing.heads) for t in (q, k, v))
        return bypassing.to_out(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))

    monkeypatch.setattr(bypassing, "attend", fused_only)
    with pytest.raises(RuntimeError, match=rf"reached 12 of 13 attention layers.*{name}"):
        run(unet, unet_inputs, Recorder())


# --- hybrid attention on its own ---------------------------------------------------------------

DIM, CONTEXT_DIM, HEADS, DIM_HEAD, HW = 64, 48, 4, 16, (4, 6)


@pytest.fixture
def hybrid(random_model) -> HybridAttention:
    return random_model(
        lambda: HybridAttention(query_dim=DIM, context_dim=CONTEXT_DIM, heads=HEADS, dim_head=DIM_HEAD), seed=7
    )


def tokens(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


@torch.no_grad()
def test_hybrid_without_text_is_self_attention(hybrid):
    self_attention = CrossAttention(query_dim=DIM, heads=HEADS, dim_head=DIM_HEAD).eval()
    self_attention.load_state_dict({k: v for k, v in hybrid.state_dict().items() if not k.startswith("add_")})
    x = tokens(2, HW[0] * HW[1], DIM)
    no_text = torch.zeros(2, 0, CONTEXT_DIM)
    assert torch.allclose(hybrid(x, no_text, query_hw=HW), self_attention(x, query_hw=HW), atol=1e-6)


@torch.no_grad()
def test_hybrid_map_has_text_columns_first(hybrid):
    x, context = tokens(2, HW[0] * HW[1], DIM), tokens(2, 5, CONTEXT_DIM)
    recorder = Recorder()
    hybrid.controller = recorder  # one module, no UNet: attach by hand
    try:
        hybrid(x, context, query_hw=HW)
    finally:
        hybrid.controller = None
    ((site, probs),) = recorder.seen.values()
    assert site.kind == "hybrid" and site.num_text_keys == 5 and site.query_hw == HW
    split = lambda t: rearrange(t, "b n (h d) -> b h n d", h=HEADS)
    q, keys = split(hybrid.to_q(x)), split(torch.cat([hybrid.add_k_proj(context), hybrid.to_k(x)], dim=1))
    expected = (q @ keys.transpose(-1, -2) * DIM_HEAD**-0.5).softmax(-1)  # [text | pixels]
    assert torch.allclose(probs, expected, atol=1e-6)


@torch.no_grad()
def test_hybrid_matches_diffusers_added_kv_attention(hybrid, randomize):
    """diffusers' `AttnAddedKVProcessor` (unCLIP/Kandinsky) is the same layer wrapped in a GroupNorm and a residual."""
    reference = Attention(
        query_dim=DIM,
        heads=HEADS,
        dim_head=DIM_HEAD,
        added_kv_proj_dim=CONTEXT_DIM,
        added_proj_bias=False,
        norm_num_groups=32,
        bias=False,
        out_bias=True,
        processor=AttnAddedKVProcessor(),
    ).eval()
    randomize(reference, seed=8)
    hybrid.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.startswith("group_norm.")})
    image, context = tokens(2, DIM, *HW), tokens(2, 5, CONTEXT_DIM)
    expected = reference(image, encoder_hidden_states=context)
    normed = rearrange(reference.group_norm(image), "b c h w -> b (h w) c")
    ours = image + rearrange(hybrid(normed, context, query_hw=HW), "b (h w) c -> b c h w", h=HW[0])
    assert (ours - expected).abs().max().item() <= 1e-5
