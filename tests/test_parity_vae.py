"""Our KL autoencoder equals diffusers' `AutoencoderKL` at the SD shapes (random weights, CPU).

Weights go through diffusers' single-file converter (`convert_ldm_vae_checkpoint`) and a strict load,
as a real `first_stage_model.*` checkpoint would. SD 1.x and 2.x share this VAE architecture.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from models.stable_diffusion import SD_SCALE_FACTOR, preset
from models.vae import AutoencoderKL

TOLERANCE = 1e-4
LDM_VAE_PREFIX = "first_stage_model."

# vae/config.json of runwayml/stable-diffusion-v1-5 (stabilityai/stable-diffusion-2-1 differs only in sample_size)
DIFFUSERS_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    act_fn="silu",
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=SD_SCALE_FACTOR,
)


def diffusers_vae_from_ours(vae: AutoencoderKL) -> DiffusersAutoencoderKL:
    checkpoint = {LDM_VAE_PREFIX + k: v for k, v in vae.state_dict().items()}
    converted = convert_ldm_vae_checkpoint(checkpoint, DIFFUSERS_VAE_CONFIG)
    with torch.device("meta"):
        reference = DiffusersAutoencoderKL(**DIFFUSERS_VAE_CONFIG)
    reference.load_state_dict(converted, strict=True, assign=True)
    return reference.eval()


def test_sd1_and_sd2_share_the_vae():
    assert preset("sd15").vae == preset("sd21").vae == preset("sd21-base").vae
    assert preset("sd15").scale_factor == preset("sd21").scale_factor == 0.18215  # LDM's SD latent scale


@pytest.mark.slow
def test_vae_matches_diffusers(random_model):
    ours = random_model(lambda: AutoencoderKL(preset("sd15").vae), seed=2)
    reference = diffusers_vae_from_ours(ours)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1  # [-1, 1]
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    with torch.no_grad():
        expected_posterior = reference.encode(images).latent_dist
        posterior = ours.encode(images)
        expected_images = reference.decode(latents).sample
        decoded = ours.decode(latents)
    for what, actual, expected in (
        ("encode mean", posterior.mean, expected_posterior.mean),
        ("encode logvar", posterior.logvar, expected_posterior.logvar),
        ("decode", decoded, expected_images),
    ):
        diff = (actual - expected).abs().max().item()
        print(f"VAE {what}: max abs diff {diff:.2e} (std {expected.std():.2f})")
        assert actual.shape == expected.shape, what
        assert diff <= TOLERANCE, f"VAE {what}: max abs diff {diff:.2e} > {TOLERANCE}"
