"""diffusers' own `StableDiffusionPipeline` / `StableDiffusionXLPipeline`, built offline from one of our files.

The bench's side-by-side mode (issue 26) times diffusers against this stack on the *same* weights: an
original-layout single-file `.safetensors` (`models.loader.save_checkpoint` writes one, with our ModelConfig in
its metadata). The file's tensors go through diffusers' own single-file converters
(`diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`), as `from_single_file` does, into models whose
configs are derived from the ModelConfig (what `unet/config.json`, `vae/config.json`, `text_encoder*/config.json`
of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0 say for the real shapes): no
network, no Hugging Face cache. The tokenizers are CLIP's BPE bundled with open_clip, written as `vocab.json` +
`merges.txt`. Needs the bench extra: `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers import UNet2DConditionModel as DiffusersUNet
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from open_clip.tokenizer import SimpleTokenizer, default_bpe
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from models.errors import UserError
from models.stable_diffusion import ModelConfig
from models.text import END_TOKEN, START_TOKEN, TextConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."  # SD 1.x's CLIP-L, Hugging Face names (diffusers strips this)
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_BIGG_PREFIX = "conditioner.embedders.1.model."  # open_clip names; `convert_open_clip_checkpoint` renames them
SKIPPED = ("position_ids",)  # CLIP's index buffer, saved by some files; transformers rebuilds it (not a weight)
BPE_MERGES = 49152 - 256 - 2  # the merges open_clip's SimpleTokenizer reads from its bundled BPE file


def check_supported(config: ModelConfig) -> None:
    """diffusers' SD pipelines take SD 1.x (Hugging Face CLIP text, cross-attention everywhere) and SDXL."""
    hybrid = any(kind != "cross" for kind in config.unet.attention_kinds)
    if hybrid or not config.text.hf_layout or config.prediction != "epsilon":
        raise UserError(
            f"model {config.name!r} has no diffusers pipeline here (hybrid attention, open_clip text or "
            "v-prediction); side by side with diffusers takes SD 1.x (model=sd15) and SDXL (model=sdxl)"
        )


def unet_config(config: ModelConfig) -> dict:
    """UNet2DConditionModel's config for our UNetConfig (unet/config.json of SD 1.5 / SDXL base for the presets)."""
    u = config.unet
    channels = tuple(u.model_channels * m for m in u.channel_mult)
    attention = [bool(u.depth_at(level)) and 2**level in u.attention_resolutions for level in range(len(channels))]
    heads = tuple(u.num_heads if u.num_head_channels == -1 else c // u.num_head_channels for c in channels)
    vector = dict(  # SDXL's `label_emb` on y = pooled text + 6 size numbers
        addition_embed_type="text_time",
        addition_time_embed_dim=config.size_embedding_dim,
        projection_class_embeddings_input_dim=u.adm_in_channels,
    )
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
        attention_head_dim=heads,  # diffusers' misnomer: these are head counts
        cross_attention_dim=u.context_dim,
        use_linear_projection=u.use_linear_in_transformer,
        upcast_attention=u.upcast_attention,
        **(vector if u.adm_in_channels else {}),
    )


def vae_config(config: ModelConfig) -> dict:
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


def text_config(c: TextConfig, **extra) -> CLIPTextConfig:
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


def read_tensors(path: Path, prefix: str, *, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The file's tensors under `prefix`, each cast on reading (an fp16 file is never held twice)."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k).to(dtype) for k in f.keys() if k.startswith(prefix) and not k.endswith(SKIPPED)}


def _without_text_model_level(state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    # transformers >= 5 dropped the `text_model.` level that the checkpoints (and diffusers' converters) still carry
    return state if hasattr(model, "text_model") else {k.removeprefix("text_model."): v for k, v in state.items()}


def text_encoder(path: Path, config: ModelConfig, *, dtype: torch.dtype) -> CLIPTextModel:
    prefix = SD1_TEXT_PREFIX if config.text_2 is None else SDXL_CLIP_L_PREFIX
    model = CLIPTextModel(text_config(config.text, projection_dim=config.text.width)).eval()
    converted = convert_ldm_clip_checkpoint(read_tensors(path, prefix, dtype=dtype))
    model.load_state_dict(_without_text_model_level(converted, model), strict=True)
    return model.to(dtype)


def text_encoder_2(path: Path, config: ModelConfig, *, dtype: torch.dtype) -> CLIPTextModelWithProjection:
    c = config.text_2
    model = CLIPTextModelWithProjection(text_config(c, projection_dim=c.projection_dim)).eval()
    state = read_tensors(path, SDXL_BIGG_PREFIX, dtype=dtype)
    converted = convert_open_clip_checkpoint(model, state, prefix=SDXL_BIGG_PREFIX)
    model.load_state_dict(_without_text_model_level(converted, model), strict=True)
    return model.to(dtype)


def _assigned(cls, config: dict, converted: dict[str, torch.Tensor]):
    with torch.device("meta"):
        model = cls(**config)
    model.load_state_dict(converted, strict=True, assign=True)  # the read tensors themselves: no copy
    return model.eval()


def write_tokenizer_files(directory: Path) -> Path:
    """CLIP's BPE as Hugging Face `vocab.json` + `merges.txt`, from the copy bundled with open_clip (no network);
    only the special tokens are spelt `<|startoftext|>` / `<|endoftext|>` by Hugging Face."""
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renamed.get(token, token): index for token, index in SimpleTokenizer().encoder.items()}
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines[1 : BPE_MERGES + 1]) + "\n")
    return directory


def ddim_scheduler(config: ModelConfig) -> DDIMScheduler:
    """DDIM as every SD pipeline configures it (scheduler/scheduler_config.json of SD 1.5 and SDXL base)."""
    return DDIMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def pipeline_from_file(
    path: Path, config: ModelConfig, *, tokenizer_dir: Path, dtype: torch.dtype = torch.float32
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """diffusers' pipeline for `config` holding the weights of single-file checkpoint `path`, in `dtype`.
    Text encoders are read first and the UNet last, so at most one component's tensors exist twice."""
    check_supported(config)
    tokenizer = lambda pad: CLIPTokenizer.from_pretrained(str(tokenizer_dir), pad_token=pad, model_max_length=77)  # noqa: E731
    parts = dict(text_encoder=text_encoder(path, config, dtype=dtype), tokenizer=tokenizer("<|endoftext|>"))
    if config.text_2 is not None:
        parts |= dict(text_encoder_2=text_encoder_2(path, config, dtype=dtype), tokenizer_2=tokenizer("!"))
    vae = vae_config(config)
    parts["vae"] = _assigned(
        AutoencoderKL, vae, convert_ldm_vae_checkpoint(read_tensors(path, VAE_PREFIX, dtype=dtype), vae)
    )
    unet = unet_config(config)
    state = read_tensors(path, UNET_PREFIX, dtype=dtype)
    parts["unet"] = _assigned(DiffusersUNet, unet, convert_ldm_unet_checkpoint(state, unet))
    del state
    if config.text_2 is not None:
        return StableDiffusionXLPipeline(
            **parts,
            scheduler=ddim_scheduler(config),
            force_zeros_for_empty_prompt=config.force_zeros_for_empty_prompt,
            add_watermarker=False,
        )
    return StableDiffusionPipeline(
        **parts,
        scheduler=ddim_scheduler(config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
