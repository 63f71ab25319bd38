"""Strict loading of SD3 / SD3.5 / FLUX.1 diffusers folders into a `FlowModel`, part by part.

An SD3 folder holds `transformer/` (SD3Transformer2DModel), `vae/`, `text_encoder/` (CLIP-L), `text_encoder_2/`
(bigG), `text_encoder_3/` (T5-XXL) and `tokenizer_3/` (T5's `spiece.model`); a FLUX folder `transformer/`
(FluxTransformer2DModel), `vae/`, `text_encoder/` (CLIP-L), `text_encoder_2/` (T5) and `tokenizer_2/`. Each
component's safetensors (the fp16 variant and shards as in `models/diffusers_folder.py`; `.bin` refused) is mapped
onto the SD3 bundle's names that `models/flow_loader.py` reads everything in: the transformers by
`models/diffusers_mmdit.py` / `models/diffusers_flux.py`, the VAE by `models/diffusers_format.py`, the text encoders
(already HF / transformers names) by their prefix. Headers are checked against the model before any tensor is
read; parts are read when sampling asks for them (on a CPU the text encoders are released before the transformer
is read), as for single files. The preset is checked against the folder's `model_index.json` and
`transformer/config.json`: a folder of another model is one line naming both.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.diffusers_config import read_json
from models.diffusers_flux import flux_transformer_to_original
from models.diffusers_folder import weight_files
from models.diffusers_format import rename_modules, vae_modules
from models.diffusers_mmdit import sd3_transformer_to_original
from models.errors import UserError
from models.flow_loader import (
    DECLARED_EXTRA_KEYS,
    FILE_PREFIXES,
    T5_ALIAS,
    FlowFiles,
    _file_key_map,
    assemble,
    original_state_dict,
)
from models.flow_model import FLOW_PRESETS, PARTS, FlowModel, FlowModelConfig
from models.loader import CheckpointError, _is_float, _open, check_state, resolve_device, resolve_dtype
from models.t5 import T5Tokenizer

PIPELINES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
COMPONENTS = {  # part → the folder's component, per family
    "sd3": {
        "transformer": "transformer",
        "vae": "vae",
        "clip_l": "text_encoder",
        "clip_g": "text_encoder_2",
        "t5xxl": "text_encoder_3",
    },
    "flux": {"transformer": "transformer", "vae": "vae", "clip_l": "text_encoder", "t5xxl": "text_encoder_2"},
}
T5_TOKENIZERS = {"sd3": "tokenizer_3", "flux": "tokenizer_2"}
T5_TOKENIZER_FILES = ("spiece.model", "tokenizer.json")


def transformer_fingerprint(config: FlowModelConfig) -> tuple:
    """What tells the released transformers apart, from our config."""
    if config.family == "flux":
        f = config.flux
        return ("flux", f.depth, f.depth_single_blocks, f.hidden_size, f.guidance_embed)
    m = config.mmdit
    return ("sd3", m.depth, m.hidden_size, m.qk_norm, tuple(m.x_self_attn_blocks))


def folder_fingerprint(folder: Path) -> tuple:
    """The same, from the folder's `model_index.json` and `transformer/config.json` (diffusers' names)."""
    pipeline = read_json(folder / "model_index.json").get("_class_name")
    if pipeline not in PIPELINES:
        raise UserError(
            f"{folder}: model_index.json names pipeline {pipeline!r}; flow presets read {sorted(PIPELINES)}"
        )
    t = read_json(folder / "transformer" / "config.json")
    hidden = t["num_attention_heads"] * t["attention_head_dim"]
    if PIPELINES[pipeline] == "flux":
        return ("flux", t["num_layers"], t["num_single_layers"], hidden, bool(t.get("guidance_embeds", False)))
    return ("sd3", t["num_layers"], hidden, t.get("qk_norm") == "rms_norm", tuple(t.get("dual_attention_layers") or ()))


def check_flow_folder(folder: Path, config: FlowModelConfig) -> None:
    """Refuse, in one line naming both, a folder of another family or another released model than `model=`."""
    found = folder_fingerprint(folder)
    names = [name for name, make in FLOW_PRESETS.items() if transformer_fingerprint(make()) == found]
    what = f"model={names[0]}" if names else f"a {found[0].upper()} transformer of no preset's shapes"
    if found[0] != config.family or (config.name in FLOW_PRESETS and config.name not in names):
        raise CheckpointError(f"{folder} holds {what} but model={config.name} was asked for; pass {what}")


def folder_t5_tokenizer(folder: Path, config: FlowModelConfig) -> Path | None:
    tokenizer = folder / T5_TOKENIZERS[config.family]
    return next((tokenizer / name for name in T5_TOKENIZER_FILES if (tokenizer / name).is_file()), None)


def part_to_original(part: str, state: dict[str, torch.Tensor], config: FlowModelConfig) -> dict[str, torch.Tensor]:
    """One component's diffusers / transformers state → the SD3 bundle's names (works on meta tensors)."""
    if part == "transformer":
        if config.family == "flux":
            return flux_transformer_to_original(state, config.flux)
        return sd3_transformer_to_original(state, config.mmdit)
    if part == "vae":
        return rename_modules(state, vae_modules(config.vae), component="vae")
    out = {ours: state[theirs] for ours, theirs in _file_key_map(list(state), part, prefix=FILE_PREFIXES[part]).items()}
    if part == "t5xxl" and T5_ALIAS in out:  # transformers may save the tied copy of `shared.weight` instead of it
        alias = out.pop(T5_ALIAS)
        out.setdefault(PARTS["t5xxl"] + "transformer.shared.weight", alias)
    return {k: v for k, v in out.items() if not any(p.search(k) for p in DECLARED_EXTRA_KEYS)}


class FlowFolder(FlowFiles):
    """`FlowFiles` whose parts come from a diffusers folder's components; `load` / `read_into` are inherited."""

    def __init__(self, config, *, folder: Path, t5_tokenizer=None, dtype, weights_dtype, device, release_text_encoders):
        self.config, self.folder, self.device = config, folder, resolve_device(device)
        self.release_text_encoders = (
            self.device.type == "cpu" if release_text_encoders is None else bool(release_text_encoders)
        )
        self.dtype = resolve_dtype(dtype)
        self.weights_dtype = self.dtype if weights_dtype is None else resolve_dtype(weights_dtype)
        with torch.device("meta"):
            self.expected = {k: tuple(v.shape) for k, v in original_state_dict(FlowModel(config)).items()}
        check_flow_folder(folder, config)
        self.check_memory()
        parts = ("transformer", "vae", *config.text_parts)
        self.sources = {part: self._check(part, folder / COMPONENTS[config.family][part]) for part in parts}
        self.t5_tokenizer = None
        if config.t5:
            path = t5_tokenizer or folder_t5_tokenizer(folder, config)
            if path is None:
                raise UserError(
                    f"{folder / T5_TOKENIZERS[config.family]} has no {' or '.join(T5_TOKENIZER_FILES)}; pass "
                    "model.t5_tokenizer=PATH (or model.t5=false to run without T5)"
                )
            self.t5_tokenizer = T5Tokenizer(Path(path).expanduser())

    def _check(self, part: str, component: Path) -> dict[str, Path]:
        """The component's files, checked: {the folder's key: its file}."""
        where, meta, non_float = {}, {}, []
        for path in weight_files(component, prefer_fp16=self.weights_dtype == torch.float16):
            with _open(path) as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    where[key], meta[key] = path, torch.empty(piece.get_shape(), device="meta")
                    if not _is_float(piece.get_dtype()) and not key.endswith("position_ids"):
                        non_float.append(key)
        shapes = {k: tuple(v.shape) for k, v in part_to_original(part, meta, self.config).items()}
        expected = {k: s for k, s in self.expected.items() if k.startswith(PARTS[part])}
        hint = f"The folder's model_index.json and configs say {folder_fingerprint(self.folder)}."
        check_state(shapes, expected, path=str(component), config_name=self.config.name, hint=hint)
        if non_float:
            raise CheckpointError(f"{component}: tensors that are not floating point: {', '.join(non_float)}")
        return where

    def _build(self, parts: set[str]) -> FlowModel:
        parts = {p for p in parts if p in self.sources}
        state = {}
        for part in sorted(parts):
            raw, by_file = {}, {}
            for key, path in self.sources[part].items():
                by_file.setdefault(path, []).append(key)
            for path, keys in by_file.items():
                with _open(path) as f:
                    raw.update((key, f.get_tensor(key).to(self.weights_dtype)) for key in keys)
            state.update(part_to_original(part, raw, self.config))
            del raw
        return assemble(self.config, parts, state, device=self.device)


def load_flow_folder(
    config: FlowModelConfig,
    *,
    folder,
    t5_tokenizer=None,
    dtype="fp32",
    weights_dtype=None,
    device="cpu",
    release_text_encoders: bool | None = None,
) -> FlowModel:
    """A diffusers SD3 / SD3.5 / FLUX.1 folder as `models.flow_loader.load_flow_model` loads single files."""
    files = FlowFolder(
        config,
        folder=Path(folder),
        t5_tokenizer=t5_tokenizer,
        dtype=dtype,
        weights_dtype=weights_dtype,
        device=device,
        release_text_encoders=release_text_encoders,
    )
    model = files.load(set(config.text_parts) if files.release_text_encoders else set(PARTS))
    model.release_text_encoders_after_encoding = files.release_text_encoders
    return model
