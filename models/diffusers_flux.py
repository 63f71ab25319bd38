"""diffusers' `FluxTransformer2DModel` names → Black Forest Labs' original FLUX.1 names (`models/flux.py`).

Written from the architecture, as the inverse of diffusers' `convert_flux_transformer_checkpoint_to_diffusers`:
- double-stream block N (`transformer_blocks.N`): the image stream's `attn.to_q/to_k/to_v` fuse into `img_attn.qkv`,
  `attn.to_out.0` = `img_attn.proj`, `attn.norm_q/norm_k.weight` = `img_attn.norm.query_norm/key_norm.scale`,
  `norm1.linear` = `img_mod.lin`, `ff.net.0.proj` / `ff.net.2` = `img_mlp.0` / `img_mlp.2`; the text stream is the
  same with `add_q_proj…`, `to_add_out`, `norm_added_q/k`, `norm1_context`, `ff_context` → `txt_*`;
- single-stream block N (`single_transformer_blocks.N`): `attn.to_q/to_k/to_v` and `proj_mlp` fuse into `linear1`
  (q | k | v | mlp-in), `proj_out` = `linear2`, `norm.linear` = `modulation.lin`, `attn.norm_q/k` = `norm.*_norm`;
- the embedders (`x_embedder` = `img_in`, `context_embedder` = `txt_in`, `time_text_embed.timestep_embedder /
  text_embedder / guidance_embedder.linear_1/2` = `time_in / vector_in / guidance_in.in_layer/out_layer`) and the
  final layer, whose modulation diffusers stores (scale, shift) and BFL (shift, scale): swapped.
Keys come out under `model.diffusion_model.` (the SD3-bundle layout `models/flow_loader.py` reads everything in);
a key the table does not know comes out as `transformer/<key>`.
"""

from __future__ import annotations

import torch

from models.diffusers_mmdit import PARAMS, SWAPPED, swap_halves
from models.flux import FluxConfig
from models.mmdit import CHECKPOINT_PREFIX

NORM_SCALE = {"weight": "scale"}  # diffusers' RMSNorm `weight` is BFL's `scale`
EMBEDDERS = {"timestep_embedder": "time_in", "text_embedder": "vector_in", "guidance_embedder": "guidance_in"}


def flux_modules(c: FluxConfig) -> tuple[dict[str, tuple[str, str | None, dict]], dict[str, tuple[str, ...]]]:
    """({diffusers module: (our module, transform, param renames)}, {our fused module: its diffusers parts})."""
    renames = {
        "x_embedder": ("img_in", None, {}),
        "context_embedder": ("txt_in", None, {}),
        "proj_out": ("final_layer.linear", None, {}),
        "norm_out.linear": ("final_layer.adaLN_modulation.1", SWAPPED, {}),
    }
    for theirs, ours in EMBEDDERS.items():
        if theirs != "guidance_embedder" or c.guidance_embed:
            renames[f"time_text_embed.{theirs}.linear_1"] = (f"{ours}.in_layer", None, {})
            renames[f"time_text_embed.{theirs}.linear_2"] = (f"{ours}.out_layer", None, {})
    fused = {}
    for i in range(c.depth):
        d, o = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for stream, q, out, norm, ff, added in (
            ("img", "to_{}", "to_out.0", "norm1", "ff", "norm_{}"),
            ("txt", "add_{}_proj", "to_add_out", "norm1_context", "ff_context", "norm_added_{}"),
        ):
            fused[f"{o}.{stream}_attn.qkv"] = tuple(f"{d}.attn.{q.format(n)}" for n in "qkv")
            renames[f"{d}.attn.{out}"] = (f"{o}.{stream}_attn.proj", None, {})
            renames[f"{d}.attn.{added.format('q')}"] = (f"{o}.{stream}_attn.norm.query_norm", None, NORM_SCALE)
            renames[f"{d}.attn.{added.format('k')}"] = (f"{o}.{stream}_attn.norm.key_norm", None, NORM_SCALE)
            renames[f"{d}.{norm}.linear"] = (f"{o}.{stream}_mod.lin", None, {})
            renames[f"{d}.{ff}.net.0.proj"] = (f"{o}.{stream}_mlp.0", None, {})
            renames[f"{d}.{ff}.net.2"] = (f"{o}.{stream}_mlp.2", None, {})
    for i in range(c.depth_single_blocks):
        d, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        fused[f"{o}.linear1"] = (*(f"{d}.attn.to_{n}" for n in "qkv"), f"{d}.proj_mlp")
        renames[f"{d}.proj_out"] = (f"{o}.linear2", None, {})
        renames[f"{d}.norm.linear"] = (f"{o}.modulation.lin", None, {})
        renames[f"{d}.attn.norm_q"] = (f"{o}.norm.query_norm", None, NORM_SCALE)
        renames[f"{d}.attn.norm_k"] = (f"{o}.norm.key_norm", None, NORM_SCALE)
    return renames, fused


def flux_transformer_to_original(state: dict[str, torch.Tensor], config: FluxConfig) -> dict[str, torch.Tensor]:
    """diffusers' FLUX transformer state → `model.diffusion_model.*` BFL names (works on meta tensors too)."""
    renames, fused = flux_modules(config)
    state, out = dict(state), {}
    for ours, modules in fused.items():
        for param in PARAMS:
            parts = [state.pop(f"{m}.{param}", None) for m in modules]
            if all(p is not None for p in parts):
                out[f"{CHECKPOINT_PREFIX}{ours}.{param}"] = torch.cat(parts, dim=0)
            else:  # a part is missing (or bias-free q/k/v): the strict check lists what is there by its own name
                out.update((f"transformer/{m}.{param}", p) for m, p in zip(modules, parts) if p is not None)
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if module not in renames:
            out[f"transformer/{key}"] = value
            continue
        ours, transform, params = renames[module]
        out[f"{CHECKPOINT_PREFIX}{ours}.{params.get(param, param)}"] = (
            swap_halves(value) if transform == SWAPPED else value
        )
    return out
