"""Test helpers: diffusers pipelines holding our random weights (through diffusers' own single-file converters),
written as model folders by diffusers' `save_pretrained`, and small SD 1.x / SD 2.x shapes to write them in.

The weights travel as a user's do: our state_dict under the original names → `convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint` / `convert_open_clip_checkpoint` → diffusers / transformers
modules (sharing storage where the converters only rename) → `save_pretrained` (fp32, `variant="fp16"`, sharded).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers import UNet2DConditionModel as DiffusersUNet
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from test_parity_text import clip_tokenizer_files, hf_clip_tokenizer
from test_sdxl_parity import _clip_text_config, transformers_text_encoders_from_ours
from transformers import CLIPTextModel

from models.ddim import SD_BETA_END, SD_BETA_START, SD_TIMESTEP_OFFSET
from models.loader import original_state_dict
from models.stable_diffusion import ModelConfig, StableDiffusion
from models.text import HF_PREFIX, TextConfig
from models.unet import UNetConfig
from models.vae import VAEConfig

TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)  # SD's factor 8 at toy widths


def tiny_sd1_config() -> ModelConfig:
    """SD 1.x's architecture at toy widths: fixed head count, conv proj_in, attention on all levels but the last,
    two resnets per level (so block indexes follow SD's arithmetic), CLIP-L-like text under HF names."""
    return ModelConfig(
        name="tiny-sd1",
        unet=UNetConfig(
            model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(2, 1), num_heads=2, context_dim=32
        ),
        vae=TINY_VAE,
        text=TextConfig(width=32, heads=2, layers=2, hf_layout=True),
        image_size=64,
    )


def tiny_sd2_config() -> ModelConfig:
    """SD 2.x (768-v) at toy widths: fixed head width, linear proj_in, OpenCLIP-like text padded with 0."""
    return ModelConfig(
        name="tiny-sd2",
        unet=UNetConfig(
            model_channels=32,
            channel_mult=(1, 2, 2),
            attention_resolutions=(2, 1),
            num_head_channels=16,
            context_dim=64,
            use_linear_in_transformer=True,
            upcast_attention=True,
        ),
        vae=TINY_VAE,
        text=TextConfig(width=64, heads=4, layers=2, act="gelu", pad_token=0),
        prediction="v",
        image_size=64,
    )


def diffusers_unet_config(config: ModelConfig) -> dict:
    """diffusers' UNet2DConditionModel config for any of our SD / SDXL UNet configs (as its single-file loader's
    `create_unet_diffusers_config` writes it for the public models)."""
    u = config.unet
    widths = tuple(u.model_channels * m for m in u.channel_mult)
    attends = [2**level in u.attention_resolutions and u.depth_at(level) > 0 for level in range(len(widths))]
    depth = (
        u.transformer_depth if isinstance(u.transformer_depth, int) else tuple(max(1, d) for d in u.transformer_depth)
    )
    unet = dict(
        sample_size=config.image_size // config.latent_factor,
        in_channels=u.in_channels,
        out_channels=u.out_channels,
        block_out_channels=widths,
        layers_per_block=u.num_res_blocks,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)),
        transformer_layers_per_block=depth,
        attention_head_dim=u.num_heads if u.num_head_channels <= 0 else tuple(w // u.num_head_channels for w in widths),
        cross_attention_dim=u.context_dim,
        use_linear_projection=u.use_linear_in_transformer,
        upcast_attention=u.upcast_attention,
    )
    if u.adm_in_channels:
        unet.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=config.size_embedding_dim,
            projection_class_embeddings_input_dim=u.adm_in_channels,
        )
    return unet


def diffusers_vae_config(config: ModelConfig) -> dict:
    c = config.vae
    return dict(
        latent_channels=c.z_channels,
        layers_per_block=c.num_res_blocks,
        block_out_channels=tuple(c.ch * m for m in c.ch_mult),
        down_block_types=("DownEncoderBlock2D",) * len(c.ch_mult),
        up_block_types=("UpDecoderBlock2D",) * len(c.ch_mult),
        sample_size=config.image_size,
        scaling_factor=config.scale_factor,
    )


