"""End to end: `p2p.pipeline.generate` equals diffusers' `StableDiffusionPipeline` (random weights, CPU).

Same weights (UNet and VAE through diffusers' single-file converters, text through transformers' CLIP),
same seed (`torch.Generator("cpu").manual_seed(seed)` for x_T), DDIM configured as every SD pipeline is,
3 steps at 64×64 with guidance 7.5. The prompt goes through each side's own tokenizer: ours (open_clip's BPE)
and a transformers `CLIPTokenizer` built offline from the same vocabulary, so the comparison covers
prompt → tokens → features → sampling loop → decoded pixels.
"""

from __future__ import annotations

import gc

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from test_parity_text import SD1_CLIP_TEXT_CONFIG, clip_tokenizer_files, hf_clip_text_model_from_ours, hf_clip_tokenizer
from test_parity_unet import diffusers_unet_from_ours
from test_parity_vae import diffusers_vae_from_ours
from transformers import CLIPTextConfig, CLIPTextModel

from models.ddim import SD_BETA_END, SD_BETA_START, SD_TIMESTEP_OFFSET
from models.loader import original_state_dict
from models.stable_diffusion import StableDiffusion, preset
from p2p.pipeline import SamplerSettings, generate

MAX_PIXEL_DIFF = 2  # out of 255
PROMPT = "a cat riding a bicycle"
SEED, STEPS, GUIDANCE, SIZE = 0, 3, 7.5, 64

# text_encoder/config.json of stabilityai/stable-diffusion-2-1: OpenCLIP ViT-H/14's text tower, converted,
# with 23 layers because SD 2.x uses the penultimate layer's output
SD2_CLIP_TEXT_CONFIG = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    hidden_act="gelu",
    projection_dim=512,
    pad_token_id=0,
)


def sd2_text_encoder_from_ours(model: StableDiffusion) -> CLIPTextModel:
    """SD 2.x's text encoder as diffusers builds it: open_clip weights through `convert_open_clip_checkpoint`."""
    reference = CLIPTextModel(CLIPTextConfig(**{**SD1_CLIP_TEXT_CONFIG, **SD2_CLIP_TEXT_CONFIG})).eval()
    converted = convert_open_clip_checkpoint(reference, original_state_dict(model))
    prefix = "" if hasattr(reference, "text_model") else "text_model."  # transformers ≥ 5 has no text_model level
    reference.load_state_dict({k[len(prefix) :]: v for k, v in converted.items()}, strict=True)
    return reference


def diffusers_pipeline_from_ours(model: StableDiffusion, name: str, tmp_path) -> StableDiffusionPipeline:
    sd1 = model.config.text.hf_layout
    scheduler = DDIMScheduler(
        beta_start=SD_BETA_START,
        beta_end=SD_BETA_END,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=SD_TIMESTEP_OFFSET,
        prediction_type={"epsilon": "epsilon", "v": "v_prediction"}[model.config.prediction],
    )
    return StableDiffusionPipeline(
        vae=diffusers_vae_from_ours(model.vae),
        text_encoder=hf_clip_text_model_from_ours(model) if sd1 else sd2_text_encoder_from_ours(model),
        tokenizer=hf_clip_tokenizer(clip_tokenizer_files(tmp_path), pad_token="<|endoftext|>" if sd1 else "!"),
        unet=diffusers_unet_from_ours(model.unet, "sd15" if sd1 else "sd21"),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sd21"])  # ε-prediction with CLIP ViT-L; v-prediction with OpenCLIP ViT-H
def test_generate_matches_diffusers_pipeline(name, random_model, tmp_path):
    model = random_model(lambda: StableDiffusion(preset(name)), seed=4)
    pipe = diffusers_pipeline_from_ours(model, name, tmp_path)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        PROMPT,
        negative_prompt="",
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
    ).images  # float in [0, 1], (1, H, W, 3)
    actual = generate(
        model,
        [PROMPT],
        seed=SEED,
        height=SIZE,
        width=SIZE,
        settings=SamplerSettings(steps=STEPS, guidance=GUIDANCE),
        progress=False,
    )  # uint8
    diff = abs(actual.astype("float64") - expected * 255).max()
    print(f"{name} pipeline: max pixel diff {diff:.3f}/255 (image std {expected.std() * 255:.1f}/255)")
    assert actual.shape == expected.shape == (1, SIZE, SIZE, 3)
    assert expected.std() > 0.02, "degenerate reference image: the comparison would prove little"
    assert diff <= MAX_PIXEL_DIFF, f"{name}: generated pixels differ by {diff:.2f}/255 from diffusers"
    del model, pipe
    gc.collect()
