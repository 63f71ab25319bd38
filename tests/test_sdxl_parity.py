"""SDXL's UNet, text encoders and VAE equal diffusers'/transformers' on random weights (≤ 1e-4 relative).

The weights travel the way a real checkpoint does: our state_dict under the original names → diffusers' own
single-file converters → a strict load (sharing storage: no copy). Configs are written out (no network):
they are `unet/config.json`, `text_encoder*/config.json` of stabilityai/stable-diffusion-xl-base-1.0 for the
`sdxl` preset, and the same architectures at toy widths (`tiny_sdxl_config`) for the fast tests.
Full-size tests are `slow`; the UNet one needs ~11 GB and runs under `flock /tmp/p2p-bigmem.lock`.
"""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from models.conditioner import size_conditioning
from models.loader import original_state_dict
from models.precision import cast_weights_in_forward
from models.stable_diffusion import SDXL_SCALE_FACTOR, ModelConfig, StableDiffusion, preset, tiny_sdxl_config
from models.text import END_TOKEN, START_TOKEN
from models.unet import UNetModel
from models.vae import AutoencoderKL

RELATIVE_TOLERANCE = 1e-4  # max abs difference ÷ the reference output's max abs value, float32 on the CPU

LDM_UNET_PREFIX = "model.diffusion_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."  # diffusers strips this (its key tables say so)
BIGG_PREFIX = "conditioner.embedders.1.model."