def load_converted(cls, config: dict, state: dict):
    with torch.device("meta"):
        module = cls(**config)
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


def sd_text_encoder(model: StableDiffusion) -> CLIPTextModel:
    """SD 1.x: the original files hold HF names (a prefix off); SD 2.x: `convert_open_clip_checkpoint`."""
    c, state = model.config.text, original_state_dict(model)
    reference = CLIPTextModel(_clip_text_config(c))
    if c.hf_layout:
        prefix = HF_PREFIX[: -len("text_model.")]
        converted = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    else:
        converted = convert_open_clip_checkpoint(reference, state)
    if not hasattr(reference, "text_model"):  # transformers ≥ 5 has no `text_model.` level
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    reference.load_state_dict(converted, strict=True)
    return reference.eval()


def scheduler(config: ModelConfig) -> DDIMScheduler:
    """DDIM as every SD pipeline configures it."""
    return DDIMScheduler(
        beta_start=SD_BETA_START,
        beta_end=SD_BETA_END,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=SD_TIMESTEP_OFFSET,
        prediction_type={"epsilon": "epsilon", "v": "v_prediction"}[config.prediction],
    )


def pipeline_from_ours(model: StableDiffusion, tmp_path: Path):
    """A StableDiffusion(XL)Pipeline holding `model`'s weights, with CLIP tokenizer files written offline."""
    config, state = model.config, original_state_dict(model)
    unet = load_converted(
        DiffusersUNet, diffusers_unet_config(config), convert_ldm_unet_checkpoint(state, diffusers_unet_config(config))
    )
    vae = load_converted(
        AutoencoderKL, diffusers_vae_config(config), convert_ldm_vae_checkpoint(state, diffusers_vae_config(config))
    )
    del state
    files = clip_tokenizer_files(tmp_path)
    if config.text_2 is not None:
        clip_l, big_g = transformers_text_encoders_from_ours(model)
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=clip_l,
            text_encoder_2=big_g,
            tokenizer=hf_clip_tokenizer(files, pad_token="<|endoftext|>"),
            tokenizer_2=hf_clip_tokenizer(files, pad_token="!"),
            unet=unet,
            scheduler=scheduler(config),
            force_zeros_for_empty_prompt=config.force_zeros_for_empty_prompt,
            add_watermarker=False,
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=sd_text_encoder(model),
        tokenizer=hf_clip_tokenizer(files, pad_token="<|endoftext|>" if config.text.hf_layout else "!"),
        unet=unet,
        scheduler=scheduler(config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def pipeline_image(pipe, prompt: str, *, seed: int, steps: int, guidance: float, height: int, width: int):
    """diffusers' image in [0, 1], (H, W, 3), the empty negative prompt as our scripts use."""
    pipe.set_progress_bar_config(disable=True)
    negative = {} if isinstance(pipe, StableDiffusionXLPipeline) else {"negative_prompt": ""}
    return pipe(
        prompt,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        **negative,
    ).images[0]


def without_name(config: ModelConfig) -> ModelConfig:
    return dataclasses.replace(config, name="")


def write_configs(config: ModelConfig, folder: Path) -> Path:
    """A folder holding only the JSON configs diffusers writes for a pipeline of `config` (no weights): enough for
    the preset inference, which reads nothing else. Text configs as the public repos' `text_encoder*/config.json`."""
    xl = config.text_2 is not None
    with torch.device("meta"):
        DiffusersUNet(**diffusers_unet_config(config)).save_config(folder / "unet")
        AutoencoderKL(**diffusers_vae_config(config)).save_config(folder / "vae")
    scheduler(config).save_config(folder / "scheduler")
    _clip_text_config(config.text).save_pretrained(folder / "text_encoder")
    if xl:
        _clip_text_config(config.text_2, projection_dim=config.text_2.projection_dim).save_pretrained(
            folder / "text_encoder_2"
        )
    index = {
        "_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        **(
            {"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "force_zeros_for_empty_prompt": True}
            if xl
            else {}
        ),
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder
