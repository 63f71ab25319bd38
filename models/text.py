"""The text encoder (`cond_stage_model.`), built on open_clip's tokenizer and text transformer.

SD 2.x stores OpenCLIP ViT-H/14 natively (`cond_stage_model.model.transformer.resblocks.N.attn.in_proj_weight`):
our module has exactly that layout. SD 1.x stores OpenAI CLIP ViT-L/14 under Hugging Face names
(`cond_stage_model.transformer.text_model.encoder.layers.N.self_attn.q_proj`): `hf_clip_to_open_clip`
maps them by rule onto the same layout (q/k/v concatenated into `in_proj`), `open_clip_to_hf_clip` back.

What differs between the models is configuration, not code (P2P_SPEC §8):
- SD 1.x: quick-GELU, all 12 layers then `ln_final`, prompts padded with the end token 49407.
- SD 2.x: GELU, the output of layer 23 of 24 (penultimate) then `ln_final`, padded with 0.
- SDXL (two of these encoders, `models/conditioner.py`): CLIP ViT-L's layer 11 of 12 and OpenCLIP bigG's layer
  31 of 32, both *without* `ln_final` (diffusers: `hidden_states[-2]`); bigG also gives the pooled embedding
  `ln_final(last layer)[EOT] @ text_projection`.

References: Radford et al. 2021 (CLIP), Cherti et al. 2023 (OpenCLIP), Podell et al. 2023 (SDXL §2.1).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import LayerNorm, QuickGELU, Transformer
from torch import nn

from models.errors import UserError, WrongTypeError

START_TOKEN = 49406  # <start_of_text> in CLIP's BPE vocabulary
END_TOKEN = 49407  # <end_of_text>; SD 1.x also pads with it


@dataclass
class TextConfig:
    width: int = 768  # 768 = CLIP ViT-L/14 (SD 1.x), 1024 = OpenCLIP ViT-H/14 (SD 2.x)
    heads: int = 12
    layers: int = 12  # layers that are built AND run; SD 2.x builds 23 of the file's 24 (penultimate output)
    context_length: int = 77  # CLIP's maximum: start + 75 tokens + end
    vocab_size: int = 49408
    act: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP, SD 1.x) or "gelu" (OpenCLIP, SD 2.x)
    pad_token: int = END_TOKEN  # SD 1.x pads with the end token, SD 2.x with 0: changes features by up to ~4
    hf_layout: bool = False  # True when the checkpoint stores Hugging Face CLIP names (SD 1.x, SDXL's CLIP-L)
    context_layers: int | None = None  # layers run for the context; None = all `layers` (SDXL: the penultimate)
    context_norm: bool = True  # `ln_final` on the context (SD 1.x/2.x); SDXL's penultimate states go without
    projection_dim: int = 0  # >0: `text_projection` + `logit_scale` exist and give a pooled embedding (SDXL's bigG)
    pooled_unprojected: bool = False  # CLIP-L in SD3 / FLUX: pooled = ln_final(last layer)[EOT], no projection


def openclip_bigg(*, hf_layout: bool = False) -> TextConfig:
    """OpenCLIP ViT-bigG/14 as SDXL and SD3 use it: penultimate states without the final norm, the projected
    pooled EOT embedding, padding with 0. `hf_layout`: stored under HF names (SD3 files) or open_clip's (SDXL)."""
    return TextConfig(
        width=1280,
        heads=20,
        layers=32,
        act="gelu",
        pad_token=0,
        context_layers=31,
        context_norm=False,
        projection_dim=1280,
        hf_layout=hf_layout,
    )


@functools.lru_cache(maxsize=1)
def clip_tokenizer() -> SimpleTokenizer:
    """CLIP's BPE tokenizer; its vocabulary ships inside open_clip_torch. Built once (it is slow)."""
    return SimpleTokenizer()


def tokenize(prompts: list[str], *, context_length: int = 77, pad_token: int = END_TOKEN) -> torch.Tensor:
    """Prompts → (b, context_length) token ids: [start, tokens…, end, pad…]. Over-long prompts raise."""
    if isinstance(prompts, str):
        raise WrongTypeError(f"tokenize takes a list of prompts, got the string {prompts!r}; wrap it in a list")
    rows = []
    for prompt in prompts:
        ids = [START_TOKEN, *clip_tokenizer().encode(prompt), END_TOKEN]
        if len(ids) > context_length:
            raise UserError(
                f"prompt {prompt!r} has {len(ids) - 2} tokens; at most {context_length - 2} fit "
                f"(CLIP's context of {context_length} includes the start and end tokens)"
            )
        rows.append(ids + [pad_token] * (context_length - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


class TextTower(nn.Module):
    """open_clip's text tower attributes (`token_embedding`, `positional_embedding`, `transformer`, `ln_final`)."""

    def __init__(self, c: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.width))
        act = QuickGELU if c.act == "quick_gelu" else nn.GELU
        self.transformer = Transformer(c.width, c.layers, c.heads, act_layer=act)
        self.ln_final = LayerNorm(c.width)
        if c.projection_dim:  # CLIP's contrastive head; SDXL uses `text_projection` for the pooled embedding
            self.text_projection = nn.Parameter(torch.empty(c.width, c.projection_dim))
            self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))  # in the file, unused here
            nn.init.normal_(self.text_projection, std=c.width**-0.5)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.token_embedding.weight, std=0.02)


@dataclass
class TextConditioning:
    """What the text gives the UNet: per-token features for cross-attention, and (SDXL) one pooled vector."""

    context: torch.Tensor  # (b, context_length, context_dim)
    pooled: torch.Tensor | None = None  # (b, projection_dim): SDXL's pooled bigG embedding; None for SD 1.x/2.x


