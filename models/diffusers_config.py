"""A diffusers model folder's JSON configs → our `ModelConfig`, the preset it is, and a check of its tokenizers.

The architecture is read from `unet/config.json` (diffusers' `UNet2DConditionModel`), `vae/config.json`
(`AutoencoderKL`), `text_encoder*/config.json` (transformers' `CLIPTextConfig`), `scheduler/scheduler_config.json`
(prediction type, β schedule) and `model_index.json` (pipeline class, `force_zeros_for_empty_prompt`), inverting
the way diffusers' `single_file_utils.create_unet_diffusers_config` / `create_vae_diffusers_config` write them.
A folder equal to a preset in everything that shapes its weights or its sampling is that preset (SD 1.x is sd15
or sd14, SD 2.x's 768-v is sd21 and the 512-ε sd21-base: its scheduler's `prediction_type` tells them apart).

Tokenizers stay ours (open_clip's BPE); the folder's `tokenizer*/vocab.json` + `merges.txt` are compared with it
on `TRICKY_PROMPTS` through transformers' `CLIPTokenizer` when transformers is installed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from models.ddim import NUM_TRAIN_TIMESTEPS, SD_BETA_END, SD_BETA_START
from models.errors import MissingFileError, UserError
from models.stable_diffusion import PRESETS, ModelConfig, preset
from models.text import END_TOKEN, START_TOKEN, TextConfig, clip_tokenizer
from models.unet import UNetConfig
from models.vae import VAEConfig

log = logging.getLogger(__name__)

SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")  # one text encoder
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")  # CLIP-L + bigG
PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v"}  # diffusers' scheduler `prediction_type` → ours
SD_GUIDANCE, SDXL_GUIDANCE = 7.5, 5.0  # the presets' defaults, for a folder that is none of them
TOKENIZER_FILES = ("vocab.json", "tokenizer.json")  # BPE vocabulary + merges.txt, or transformers' one-file form
PAD_TOKENS = {"<|endoftext|>": END_TOKEN, "!": 0}  # CLIP-L pads with its end token, OpenCLIP's with "!" (id 0)
TRICKY_PROMPTS = (  # where two BPE implementations could part: case, punctuation, unicode, numbers, whitespace
    "A photo of a Squirrel, eating a BURGER!!",
    "two  spaces,\ta tab and   trailing whitespace  ",
    "café, naïve, Über-cool, 東京 and 🐱🚲",
    "3.14159, 1,000,000 and 2024-05-01 at 10:30pm",
    "antidisestablishmentarianism supercalifragilisticexpialidocious",
    "it's a dog's life; (round) [square] {curly} \"quoted\" 'single' a/b\\c",
    "a cat... riding?! a bike -- fast_and_furious #1 @home 50% off $9.99",
)


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise MissingFileError(f"{path} is missing; a diffusers model folder has it (is the download complete?)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not readable JSON ({err})") from err


def unet_config(c: dict) -> UNetConfig:
    """diffusers' UNet config → ours. `attention_head_dim` is, for SD, the head *count* (diffusers' misnomer):
    one number = fixed heads (SD 1.x), one per level = fixed head width (SD 2.x, SDXL: 64)."""
    widths = tuple(c["block_out_channels"])
    attends = [kind.startswith("CrossAttn") for kind in c["down_block_types"]]
    layers = c.get("transformer_layers_per_block", 1)
    heads = c.get("num_attention_heads") or c.get("attention_head_dim", 8)
    if isinstance(heads, int):
        num_heads, head_channels = heads, -1
    else:
        head_widths = {width // count for width, count, a in zip(widths, heads, attends) if a}
        if len(head_widths) != 1:
            raise UserError(f"unet/config.json: heads {heads} over widths {widths} are not one head width")
        num_heads, head_channels = UNetConfig.num_heads, head_widths.pop()
    vector = c.get("addition_embed_type") == "text_time"  # SDXL's pooled text + size conditioning
    return UNetConfig(
        in_channels=c["in_channels"],
        out_channels=c["out_channels"],
        model_channels=widths[0],
        channel_mult=tuple(width // widths[0] for width in widths),
        num_res_blocks=c["layers_per_block"],
        attention_resolutions=tuple(2**level for level in reversed(range(len(widths))) if attends[level]),
        num_heads=num_heads,
        num_head_channels=head_channels,
        transformer_depth=layers if isinstance(layers, int) else tuple(n if a else 0 for n, a in zip(layers, attends)),
        context_dim=c["cross_attention_dim"],
        use_linear_in_transformer=bool(c.get("use_linear_projection", False)),
        upcast_attention=bool(c.get("upcast_attention", False)),
        adm_in_channels=(c.get("projection_class_embeddings_input_dim") or 0) if vector else 0,
        latent_multiple=2 ** (len(widths) - 1) if vector else 1,  # as the sdxl preset (sgm's UNet)
    )


def vae_config(c: dict) -> VAEConfig:
    widths = tuple(c["block_out_channels"])
    return VAEConfig(
        ch=widths[0],
        ch_mult=tuple(width // widths[0] for width in widths),
        num_res_blocks=c["layers_per_block"],
        in_channels=c.get("in_channels", 3),
        z_channels=c["latent_channels"],
        embed_dim=c["latent_channels"],
        quant_conv=c.get("use_quant_conv", True),
    )


def text_config(c: dict, *, role: str, pad_token: int | None) -> TextConfig:
    """transformers' CLIPTextConfig → ours. `role`: "sd" (OpenAI CLIP-L if quick_gelu, else OpenCLIP-H),
    "sdxl-l" (CLIP-L, penultimate states) or "sdxl-g" (OpenCLIP bigG, penultimate states + projection)."""
    openai = c.get("hidden_act", "quick_gelu") == "quick_gelu"
    hf_layout = role == "sdxl-l" or (role == "sd" and openai)
    layers = c["num_hidden_layers"]
    return TextConfig(
        width=c["hidden_size"],
        heads=c["num_attention_heads"],
        layers=layers,
        context_length=c.get("max_position_embeddings", 77),
        vocab_size=c.get("vocab_size", 49408),
        act=c.get("hidden_act", "quick_gelu"),
        pad_token=pad_token if pad_token is not None else (END_TOKEN if openai else 0),
        hf_layout=hf_layout,
        context_layers=None if role == "sd" else layers - 1,
        context_norm=role == "sd",
        projection_dim=c.get("projection_dim", 0) if role == "sdxl-g" else 0,
    )


def tokenizer_pad(folder: Path, name: str) -> int | None:
    """The pad id the folder's tokenizer uses (its `special_tokens_map.json` / `tokenizer_config.json`)."""
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name / file
        if path.is_file():
            pad = json.loads(path.read_text()).get("pad_token")
            pad = pad.get("content") if isinstance(pad, dict) else pad
            if pad in PAD_TOKENS:
                return PAD_TOKENS[pad]
    return None


