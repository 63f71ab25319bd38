"""End to end on a tiny SDXL-shaped model: the models/ API (`encode_text`, `added_conditioning`, `unet(..., y=)`,
`decode_latents`) in a plain DDIM loop gives the image diffusers' `StableDiffusionXLPipeline` gives.

Same random weights (through diffusers' single-file converters), same seed for x_T, DDIMScheduler as SDXL
base configures it, classifier-free guidance with the empty negative prompt (zeros: `force_zeros_for_empty_prompt`,
diffusers' default for SDXL base), a non-square size. The loop below is the one p2p/pipeline.py runs, plus `y`:
it is the integration recipe for SDXL.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from test_parity_text import clip_tokenizer_files, hf_clip_tokenizer
from test_sdxl_parity import diffusers_unet_from_ours, diffusers_vae_from_ours, transformers_text_encoders_from_ours

from models.ddim import SD_BETA_END, SD_BETA_START, SD_TIMESTEP_OFFSET, ddim_step, ddim_timesteps, previous_timestep
from models.stable_diffusion import StableDiffusion, tiny_sdxl_config

MAX_PIXEL_DIFF = 2  # out of 255
PROMPT = "a cat riding a bicycle"
SEED, STEPS, GUIDANCE, HEIGHT, WIDTH = 0, 3, 5.0, 64, 96


@torch.no_grad()
def generate_with_models_api(model: StableDiffusion, prompt: str, *, negative_prompt: str = "") -> np.ndarray:
    """x_T from the seed → DDIM with guidance → uint8 image (H, W, 3)."""
    factor = model.config.latent_factor
    x = torch.randn((1, 4, HEIGHT // factor, WIDTH // factor), generator=torch.Generator("cpu").manual_seed(SEED))
    model.config.check_image_size(height=HEIGHT, width=WIDTH)
    cond, uncond = model.encode_text([prompt]), model.encode_text([negative_prompt])
    context = torch.cat([uncond.context, cond.context])
    y = model.added_conditioning(torch.cat([uncond.pooled, cond.pooled]), height=HEIGHT, width=WIDTH)
    for t in ddim_timesteps(STEPS, offset=SD_TIMESTEP_OFFSET):
        eps_uncond, eps_cond = model.unet(torch.cat([x, x]), torch.tensor(t), context, y=y).chunk(2)
        eps = eps_uncond + GUIDANCE * (eps_cond - eps_uncond)
        x = ddim_step(eps, x, t=t, t_prev=previous_timestep(t, num_steps=STEPS), schedule=model.schedule)
    image = (model.decode_latents(x)[0] + 1) * 127.5
    return image.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def diffusers_sdxl_pipeline_from_ours(model: StableDiffusion, tmp_path) -> StableDiffusionXLPipeline:
    clip_l, big_g = transformers_text_encoders_from_ours(model)
    files = clip_tokenizer_files(tmp_path)
    scheduler = DDIMScheduler(
        beta_start=SD_BETA_START,
        beta_end=SD_BETA_END,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=SD_TIMESTEP_OFFSET,
    )
    return StableDiffusionXLPipeline(
        vae=diffusers_vae_from_ours(model.vae, model.config),
        text_encoder=clip_l,
        text_encoder_2=big_g,
        tokenizer=hf_clip_tokenizer(files, pad_token="<|endoftext|>"),
        tokenizer_2=hf_clip_tokenizer(files, pad_token="!"),
        unet=diffusers_unet_from_ours(model.unet, model.config),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def test_tiny_sdxl_generation_matches_diffusers_pipeline(random_model, tmp_path):
    model = random_model(lambda: StableDiffusion(tiny_sdxl_config()), seed=11)
    pipe = diffusers_sdxl_pipeline_from_ours(model, tmp_path)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        PROMPT,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
    ).images[0]  # [0, 1]
    actual = generate_with_models_api(model, PROMPT)
    diff = abs(actual.astype("float64") - expected * 255).max()
    print(f"tiny SDXL pipeline: max pixel diff {diff:.3f}/255 (image std {expected.std() * 255:.1f}/255)")
    assert actual.shape == expected.shape == (HEIGHT, WIDTH, 3)
    assert expected.std() > 0.02, "degenerate reference image: the comparison would prove little"
    assert diff <= MAX_PIXEL_DIFF, f"tiny SDXL: generated pixels differ by {diff:.2f}/255 from diffusers"
