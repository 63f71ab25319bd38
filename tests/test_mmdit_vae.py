"""The 16-channel VAE of SD3 / SD3.5 / FLUX.1: the checkpoints' names, and equal to diffusers' `AutoencoderKL`
(latent_channels=16, no quant convs) through `convert_ldm_vae_checkpoint` and a strict load (random weights, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from test_mmdit_sd3 import read_keys, relative_error

from models.vae import FLUX_LATENT_SCALING, SD3_LATENT_SCALING, AutoencoderKL, VAEConfig, flow_vae

TOLERANCE = 1e-4
KEYS_DIR = Path(__file__).parent / "data" / "sd-keys"
SD3_VAE_PREFIX = "first_stage_model."


def diffusers_config(c: VAEConfig) -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=c.z_channels,
        block_out_channels=tuple(c.ch * m for m in c.ch_mult),
        layers_per_block=c.num_res_blocks,
        down_block_types=("DownEncoderBlock2D",) * len(c.ch_mult),
        up_block_types=("UpDecoderBlock2D",) * len(c.ch_mult),
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def reference_from_ours(vae: AutoencoderKL) -> DiffusersAutoencoderKL:
    checkpoint = {SD3_VAE_PREFIX + k: v for k, v in vae.state_dict().items()}
    config = diffusers_config(vae.config)
    converted = convert_ldm_vae_checkpoint(checkpoint, config)
    with torch.device("meta"):
        reference = DiffusersAutoencoderKL(**config)
    reference.load_state_dict(converted, strict=True, assign=True)
    return reference.eval()


@pytest.mark.parametrize(
    "key_file,prefix",
    [
        ("keys_sd3_medium.txt", SD3_VAE_PREFIX),
        ("keys_sd35_medium.txt", SD3_VAE_PREFIX),
        ("keys_sd35_large.txt", SD3_VAE_PREFIX),
        ("keys_flux_ae.txt", ""),
    ],
)
def test_state_dict_equals_the_checkpoint_key_list(key_file, prefix):
    with torch.device("meta"):
        vae = AutoencoderKL(flow_vae())
    expected = {k[len(prefix) :]: v for k, v in read_keys(KEYS_DIR / key_file, prefix).items()}
    assert {k: list(v.shape) for k, v in vae.state_dict().items()} == expected


def test_latent_scaling_constants_and_round_trip():
    assert (SD3_LATENT_SCALING.scale_factor, SD3_LATENT_SCALING.shift_factor) == (1.5305, 0.0609)
    assert (FLUX_LATENT_SCALING.scale_factor, FLUX_LATENT_SCALING.shift_factor) == (0.3611, 0.1159)
    z = torch.randn(1, 16, 2, 2)
    for scaling in (SD3_LATENT_SCALING, FLUX_LATENT_SCALING):
        assert torch.allclose(scaling.from_model(scaling.to_model(z)), z, atol=1e-6)
    # as diffusers' SD3 pipeline decodes: latents / scaling_factor + shift_factor
    assert torch.allclose(SD3_LATENT_SCALING.from_model(z), z / 1.5305 + 0.0609)


def compare(vae: AutoencoderKL, *, image_size: int):
    reference = reference_from_ours(vae)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, image_size, image_size, generator=generator) * 2 - 1
    latents = torch.randn(
        2,
        16,
        image_size // vae.config.downsampling_factor,
        image_size // vae.config.downsampling_factor,
        generator=generator,
    )
    with torch.no_grad():
        expected_posterior = reference.encode(images).latent_dist
        posterior = vae.encode(images)
        errors = [
            relative_error(posterior.mean, expected_posterior.mean),
            relative_error(posterior.logvar, expected_posterior.logvar),
            relative_error(vae.decode(latents), reference.decode(latents).sample),
        ]
    assert max(errors) <= TOLERANCE


def test_tiny_16_channel_vae_matches_diffusers(random_model):
    compare(
        random_model(
            lambda: AutoencoderKL(
                VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16, embed_dim=16, quant_conv=False)
            ),
            seed=1,
        ),
        image_size=16,
    )


@pytest.mark.slow
def test_flow_vae_matches_diffusers(random_model):
    compare(random_model(lambda: AutoencoderKL(flow_vae()), seed=2), image_size=64)


def test_safetensors_header_length_ending_in_0x80_is_not_taken_for_a_pickle(tmp_path):
    """Adding `quant_conv` to the VAE config (saved in the file's metadata) moved the tiny SD 1 file's header length
    to 0x1_3280; the loader read the leading 0x80 byte as a pickle's and refused the file. Any header length works."""
    from safetensors.torch import save_file

    from models.loader import _open

    for padding in range(256):
        path = tmp_path / "x.safetensors"
        save_file({"w": torch.zeros(1)}, str(path), metadata={"pad": "x" * padding})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    with _open(path) as f:
        assert list(f.keys()) == ["w"]
    path.write_bytes(b"\x80\x04" + b"\x00" * 20)  # a real pickle (protocol 4) is still refused
    with pytest.raises(Exception, match="pickle"):
        _open(path)