def diffusers_unet_config(config: ModelConfig) -> dict:
    """diffusers' UNet2DConditionModel config for an SDXL-layout UNetConfig (SDXL base's unet/config.json when
    `config` is preset('sdxl'): blocks (320, 640, 1280), heads (5, 10, 20), layers per block (1, 2, 10))."""
    u = config.unet
    channels = tuple(u.model_channels * m for m in u.channel_mult)
    attention = [bool(u.depth_at(level)) and 2**level in u.attention_resolutions for level in range(len(channels))]
    return dict(
        sample_size=config.image_size // config.latent_factor,
        in_channels=u.in_channels,
        out_channels=u.out_channels,
        block_out_channels=channels,
        layers_per_block=u.num_res_blocks,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        mid_block_type="UNetMidBlock2DCrossAttn",
        transformer_layers_per_block=tuple(max(1, u.depth_at(level)) for level in range(len(channels))),
        attention_head_dim=tuple(c // u.num_head_channels for c in channels),  # diffusers' misnomer: head counts
        cross_attention_dim=u.context_dim,
        use_linear_projection=u.use_linear_in_transformer,
        upcast_attention=False,
        addition_embed_type="text_time",
        addition_time_embed_dim=config.size_embedding_dim,
        projection_class_embeddings_input_dim=u.adm_in_channels,
        norm_num_groups=32,
        norm_eps=1e-5,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
        mid_block_scale_factor=1,
        center_input_sample=False,
    )


def diffusers_unet_from_ours(unet: UNetModel, config: ModelConfig) -> UNet2DConditionModel:
    diffusers_config = diffusers_unet_config(config)
    checkpoint = {LDM_UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(checkpoint, diffusers_config)
    with torch.device("meta"):
        reference = UNet2DConditionModel(**diffusers_config)
    reference.load_state_dict(converted, strict=True, assign=True)
    return reference.eval()


def _clip_text_config(c, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.width,
        intermediate_size=4 * c.width,
        num_hidden_layers=c.layers,
        num_attention_heads=c.heads,
        max_position_embeddings=c.context_length,
        hidden_act=c.act,
        layer_norm_eps=1e-5,
        bos_token_id=START_TOKEN,
        eos_token_id=END_TOKEN,
        pad_token_id=1,
        **extra,
    )


def transformers_text_encoders_from_ours(model: StableDiffusion) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """SDXL's `text_encoder` (CLIPTextModel) and `text_encoder_2` (CLIPTextModelWithProjection) holding our weights."""
    state = original_state_dict(model)
    clip_l = CLIPTextModel(_clip_text_config(model.config.text, projection_dim=768)).eval()
    converted = convert_ldm_clip_checkpoint({k: v for k, v in state.items() if k.startswith(CLIP_L_PREFIX)})
    # transformers >= 5 dropped the `text_model.` level that the checkpoints still carry
    if not hasattr(clip_l, "text_model"):
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    clip_l.load_state_dict(converted, strict=True)
    c2 = model.config.text_2
    big_g = CLIPTextModelWithProjection(_clip_text_config(c2, projection_dim=c2.projection_dim)).eval()
    converted = convert_open_clip_checkpoint(
        big_g, {k: v for k, v in state.items() if k.startswith(BIGG_PREFIX)}, prefix=BIGG_PREFIX
    )
    if not hasattr(big_g, "text_model"):
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    big_g.load_state_dict(converted, strict=True)
    return clip_l, big_g


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return ((actual - expected).abs().max() / expected.abs().max()).item()


# --- UNet ---------------------------------------------------------------------------------------------------


def run_unet_parity(config: ModelConfig, random_model, *, latent_hw: tuple[int, int]) -> float:
    """Our UNet and diffusers' on the same inputs; one model in memory at a time would need a copy, so the two
    share storage (diffusers' converter only renames SDXL's UNet keys)."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, *latent_hw, generator=generator)
    context = torch.randn(2, 77, config.unet.context_dim, generator=generator)
    pooled = torch.randn(2, config.text_2.projection_dim, generator=generator)
    timesteps = torch.tensor([981, 1])  # both ends of the 50-step DDIM schedule
    height, width = (side * config.latent_factor for side in latent_hw)
    time_ids = torch.tensor(
        [[height, width, 0, 0, height, width], [512, 768, 16, 32, height, width]], dtype=torch.float32
    )
    ours = random_model(lambda: UNetModel(config.unet), seed=1)
    with torch.no_grad():
        y = torch.cat(
            [
                size_conditioning(
                    pooled[i : i + 1],
                    original_size=tuple(ids[:2].int().tolist()),
                    crop=tuple(ids[2:4].int().tolist()),
                    target_size=tuple(ids[4:].int().tolist()),
                    embedding_dim=config.size_embedding_dim,
                )
                for i, ids in enumerate(time_ids)
            ]
        )
        actual = ours(latents, timesteps, context, y=y)
        reference = diffusers_unet_from_ours(ours, config)
        expected = reference(
            latents,
            timesteps,
            encoder_hidden_states=context,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample
    del ours, reference
    gc.collect()
    return relative_difference(actual, expected)


def test_tiny_sdxl_unet_matches_diffusers(random_model):
    # 12×8 latents: not square, and not a power of two (12 → 6 → 3 on the way down)
    difference = run_unet_parity(tiny_sdxl_config(), random_model, latent_hw=(12, 8))
    assert difference <= RELATIVE_TOLERANCE, f"tiny SDXL UNet differs from diffusers' by {difference:.2e} (relative)"


@pytest.mark.slow
def test_sdxl_unet_matches_diffusers(random_model):
    """Full SDXL UNet (2.6 B parameters, ~10.3 GB in fp32) at a 16×24 latent (128×192 px)."""
    difference = run_unet_parity(preset("sdxl"), random_model, latent_hw=(16, 24))
    print(f"SDXL UNet: relative difference {difference:.2e}")
    assert difference <= RELATIVE_TOLERANCE, f"SDXL UNet differs from diffusers' by {difference:.2e} (relative)"


# --- text encoders ---------------------------------------------------------------------------------------------

PROMPTS = [
    "a cat riding a bicycle",
    "A photo of a Squirrel, eating a burger",
    "",
    "two  spaces, café and 3.14 ... the end",
]


def text_model(config: ModelConfig, random_model) -> StableDiffusion:
    """A StableDiffusion whose text encoders have seeded random weights; UNet and VAE stay on the meta device."""
    with torch.device("meta"):
        model = StableDiffusion(dataclasses.replace(config, force_zeros_for_empty_prompt=False))
    model.conditioner = cast_weights_in_forward(
        random_model(lambda: type(model.conditioner)((config.text, config.text_2)), seed=3)
    )
    return model


def run_text_parity(config: ModelConfig, random_model) -> dict[str, float]:
    """diffusers' StableDiffusionXLPipeline.encode_prompt: hidden_states[-2] of both, concatenated; pooled = the
    second encoder's text_embeds. Token ids: ours, each encoder with its own padding (compared separately)."""
    model = text_model(config, random_model)
    clip_l, big_g = transformers_text_encoders_from_ours(model)
    ids_l, ids_g = (encoder.tokenize(PROMPTS) for encoder in model.conditioner.embedders)
    with torch.no_grad():
        ours = model.encode_text(PROMPTS)
        out_l = clip_l(ids_l, output_hidden_states=True)
        out_g = big_g(ids_g, output_hidden_states=True)
    expected_context = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
    return {
        "context": relative_difference(ours.context, expected_context),
        "pooled": relative_difference(ours.pooled, out_g.text_embeds),
    }


def test_text_encoders_match_transformers_at_real_width(random_model):
    """Real widths (768 and 1280, real heads), 3 layers each instead of 12 and 32."""
    sdxl = preset("sdxl")
    config = dataclasses.replace(
        sdxl,
        text=dataclasses.replace(sdxl.text, layers=3, context_layers=2),
        text_2=dataclasses.replace(sdxl.text_2, layers=3, context_layers=2),
    )
    for what, difference in run_text_parity(config, random_model).items():
        assert difference <= RELATIVE_TOLERANCE, f"SDXL text {what} differs by {difference:.2e} (relative)"


@pytest.mark.slow
def test_sdxl_text_encoders_match_transformers(random_model):
    for what, difference in run_text_parity(preset("sdxl"), random_model).items():
        print(f"SDXL text {what}: relative difference {difference:.2e}")
        assert difference <= RELATIVE_TOLERANCE, f"SDXL text {what} differs by {difference:.2e} (relative)"


# --- VAE ----------------------------------------------------------------------------------------------------------


def diffusers_vae_from_ours(vae: AutoencoderKL, config: ModelConfig) -> DiffusersAutoencoderKL:
    """diffusers' AutoencoderKL with SDXL's `scaling_factor` (vae/config.json of SDXL base), our weights converted."""
    c = config.vae
    diffusers_config = dict(
        in_channels=3,
        out_channels=3,
        latent_channels=c.z_channels,
        layers_per_block=c.num_res_blocks,
        block_out_channels=tuple(c.ch * m for m in c.ch_mult),
        down_block_types=("DownEncoderBlock2D",) * len(c.ch_mult),
        up_block_types=("UpDecoderBlock2D",) * len(c.ch_mult),
        act_fn="silu",
        norm_num_groups=32,
        sample_size=config.image_size,
        scaling_factor=config.scale_factor,
        force_upcast=True,
    )
    converted = convert_ldm_vae_checkpoint(
        {"first_stage_model." + k: v for k, v in vae.state_dict().items()}, diffusers_config
    )
    with torch.device("meta"):
        reference = DiffusersAutoencoderKL(**diffusers_config)
    reference.load_state_dict(converted, strict=True, assign=True)
    return reference.eval()


def run_vae_parity(config: ModelConfig, random_model, *, latent_hw: tuple[int, int]) -> dict[str, float]:
    """`decode_latents` (÷ 0.13025) and `encode_images` (× 0.13025) against diffusers' AutoencoderKL with SDXL's
    `scaling_factor`, the way StableDiffusionXLPipeline uses it."""
    with torch.device("meta"):
        model = StableDiffusion(config)
    del model.model, model.conditioner  # only the VAE is allocated (and gives `model.device`)
    model.first_stage_model = cast_weights_in_forward(random_model(lambda: AutoencoderKL(config.vae), seed=2))
    reference = diffusers_vae_from_ours(model.vae, config)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, *latent_hw, generator=generator)
    images = torch.rand(1, 3, *(s * config.latent_factor for s in latent_hw), generator=generator) * 2 - 1
    with torch.no_grad():
        decoded = model.decode_latents(latents)
        expected_decoded = reference.decode(latents / reference.config.scaling_factor).sample.clamp(-1, 1)
        encoded = model.encode_images(images)
        expected_encoded = reference.encode(images).latent_dist.mean * reference.config.scaling_factor
    return {
        "decode": relative_difference(decoded, expected_decoded),
        "encode": relative_difference(encoded, expected_encoded),
    }


def test_sdxl_scale_factor():
    assert preset("sdxl").scale_factor == SDXL_SCALE_FACTOR == 0.13025  # sgm sd_xl_base.yaml, diffusers' vae config
    assert preset("sdxl").vae == preset("sd15").vae  # same architecture, new weights


def test_tiny_sdxl_vae_matches_diffusers(random_model):
    for what, difference in run_vae_parity(tiny_sdxl_config(), random_model, latent_hw=(4, 6)).items():
        assert difference <= RELATIVE_TOLERANCE, f"tiny SDXL VAE {what} differs by {difference:.2e} (relative)"


@pytest.mark.slow
def test_sdxl_vae_matches_diffusers(random_model):
    for what, difference in run_vae_parity(preset("sdxl"), random_model, latent_hw=(8, 12)).items():
        print(f"SDXL VAE {what}: relative difference {difference:.2e}")
        assert difference <= RELATIVE_TOLERANCE, f"SDXL VAE {what} differs by {difference:.2e} (relative)"
