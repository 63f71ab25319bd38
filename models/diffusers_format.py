"""diffusers' module names → the original single-file names (ours), for SD 1.x, SD 2.x and SDXL.

Written once from the architecture, as diffusers' own single-file converters are written the other way
(`diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`): the same loops over levels, resnets and attentions
produce a table {diffusers module → our module}; tests prove the mapping is their inverse.

- UNet (`unet/`): diffusers groups by level (`down_blocks.L.resnets.J`, `.attentions.J`, `.downsamplers.0`);
  LDM numbers blocks in order (`input_blocks.N.0` resnet, `.1` transformer): N = 1 + L·(R+1) + J with R resnets
  per level, and the level's downsampler is block (L+1)·(R+1). The way up, `up_blocks.I` is level L−1−I and
  `output_blocks.N` with N = I·(R+1) + J; its upsampler sits after the resnet (and transformer) of the last block.
  Inside a resnet: norm1/conv1/time_emb_proj/norm2/conv2/conv_shortcut = in_layers.0/.2, emb_layers.1,
  out_layers.0/.3, skip_connection. Transformers (`proj_in`, `transformer_blocks.K.attn1.to_q`, …) keep their names.
- VAE (`vae/`): `down_blocks.L.resnets.J` = `down.L.block.J`, the decoder's `up_blocks.I` = `up.(L−1−I)`;
  mid-block attention's Linear `to_q/to_k/to_v/to_out.0` (older folders: `query/key/value/proj_attn`) are LDM's
  1×1 convs `q/k/v/proj_out`: (c, c) → (c, c, 1, 1).
- CLIP ViT-L (`text_encoder/` of SD 1.x and SDXL): the original files store Hugging Face names already; only a
  prefix is added. OpenCLIP ViT-H (SD 2.x `text_encoder/`) and bigG (SDXL `text_encoder_2/`) are stored by SD in
  open_clip's layout: `models.text.hf_clip_to_open_clip` concatenates q/k/v into `in_proj`; bigG's Linear
  `text_projection.weight` is open_clip's matrix transposed. transformers ≥ 5 writes CLIP keys without the
  `text_model.` level that older files (and the Hub's) carry: both are read.
A key the table does not know comes out as `<component>/<key>`, so the strict check lists it by its own name.
"""

from __future__ import annotations

import math
import re

import torch

from models.conditioner import CLIP_L_HF_PREFIX
from models.stable_diffusion import ModelConfig
from models.text import HF_PREFIX, OC_PREFIX, hf_clip_to_open_clip
from models.unet import UNetConfig
from models.vae import VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SDXL_BIGG_PREFIX = "conditioner.embedders.1.model."
# the original files hold open_clip's contrastive temperature for bigG; diffusers drops it (unused by SD)
LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial value (Radford et al. 2021, §2.5)
# diffusers-side tensors that are not weights: HF CLIP's position arange (older transformers saved it)
IGNORED = re.compile(r"^(text_model\.)?embeddings\.position_ids$")

SAME: dict[str, str] = {}  # submodules keep their names (transformers, convs, linears)
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {
    "group_norm": "norm",
    **dict.fromkeys(("to_q", "query"), "q"),
    **dict.fromkeys(("to_k", "key"), "k"),
    **dict.fromkeys(("to_v", "value"), "v"),
    **dict.fromkeys(("to_out.0", "proj_attn"), "proj_out"),
}
CONV_1X1 = {"q", "k", "v", "proj_out"}  # VAE attention projections: Linear in diffusers, 1×1 conv in LDM


