"""Our UNet equals diffusers' `UNet2DConditionModel` at full SD 1.5 and SD 2.1 shapes (random weights, CPU).

The weights travel the way a real checkpoint does: our state_dict under `model.diffusion_model.` →
diffusers' own single-file converter (`convert_ldm_unet_checkpoint`) → a strict load. So the test proves
both that our module paths are the checkpoint's names and that the computation behind them is SD's.
"""

from __future__ import annotations

import gc

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from models.stable_diffusion import preset
from models.unet import UNetModel

TOLERANCE = 1e-4  # max abs difference of the UNet output (float32 on the CPU)
LDM_UNET_PREFIX = "model.diffusion_model."

# diffusers' configs of the public models (unet/config.json of runwayml/stable-diffusion-v1-5 and
# stabilityai/stable-diffusion-2-1), written out because there is no network here.
_COMMON = dict(
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    mid_block_scale_factor=1,
    center_input_sample=False,
)
DIFFUSERS_UNET_CONFIGS = {
    # diffusers' `attention_head_dim` is, for these models, the number of heads (a known misnomer)
    "sd15": dict(
        _COMMON,
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        use_linear_projection=False,
        upcast_attention=False,
    ),
    "sd21": dict(
        _COMMON,
        sample_size=96,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        upcast_attention=True,
    ),
}


def diffusers_unet_from_ours(unet: UNetModel, name: str) -> UNet2DConditionModel:
    """Convert our weights with diffusers' converter and load them strictly (sharing storage: no copy)."""
    config = DIFFUSERS_UNET_CONFIGS[name]
    checkpoint = {LDM_UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    with torch.device("meta"):
        reference = UNet2DConditionModel(**config)
    reference.load_state_dict(converted, strict=True, assign=True)
    return reference.eval()


# One latent size per model keeps the suite within minutes on 2 cores (a full-size forward takes ~5-10 s):
# 16×16, and 12×20 whose sides are not multiples of 8, so the up path must follow the skips' sizes
# (12 → 6 → 3 → 2 on the way down) exactly as diffusers' `forward_upsample_size` does.
@pytest.mark.slow
@pytest.mark.parametrize("name, latent_hw", [("sd15", (16, 16)), ("sd21", (12, 20))])
def test_unet_matches_diffusers(name, latent_hw, random_model):
    config = preset(name)
    ours = random_model(lambda: UNetModel(config.unet), seed=1)
    reference = diffusers_unet_from_ours(ours, name)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, *latent_hw, generator=generator)
    context = torch.randn(2, 77, config.unet.context_dim, generator=generator)
    timesteps = torch.tensor([981, 1])  # both ends of the 50-step DDIM schedule, one per batch item
    with torch.no_grad():
        expected = reference(latents, timesteps, encoder_hidden_states=context).sample
        actual = ours(latents, timesteps, context)
    diff = (actual - expected).abs().max().item()
    print(f"{name} UNet {tuple(latents.shape)}: max abs diff {diff:.2e} (output std {expected.std():.2f})")
    assert actual.shape == expected.shape
    assert diff <= TOLERANCE, f"{name} UNet at latent {latent_hw}: max abs diff {diff:.2e} > {TOLERANCE}"
    del ours, reference
    gc.collect()