def config_from_folder(folder: Path) -> ModelConfig:
    """The model a diffusers SD / SDXL folder holds, as a ModelConfig named after the preset it equals ("diffusers"
    when it is none of them)."""
    index = read_json(folder / "model_index.json")
    pipeline = index.get("_class_name")
    if pipeline not in SD_PIPELINES + SDXL_PIPELINES:
        raise UserError(
            f"{folder}: model_index.json names pipeline {pipeline!r}; supported diffusers folders are "
            f"{', '.join(SD_PIPELINES + SDXL_PIPELINES)} (SD 1.x, SD 2.x, SDXL base)"
        )
    xl = pipeline in SDXL_PIPELINES
    if xl and not index.get("text_encoder"):
        raise UserError(f"{folder}: an SDXL folder without `text_encoder` (the refiner?); supported is SDXL base")
    scheduler = read_json(folder / "scheduler" / "scheduler_config.json")
    if scheduler.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise UserError(f"{folder}: scheduler beta_schedule {scheduler['beta_schedule']!r}; SD's is 'scaled_linear'")
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise UserError(f"{folder}: scheduler prediction_type {prediction!r}; supported are {sorted(PREDICTIONS)}")
    unet, vae = read_json(folder / "unet" / "config.json"), read_json(folder / "vae" / "config.json")
    text = read_json(folder / "text_encoder" / "config.json")
    pad = tokenizer_pad(folder, "tokenizer")
    config = ModelConfig(
        name="diffusers",
        unet=unet_config(unet),
        vae=vae_config(vae),
        text=text_config(text, role="sdxl-l" if xl else "sd", pad_token=pad),
        text_2=text_config(
            read_json(folder / "text_encoder_2" / "config.json"),
            role="sdxl-g",
            pad_token=tokenizer_pad(folder, "tokenizer_2"),
        )
        if xl
        else None,
        prediction=PREDICTIONS[prediction],
        scale_factor=vae.get("scaling_factor", 0.18215),
        image_size=(unet.get("sample_size") or 64) * 2 ** (len(vae["block_out_channels"]) - 1),
        beta_start=scheduler.get("beta_start", SD_BETA_START),
        beta_end=scheduler.get("beta_end", SD_BETA_END),
        num_train_timesteps=scheduler.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS),
        guidance=SDXL_GUIDANCE if xl else SD_GUIDANCE,
        size_embedding_dim=unet.get("addition_time_embed_dim") or 256,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
    )
    matches = matching_presets(config)
    return dataclasses.replace(config, name=matches[0]) if matches else config


