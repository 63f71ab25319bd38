"""Prompt-to-Prompt and real-image editing on SDXL's architecture (tiny widths), through the same code paths as
SD 1.x (issue 31): the edit identities, LocalBlend's level, null-text inversion, and the scripts end to end —
`generate.py` on an SDXL-layout file gives the image of diffusers' StableDiffusionXLPipeline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_
from PIL import Image

from models.attention import attention_modules
from models.loader import save_checkpoint
from models.stable_diffusion import StableDiffusion, tiny_sdxl_config
from p2p.controllers import grid_at
from p2p.edit import BlendSpec, EditSpec, default_blend_downsamplings, edit
from p2p.pipeline import SamplerSettings, sample
from p2p.real.inversion import image_to_tensor, invert
from p2p.shapes.world import WorldConfig, sample_scene

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
SETTINGS = SamplerSettings(steps=STEPS, guidance=5.0)
TOLERANCE = 1e-4  # latents; a batch of different size may change the last float32 digits


@pytest.fixture(scope="module")
def sdxl() -> StableDiffusion:
    return randomize_(StableDiffusion(tiny_sdxl_config()), seed=3).eval().requires_grad_(False)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_replacing_a_word_by_itself_changes_nothing(sdxl):
    prompts = ["a cat riding a bicycle", "a cat riding a bicycle"]
    result = edit(sdxl, prompts, seed=1, spec=EditSpec(kind="replace"), settings=SETTINGS, progress=False)
    assert _max_diff(result.latents[1], result.latents[0]) <= TOLERANCE


def test_the_source_in_an_edit_batch_is_the_source_alone(sdxl):
    prompts = ["a cat riding a bicycle", "a dog riding a bicycle"]
    result = edit(sdxl, prompts, seed=2, spec=EditSpec(kind="replace"), settings=SETTINGS, progress=False)
    alone = edit(sdxl, prompts[:1], seed=2, settings=SETTINGS, progress=False)
    plain_target = edit(sdxl, prompts[1:], seed=2, settings=SETTINGS, progress=False)
    assert _max_diff(result.latents[0], alone.latents[0]) <= TOLERANCE
    assert _max_diff(result.latents[1], plain_target.latents[0]) > 1e-3  # the target was edited


def test_local_blend_reads_the_latent_over_4_layers_as_sdxl_at_1024_does():
    # random weights attend almost uniformly, so every pixel would pass the threshold: sharpen the text
    # attention (larger queries) so that a word's map, and the mask, cover part of the image
    sdxl = randomize_(StableDiffusion(tiny_sdxl_config()), seed=3).eval().requires_grad_(False)
    for module in attention_modules(sdxl.unet).values():
        if module.kind == "cross":
            module.to_q.weight.mul_(30)
    # 256 px → 32² latents; SDXL's attention levels are latent/2 and latent/4 (none at full resolution): the blend
    # reads latent/4 = 8², the level SDXL reads at 32² for 1024 px (SD 1.x's 16² at 512 px)
    assert default_blend_downsamplings(sdxl, (32, 32)) == 2 and grid_at((32, 32), 2) == (8, 8)
    assert default_blend_downsamplings(sdxl, (128, 128)) == 2 and grid_at((128, 128), 2) == (32, 32)
    prompts = ["a cat riding a bicycle", "a dog riding a bicycle"]
    result = edit(
        sdxl,
        prompts,
        seed=4,
        height=256,
        width=256,
        spec=EditSpec(kind="replace"),
        blend=BlendSpec(words=[["cat"], ["dog"]], threshold=0.8, dilation=0),
        settings=SETTINGS,
        progress=False,
    )
    assert result.blend.last_mask.shape == (2, 1, 32, 32)  # upsampled to the latent
    assert result.blend.grid == (8, 8)
    outside = result.blend.last_mask[1, 0] == 0
    assert outside.any(), "an all-ones mask would prove nothing"
    assert torch.equal(result.latents[1][:, outside], result.latents[0][:, outside])


def test_null_text_inversion_reconstructs_better_than_ddim_inversion(sdxl):
    world = WorldConfig(image_size=64)
    photo = sample_scene(np.random.default_rng(5), config=world, num_objects=1)
    caption, image = photo.caption, photo.image
    target = sdxl.encode_images(image_to_tensor(image))
    errors, settings = {}, SamplerSettings(steps=4, guidance=5.0)
    for method in ("ddim", "null_text"):
        inversion = invert(sdxl, image, caption, method=method, settings=settings, progress=False)
        latents = sample(
            sdxl,
            [caption],
            latent=inversion.x_T,
            settings=settings,
            uncond_embeddings=inversion.uncond_embeddings,
            progress=False,
        )
        errors[method] = (latents - target).pow(2).mean().item()
    # measured 1.29 vs 1.73 (random weights: large ε, so 10 Adam steps of lr 1e-2 close only part of the gap)
    assert errors["null_text"] < 0.85 * errors["ddim"], errors


def test_generate_script_on_an_sdxl_layout_file_gives_diffusers_image(tmp_path):
    from test_sdxl_pipeline import GUIDANCE, HEIGHT, MAX_PIXEL_DIFF, PROMPT, SEED, diffusers_sdxl_pipeline_from_ours

    model = randomize_(StableDiffusion(tiny_sdxl_config()), seed=11).eval().requires_grad_(False)
    checkpoint = save_checkpoint(model, tmp_path / "tiny_sdxl.safetensors")  # the config travels in the metadata
    width = 96  # non-square
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "generate.py"),
            f"model.checkpoint={checkpoint}",
            f'prompts=["{PROMPT}"]',
            f"seed={SEED}",
            f"steps={STEPS}",
            f"guidance={GUIDANCE}",
            f"height={HEIGHT}",
            f"width={width}",
            "progress=false",
            f"hydra.run.dir={tmp_path}/run",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    ours = np.asarray(Image.open(next((tmp_path / "run").glob("00_*.png"))), dtype=np.float64)
    pipe = diffusers_sdxl_pipeline_from_ours(model, tmp_path)
    pipe.set_progress_bar_config(disable=True)
    expected = (
        pipe(
            PROMPT,
            height=HEIGHT,
            width=width,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type="np",
        ).images[0]
        * 255
    )
    assert ours.shape == expected.shape == (HEIGHT, width, 3)
    assert expected.std() > 5, "degenerate reference image: the comparison would prove little"
    assert np.abs(ours - expected).max() <= MAX_PIXEL_DIFF
