"""Our FLUX.1 has BFL's checkpoint names and equals diffusers' `FluxTransformer2DModel` (random weights, CPU, fp32).

Weights move through diffusers' `convert_flux_transformer_checkpoint_to_diffusers`. That converter hard-codes
FLUX's real width (3072) for the single blocks' fused `linear1`, so the tiny test converts those few tensors
itself (same split, at the tiny width) and the real-width test uses the converter for everything.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from test_mmdit_sd3 import read_keys, relative_error

from models.flux import PRESETS, Flux, FluxConfig, SingleStreamBlock, image_ids, pack, unpack

TOLERANCE = 1e-4
KEYS_DIR = Path(__file__).parent / "data" / "sd-keys"
REAL_WIDTH = 3072


def diffusers_config(c: FluxConfig) -> dict:
    return dict(
        patch_size=1,
        in_channels=c.in_channels,
        num_layers=c.depth,
        num_single_layers=c.depth_single_blocks,
        attention_head_dim=c.head_dim,
        num_attention_heads=c.num_heads,
        joint_attention_dim=c.context_in_dim,
        pooled_projection_dim=c.vec_in_dim,
        guidance_embeds=c.guidance_embed,
        axes_dims_rope=c.axes_dim,
    )


def convert_single_blocks(checkpoint: dict, c: FluxConfig) -> dict:
    """The converter's single-block mapping at any width: linear1 = q | k | v | mlp-in, linear2 = proj_out."""
    converted = {}
    for i in range(c.depth_single_blocks):
        src, dst = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        sizes = [c.hidden_size] * 3 + [int(c.hidden_size * c.mlp_ratio)]
        for kind in ("weight", "bias"):
            for name, part in zip(
                ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), checkpoint.pop(f"{src}linear1.{kind}").split(sizes)
            ):
                converted[f"{dst}{name}.{kind}"] = part
            converted[f"{dst}proj_out.{kind}"] = checkpoint.pop(f"{src}linear2.{kind}")
            converted[f"{dst}norm.linear.{kind}"] = checkpoint.pop(f"{src}modulation.lin.{kind}")
        converted[f"{dst}attn.norm_q.weight"] = checkpoint.pop(f"{src}norm.query_norm.scale")
        converted[f"{dst}attn.norm_k.weight"] = checkpoint.pop(f"{src}norm.key_norm.scale")
    return converted


def reference_from_ours(model: Flux) -> FluxTransformer2DModel:
    checkpoint = dict(model.state_dict())
    c = model.config
    if c.hidden_size == REAL_WIDTH:
        converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    else:  # ours for the single blocks; the converter needs one, so it gets a real-width stand-in on "meta"
        singles = convert_single_blocks(checkpoint, c)
        with torch.device("meta"):
            checkpoint |= {f"single_blocks.0.{k}": v for k, v in SingleStreamBlock(FluxConfig()).state_dict().items()}
        converted = {
            k: v
            for k, v in convert_flux_transformer_checkpoint_to_diffusers(checkpoint).items()
            if not k.startswith("single_transformer_blocks.")
        } | singles
    assert not checkpoint, f"converter left keys over: {sorted(checkpoint)[:4]}"
    with torch.device("meta"):
        reference = FluxTransformer2DModel(**diffusers_config(c))
    reference.load_state_dict(converted, strict=True, assign=True)
    return reference.eval()


def random_flux(config: FluxConfig, random_model, *, seed=0) -> Flux:
    return random_model(lambda: Flux(config), seed=seed)


def tiny(**changes) -> FluxConfig:
    fields = dict(
        vec_in_dim=24,
        context_in_dim=40,
        hidden_size=64,
        num_heads=2,
        depth=2,
        depth_single_blocks=2,
        axes_dim=(8, 12, 12),
    )
    return FluxConfig(**(fields | changes))