class TextEncoder(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        if config.act not in ("quick_gelu", "gelu"):
            raise UserError(f"text act {config.act!r} is not supported; use 'quick_gelu' or 'gelu'")
        if config.context_layers is not None and not 1 <= config.context_layers <= config.layers:
            raise ValueError(
                f"text context_layers {config.context_layers} must be between 1 and layers {config.layers}"
            )
        self.config = config
        self.model = TextTower(config)
        clip_tokenizer()  # built (~0.5 s, ~20 MB) with the model, as diffusers loads its tokenizer, not by the first prompt

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return tokenize(prompts, context_length=self.config.context_length, pad_token=self.config.pad_token)

    def forward(self, token_ids: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(b, 77) ids → (b, 77, width) per-token features: the UNet's cross-attention context."""
        return self.features(token_ids, dtype=dtype).context

    def features(self, token_ids: torch.Tensor, *, dtype: torch.dtype | None = None) -> TextConditioning:
        """Context (the output of `context_layers` layers, `ln_final` if `context_norm`) and, with a projection,
        the pooled embedding: `ln_final` of the last layer at the end token, times `text_projection`.
        `dtype`: the compute dtype (None: the weights' dtype); weights are cast to it layer by layer."""
        m, c = self.model, self.config
        dtype = dtype or m.token_embedding.weight.dtype
        n = token_ids.shape[1]
        x = m.token_embedding(token_ids).to(dtype) + m.positional_embedding[:n].to(dtype)
        causal = torch.full((n, n), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        context_layers = c.layers if c.context_layers is None else c.context_layers
        pools = bool(c.projection_dim) or c.pooled_unprojected
        last = c.layers if pools else context_layers  # the pooled embedding needs every layer
        context = None
        for index, block in enumerate(m.transformer.resblocks[:last]):
            x = block(x, attn_mask=causal)
            if index + 1 == context_layers:
                context = m.ln_final(x) if c.context_norm else x
        pooled = None
        if pools:
            # open_clip's "argmax" pooling: the end token 49407 is the largest id, so argmax finds the first EOT
            eot = m.ln_final(x)[torch.arange(x.shape[0], device=x.device), token_ids.argmax(dim=-1)]
            pooled = eot @ m.text_projection.to(dtype) if c.projection_dim else eot
        return TextConditioning(context, pooled)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        device = self.model.token_embedding.weight.device
        return self(self.tokenize(prompts).to(device))


# --- SD 1.x: Hugging Face CLIP names <-> open_clip names, by rule --------------------------------

HF_PREFIX = "cond_stage_model.transformer.text_model."
OC_PREFIX = "cond_stage_model.model."
_HF_TO_OC = {  # per-layer renames; q/k/v are handled separately (concatenated into in_proj)
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_HF_GLOBAL = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_HF_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def hf_clip_to_open_clip(
    state: dict[str, torch.Tensor], *, hf_prefix: str = HF_PREFIX, oc_prefix: str = OC_PREFIX
) -> dict[str, torch.Tensor]:
    """Rename HF CLIP text keys under `hf_prefix` (SD 1.x's by default; SDXL's CLIP-L is
    `conditioner.embedders.0.transformer.text_model.`) to our open_clip layout under `oc_prefix`;
    other keys pass through unchanged."""
    out, qkv = {}, {}
    for key, value in state.items():
        if not key.startswith(hf_prefix):
            out[key] = value
            continue
        rest = key[len(hf_prefix) :]
        if rest in _HF_GLOBAL:
            out[oc_prefix + _HF_GLOBAL[rest]] = value
            continue
        match = _HF_LAYER.match(rest)
        if match is None:
            out[key] = value  # unknown: left for the strict loader to report
            continue
        layer, module, param = match.groups()
        block = f"{oc_prefix}transformer.resblocks.{layer}."
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((block, param), {})[module[-6]] = value
        elif module in _HF_TO_OC:
            out[f"{block}{_HF_TO_OC[module]}.{param}"] = value
        else:
            out[key] = value
    for (block, param), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            missing = sorted({"q", "k", "v"} - set(parts))
            raise KeyError(f"{block}: HF CLIP attention lacks {missing}_proj.{param}")
        out[f"{block}attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def open_clip_to_hf_clip(
    state: dict[str, torch.Tensor], *, hf_prefix: str = HF_PREFIX, oc_prefix: str = OC_PREFIX
) -> dict[str, torch.Tensor]:
    """Inverse of `hf_clip_to_open_clip`: export our HF-layout text weights under the original names."""
    oc_to_hf_global = {v: k for k, v in _HF_GLOBAL.items()}
    oc_to_hf_layer = {v: k for k, v in _HF_TO_OC.items()}
    block = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
    out = {}
    for key, value in state.items():
        if not key.startswith(oc_prefix):
            out[key] = value
            continue
        rest = key[len(oc_prefix) :]
        if rest in oc_to_hf_global:
            out[hf_prefix + oc_to_hf_global[rest]] = value
            continue
        if rest.startswith("transformer.resblocks.") and ".attn.in_proj_" in rest:
            layer = rest.split(".")[2]
            param = "weight" if rest.endswith("weight") else "bias"
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{hf_prefix}encoder.layers.{layer}.self_attn.{name}_proj.{param}"] = part
            continue
        match = block.match(rest)
        if match is None or match.group(2) not in oc_to_hf_layer:
            raise KeyError(f"no HF CLIP name for {key!r}")
        layer, module, param = match.groups()
        out[f"{hf_prefix}encoder.layers.{layer}.{oc_to_hf_layer[module]}.{param}"] = value
    return out