ARCHITECTURE = ("unet", "vae", "text", "text_2", "prediction", "scale_factor", "beta_start", "beta_end")


def architecture(config: ModelConfig) -> tuple:
    """What must agree for a folder to be a preset: the networks' shapes (upcast_attention aside: a numerical
    setting diffusers' configs spell differently for one model) and the sampling's prediction, schedule, scale."""
    unet = dataclasses.replace(config.unet, upcast_attention=False)
    return (unet, *(getattr(config, name) for name in ARCHITECTURE[1:]))


def matching_presets(config: ModelConfig) -> list[str]:
    """The presets this config equals (sd15 before sd14: the same architecture)."""
    names = sorted((n for n in PRESETS if n != "tiny"), key=lambda n: n != "sd15")
    return [name for name in names if architecture(preset(name)) == architecture(config)]


def describe(config: ModelConfig) -> str:
    if config.name != "diffusers":
        return f"model={config.name}"
    family = "SDXL-like" if config.text_2 is not None else "SD-like"
    return (
        f"an {family} model of no preset's shapes (UNet widths {config.unet.model_channels}×{config.unet.channel_mult})"
    )


def check_tokenizers(folder: Path, config: ModelConfig) -> list[str]:
    """Compare the folder's `tokenizer/` (and `tokenizer_2/`) with ours on TRICKY_PROMPTS and their pad ids; log
    one warning per tokenizer that differs (the load goes on: ours are what run). Returns the warnings."""
    present = [(n, c) for n, c in (("tokenizer", config.text), ("tokenizer_2", config.text_2)) if c is not None]
    present = [(n, c) for n, c in present if any((folder / n / f).is_file() for f in TOKENIZER_FILES)]
    if not present:
        return []
    try:
        from transformers import CLIPTokenizer
    except ImportError:
        log.info("transformers is not installed: the folder's tokenizer files are not compared with ours")
        return []
    warnings = []
    for name, text in present:
        theirs = CLIPTokenizer.from_pretrained(str(folder / name), local_files_only=True)  # reads files only
        problem = next((p for p in TRICKY_PROMPTS if theirs(p)["input_ids"] != ours(p)), None)
        if problem is not None:
            their_ids = theirs(problem)["input_ids"]
            why = (
                f" (its pad token {theirs.pad_token!r}, id {text.pad_token}, is a special token there, split out of "
                "words; open_clip, which this model was trained with, does not)"
                if text.pad_token in their_ids and text.pad_token not in ours(problem)
                else ""
            )
            warnings.append(
                f"{folder / name} tokenizes {problem!r} as {their_ids} but ours (open_clip's BPE, which this model "
                f"runs with) gives {ours(problem)}{why}; prompts like it will differ from diffusers'"
            )
        pad = tokenizer_pad(folder, name)
        if pad is not None and pad != text.pad_token:
            warnings.append(f"{folder / name} pads with id {pad}, ours with {text.pad_token}")
    for warning in warnings:
        log.warning(warning)
    return warnings


def ours(prompt: str) -> list[int]:
    return [START_TOKEN, *clip_tokenizer().encode(prompt), END_TOKEN]