def inputs(c: FluxConfig, *, batch=2, latent_hw=(8, 12), num_text=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, c.in_channels // 4, *latent_hw, generator=g)
    grid_hw = (latent_hw[0] // 2, latent_hw[1] // 2)
    return dict(
        img=pack(latents),
        img_ids=image_ids(batch, grid_hw),
        txt=torch.randn(batch, num_text, c.context_in_dim, generator=g),
        txt_ids=torch.zeros(batch, num_text, 3),
        timesteps=torch.tensor([1.0, 0.37])[:batch],
        y=torch.randn(batch, c.vec_in_dim, generator=g),
        guidance=torch.full((batch,), 3.5) if c.guidance_embed else None,
    )


def reference_output(reference, kw):
    with torch.no_grad():
        return reference(
            hidden_states=kw["img"],
            encoder_hidden_states=kw["txt"],
            pooled_projections=kw["y"],
            timestep=kw["timesteps"],
            img_ids=kw["img_ids"][0],
            txt_ids=kw["txt_ids"][0],
            guidance=kw["guidance"],
            return_dict=False,
        )[0]


@pytest.mark.parametrize(
    "preset,key_file", [("flux-dev", "keys_flux_dev.txt"), ("flux-schnell", "keys_flux_schnell.txt")]
)
def test_state_dict_equals_the_checkpoint_key_list(preset, key_file):
    with torch.device("meta"):
        model = Flux(PRESETS[preset]())
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == read_keys(KEYS_DIR / key_file)


def test_pack_and_ids_equal_the_flux_pipeline():
    """The 2×2 packing and the (0, row, col) ids are FluxPipeline's, so its seeds' noise carries over."""
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 8, 12)
    assert torch.equal(pack(latents), FluxPipeline._pack_latents(latents, 2, 16, 8, 12))
    assert torch.equal(unpack(pack(latents), (4, 6)), FluxPipeline._unpack_latents(pack(latents), 64, 96, 8))
    assert torch.equal(image_ids(2, (4, 6))[0], FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32))


def test_pack_is_invertible_and_ids_are_row_col():
    latents = torch.randn(1, 16, 4, 6)
    assert pack(latents).shape == (1, 6, 64)
    assert torch.equal(unpack(pack(latents), (2, 3)), latents)
    assert image_ids(1, (2, 3))[0].tolist() == [[0, r, c] for r in range(2) for c in range(3)]


@pytest.mark.parametrize("guidance_embed", [True, False], ids=["dev", "schnell"])
def test_tiny_matches_diffusers(guidance_embed, random_model):
    config = tiny(guidance_embed=guidance_embed)
    ours = random_flux(config, random_model, seed=1)
    reference = reference_from_ours(ours)
    kw = inputs(config)
    expected = reference_output(reference, kw)
    with torch.no_grad():
        actual = ours(**kw)
    assert relative_error(actual, expected) <= TOLERANCE


def run_real_width(preset: str, random_model, tmp_path) -> float:
    """2 double + 2 single blocks at the real width; reference first (output saved), freed, then ours."""
    config = PRESETS[preset]()
    config.depth, config.depth_single_blocks = 2, 2
    kw = inputs(config, latent_hw=(16, 16), num_text=24)
    reference = reference_from_ours(random_flux(config, random_model, seed=3))  # shares our tensors
    gc.collect()
    torch.save(reference_output(reference, kw), tmp_path / "expected.pt")
    del reference
    gc.collect()
    ours = random_flux(config, random_model, seed=3)
    with torch.no_grad():
        actual = ours(**kw)
    return relative_error(actual, torch.load(tmp_path / "expected.pt"))


@pytest.mark.slow
def test_flux_dev_real_width_matches_diffusers(random_model, tmp_path):
    assert run_real_width("flux-dev", random_model, tmp_path) <= TOLERANCE


@pytest.mark.slow
def test_flux_schnell_real_width_matches_diffusers(random_model, tmp_path):
    assert run_real_width("flux-schnell", random_model, tmp_path) <= TOLERANCE
