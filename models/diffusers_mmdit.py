"""diffusers' `SD3Transformer2DModel` names → the original SD3 / SD3.5 single-file names (`models/mmdit.py`).

Written from the architecture, as the inverse of diffusers' `convert_sd3_transformer_checkpoint_to_diffusers`:
- each joint block's image stream (`x_block`) is diffusers' `attn.to_q/to_k/to_v` (fused here into `attn.qkv`),
  `attn.to_out.0` (`attn.proj`), `norm1.linear` (`adaLN_modulation.1`), `ff.net.0.proj` / `ff.net.2` (`mlp.fc1/2`),
  and SD3.5's `attn.norm_q/norm_k` (`attn.ln_q/ln_k`); the text stream (`context_block`) is the same with
  `add_q_proj…`, `to_add_out`, `norm1_context`, `ff_context`, `norm_added_q/k`; SD3.5-medium's image-only
  `attn2` keeps its name;
- the last block's text stream is `pre_only` (no proj, no MLP): its 2 modulation vectors, and the final layer's,
  are stored (shift, scale) in the original and (scale, shift) by diffusers (`AdaLayerNormContinuous`): swapped.
A key the table does not know comes out as `transformer/<key>`, so the strict check lists it by its own name.
"""

from __future__ import annotations

import torch

from models.mmdit import CHECKPOINT_PREFIX, MMDiTConfig

SWAPPED = "swap"  # (scale, shift) ↔ (shift, scale) halves
PARAMS = ("weight", "bias")


def mmdit_modules(c: MMDiTConfig) -> tuple[dict[str, tuple[str, str | None]], dict[str, tuple[str, ...]]]:
    """({diffusers module: (our module, transform)}, {our fused qkv module: its diffusers q, k, v modules})."""
    renames = {
        "pos_embed.proj": ("x_embedder.proj", None),
        "time_text_embed.timestep_embedder.linear_1": ("t_embedder.mlp.0", None),
        "time_text_embed.timestep_embedder.linear_2": ("t_embedder.mlp.2", None),
        "time_text_embed.text_embedder.linear_1": ("y_embedder.mlp.0", None),
        "time_text_embed.text_embedder.linear_2": ("y_embedder.mlp.2", None),
        "context_embedder": ("context_embedder", None),
        "proj_out": ("final_layer.linear", None),
        "norm_out.linear": ("final_layer.adaLN_modulation.1", SWAPPED),
    }
    fused = {}
    for i in range(c.depth):
        last = i == c.depth - 1
        x, txt, d = f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block", f"transformer_blocks.{i}"
        fused[f"{x}.attn.qkv"] = tuple(f"{d}.attn.to_{n}" for n in "qkv")
        fused[f"{txt}.attn.qkv"] = tuple(f"{d}.attn.add_{n}_proj" for n in "qkv")
        renames[f"{d}.attn.to_out.0"] = (f"{x}.attn.proj", None)
        renames[f"{d}.norm1.linear"] = (f"{x}.adaLN_modulation.1", None)
        renames[f"{d}.norm1_context.linear"] = (f"{txt}.adaLN_modulation.1", SWAPPED if last else None)
        renames[f"{d}.ff.net.0.proj"] = (f"{x}.mlp.fc1", None)
        renames[f"{d}.ff.net.2"] = (f"{x}.mlp.fc2", None)
        if not last:  # the text stream of the last block is pre_only
            renames[f"{d}.attn.to_add_out"] = (f"{txt}.attn.proj", None)
            renames[f"{d}.ff_context.net.0.proj"] = (f"{txt}.mlp.fc1", None)
            renames[f"{d}.ff_context.net.2"] = (f"{txt}.mlp.fc2", None)
        if c.qk_norm:
            for ours, theirs in (("ln_q", "norm_q"), ("ln_k", "norm_k")):
                renames[f"{d}.attn.{theirs}"] = (f"{x}.attn.{ours}", None)
                renames[f"{d}.attn.{theirs.replace('norm_', 'norm_added_')}"] = (f"{txt}.attn.{ours}", None)
        if i in c.x_self_attn_blocks:
            fused[f"{x}.attn2.qkv"] = tuple(f"{d}.attn2.to_{n}" for n in "qkv")
            renames[f"{d}.attn2.to_out.0"] = (f"{x}.attn2.proj", None)
            if c.qk_norm:
                renames[f"{d}.attn2.norm_q"] = (f"{x}.attn2.ln_q", None)
                renames[f"{d}.attn2.norm_k"] = (f"{x}.attn2.ln_k", None)
    return renames, fused


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def sd3_transformer_to_original(state: dict[str, torch.Tensor], config: MMDiTConfig) -> dict[str, torch.Tensor]:
    """diffusers' SD3 transformer state → `model.diffusion_model.*` names (works on meta tensors too)."""
    renames, fused = mmdit_modules(config)
    state, out = dict(state), {}
    if "pos_embed.pos_embed" in state:
        out[CHECKPOINT_PREFIX + "pos_embed"] = state.pop("pos_embed.pos_embed")
    for ours, (q, k, v) in fused.items():
        for param in PARAMS:
            parts = [state.pop(f"{m}.{param}", None) for m in (q, k, v)]
            if all(p is not None for p in parts):
                out[f"{CHECKPOINT_PREFIX}{ours}.{param}"] = torch.cat(parts, dim=0)
            else:  # a part is missing: keep what is there under diffusers' names for the strict check to list
                out.update((f"transformer/{m}.{param}", p) for m, p in zip((q, k, v), parts) if p is not None)
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if module not in renames:
            out[f"transformer/{key}"] = value
            continue
        ours, transform = renames[module]
        out[f"{CHECKPOINT_PREFIX}{ours}.{param}"] = swap_halves(value) if transform == SWAPPED else value
    return out