def unet_modules(u: UNetConfig) -> dict[str, tuple[str, dict[str, str]]]:
    """{diffusers module path: (our module path, renames inside it)} for a UNet of this config."""
    modules = {
        "conv_in": ("input_blocks.0.0", SAME),
        "time_embedding.linear_1": ("time_embed.0", SAME),
        "time_embedding.linear_2": ("time_embed.2", SAME),
        "conv_norm_out": ("out.0", SAME),
        "conv_out": ("out.2", SAME),
    }
    if u.adm_in_channels:  # SDXL's `add_embedding` MLP on [pooled | sizes] = sgm's `label_emb.0`
        modules["add_embedding.linear_1"] = ("label_emb.0.0", SAME)
        modules["add_embedding.linear_2"] = ("label_emb.0.2", SAME)
    levels, per_level = len(u.channel_mult), u.num_res_blocks + 1
    attends = [2**level in u.attention_resolutions and u.depth_at(level) > 0 for level in range(levels)]
    for level in range(levels):
        for j in range(u.num_res_blocks):
            block = 1 + level * per_level + j
            modules[f"down_blocks.{level}.resnets.{j}"] = (f"input_blocks.{block}.0", UNET_RESNET)
            if attends[level]:
                modules[f"down_blocks.{level}.attentions.{j}"] = (f"input_blocks.{block}.1", SAME)
        if level != levels - 1:
            modules[f"down_blocks.{level}.downsamplers.0.conv"] = (f"input_blocks.{(level + 1) * per_level}.0.op", SAME)
    modules["mid_block.resnets.0"] = ("middle_block.0", UNET_RESNET)
    modules["mid_block.attentions.0"] = ("middle_block.1", SAME)
    modules["mid_block.resnets.1"] = ("middle_block.2", UNET_RESNET)
    for i in range(levels):
        level = levels - 1 - i
        for j in range(per_level):
            block = i * per_level + j
            modules[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{block}.0", UNET_RESNET)
            if attends[level]:
                modules[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{block}.1", SAME)
        if level != 0:  # after the last block's resnet (and transformer): index 2 or 1 in that block
            last = i * per_level + per_level - 1
            modules[f"up_blocks.{i}.upsamplers.0.conv"] = (
                f"output_blocks.{last}.{2 if attends[level] else 1}.conv",
                SAME,
            )
    return {k: (UNET_PREFIX + ours, inner) for k, (ours, inner) in modules.items()}


def vae_modules(v: VAEConfig) -> dict[str, tuple[str, dict[str, str]]]:
    """{diffusers module path: (our module path, renames inside it)} for a VAE of this config."""
    modules = {}
    levels = len(v.ch_mult)
    for side in ("encoder", "decoder"):
        modules[f"{side}.conv_in"] = (f"{side}.conv_in", SAME)
        modules[f"{side}.conv_out"] = (f"{side}.conv_out", SAME)
        modules[f"{side}.conv_norm_out"] = (f"{side}.norm_out", SAME)
        modules[f"{side}.mid_block.resnets.0"] = (f"{side}.mid.block_1", VAE_RESNET)
        modules[f"{side}.mid_block.attentions.0"] = (f"{side}.mid.attn_1", VAE_ATTENTION)
        modules[f"{side}.mid_block.resnets.1"] = (f"{side}.mid.block_2", VAE_RESNET)
    for level in range(levels):
        for j in range(v.num_res_blocks):
            modules[f"encoder.down_blocks.{level}.resnets.{j}"] = (f"encoder.down.{level}.block.{j}", VAE_RESNET)
        if level != levels - 1:
            modules[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = (
                f"encoder.down.{level}.downsample.conv",
                SAME,
            )
    for i in range(levels):
        level = levels - 1 - i  # the decoder's up_blocks run from the deepest level; LDM indexes `up` by level
        for j in range(v.num_res_blocks + 1):
            modules[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{level}.block.{j}", VAE_RESNET)
        if level != 0:
            modules[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{level}.upsample.conv", SAME)
    if v.quant_conv:
        modules["quant_conv"] = ("quant_conv", SAME)
        modules["post_quant_conv"] = ("post_quant_conv", SAME)
    return {k: (VAE_PREFIX + ours, inner) for k, (ours, inner) in modules.items()}


def rename_modules(
    state: dict[str, torch.Tensor], modules: dict[str, tuple[str, dict[str, str]]], *, component: str
) -> dict[str, torch.Tensor]:
    """Rename every key by its longest listed module path; inside it, by the module's renames (an empty table
    keeps the names). VAE attention projections become 1×1 convs. Unknown keys → `<component>/<key>`."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        prefix = next(
            (".".join(parts[:n]) for n in range(len(parts) - 1, 0, -1) if ".".join(parts[:n]) in modules), None
        )
        if prefix is None:
            out[f"{component}/{key}"] = value
            continue
        ours, inner = modules[prefix]
        module, param = key[len(prefix) + 1 :].rpartition(".")[::2]
        if inner and module not in inner:
            out[f"{component}/{key}"] = value
            continue
        renamed = inner.get(module, module) if inner else module
        if inner is VAE_ATTENTION and renamed in CONV_1X1 and param == "weight" and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)  # Linear (out, in) → 1×1 conv (out, in, 1, 1)
        out[".".join(filter(None, (ours, renamed, param)))] = value
    return out


def text_to_original(
    state: dict[str, torch.Tensor], *, hf_layout: bool, prefix: str, component: str
) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model's state → the original names. `hf_layout` (CLIP ViT-L): `prefix` is where
    the file keeps the HF names (`…text_model.`); else (OpenCLIP) `prefix` is the open_clip tower's."""
    state = {key.removeprefix("text_model."): value for key, value in state.items()}  # old and new transformers
    if hf_layout:
        return {prefix + key: value for key, value in state.items()}
    projection = state.pop("text_projection.weight", None)
    out = hf_clip_to_open_clip(
        {"text_model." + k: v for k, v in state.items()}, hf_prefix="text_model.", oc_prefix=prefix
    )
    out = {(k if k.startswith(prefix) else f"{component}/{k.removeprefix('text_model.')}"): v for k, v in out.items()}
    if projection is not None:  # nn.Linear (proj, width) → open_clip's `x @ text_projection` matrix (width, proj)
        out[prefix + "text_projection"] = projection.T.contiguous()
        out[prefix + "logit_scale"] = torch.tensor(LOGIT_SCALE, dtype=projection.dtype, device=projection.device)
    return out


def components(config: ModelConfig) -> tuple[str, ...]:
    """The folder's weight-holding components this model reads."""
    return ("unet", "vae", "text_encoder") + (("text_encoder_2",) if config.text_2 is not None else ())


def to_original(component: str, state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """One component's diffusers-named state → the original single-file names (`StableDiffusion`'s, with CLIP-L
    under HF names as in the files). Works on meta tensors too, so a folder's headers can be checked first."""
    state = {k: v for k, v in state.items() if not IGNORED.match(k)}
    if component == "unet":
        return rename_modules(state, unet_modules(config.unet), component=component)
    if component == "vae":
        return rename_modules(state, vae_modules(config.vae), component=component)
    if component == "text_encoder" and config.text_2 is not None:  # SDXL: CLIP ViT-L
        return text_to_original(state, hf_layout=True, prefix=CLIP_L_HF_PREFIX, component=component)
    if component == "text_encoder":  # SD 1.x: CLIP ViT-L under HF names; SD 2.x: OpenCLIP ViT-H
        hf = config.text.hf_layout
        return text_to_original(state, hf_layout=hf, prefix=HF_PREFIX if hf else OC_PREFIX, component=component)
    if component == "text_encoder_2":  # SDXL: OpenCLIP ViT-bigG with its projection
        return text_to_original(state, hf_layout=False, prefix=SDXL_BIGG_PREFIX, component=component)
    raise ValueError(f"unknown component {component!r}; expected one of {components(config)}")
