"""Strict loading of a diffusers model folder (SD 1.x, SD 2.x, SDXL) into our `StableDiffusion`.

Steps, as `models/loader.py` does for a single file: the folder's configs give the model (`models/diffusers_config.py`;
checked against `model=`) → each component's weight files are chosen (`.safetensors` only: a component holding only
`.bin` pickles is refused, nothing is ever unpickled; one file or shards listed by `*.safetensors.index.json`) → every
header is mapped to the original names (`models/diffusers_format.py`, on meta tensors) and checked against the model,
listing every problem, before any tensor is read → each tensor is read and cast to `weights_dtype` one at a time,
renamed, and assigned into a model built on the meta device: the weights are never held twice.

Variants: with both `<name>.safetensors` (full precision) and `<name>.fp16.safetensors`, the fp16 file is read when
`weights_dtype` is fp16 (the same values as casting the full file, half the bytes to read), the full file otherwise
(bf16 or fp32 storage keeps what fp16 would have rounded away). Sharded weights follow the same rule through
`<name>.safetensors.index.json` / `<name>.safetensors.index.fp16.json`.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from models.diffusers_config import check_tokenizers, config_from_folder, describe, matching_presets
from models.diffusers_format import IGNORED, components, to_original
from models.errors import MissingFileError, UserError
from models.loader import (
    PICKLE_SUFFIXES,
    CheckpointError,
    _is_float,
    _open,
    check_checkpoint,
    resolve_device,
    resolve_dtype,
    warn_if_slow_half_precision,
)
from models.stable_diffusion import ModelConfig, StableDiffusion
from models.text import hf_clip_to_open_clip

# diffusers' models save `diffusion_pytorch_model.*`, transformers' `model.*`; the component's usual one is tried first
WEIGHT_STEMS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "transformer": "diffusion_pytorch_model",
}
FP16_VARIANT = "fp16"
CONVERT_BIN = (
    'convert it once, in an environment you trust: python -c "from diffusers import DiffusionPipeline; '
    "DiffusionPipeline.from_pretrained('{folder}').save_pretrained('{folder}-safetensors', safe_serialization=True)\""
)


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file()


def weight_files(component: Path, *, prefer_fp16: bool) -> list[Path]:
    """The safetensors file(s) holding one component's weights: one file, or the shards an index lists."""
    stems = (WEIGHT_STEMS.get(component.name, "model"), *WEIGHT_STEMS.values(), "model")
    full = [component / f"{stem}.safetensors{index}" for stem in stems for index in ("", ".index.json")]
    half = [
        component / name
        for stem in stems
        for name in (f"{stem}.{FP16_VARIANT}.safetensors", f"{stem}.safetensors.index.{FP16_VARIANT}.json")
    ]
    order = (half + full) if prefer_fp16 else (full + half)
    chosen = next((path for path in order if path.is_file()), None)
    if chosen is None:
        pickles = (
            sorted(p.name for p in component.glob("*") if p.suffix in PICKLE_SUFFIXES) if component.is_dir() else []
        )
        if pickles:
            raise CheckpointError(
                f"{component} holds only PyTorch pickles ({', '.join(pickles)}), which are never unpickled here (that "
                f"can run arbitrary code); {CONVERT_BIN.format(folder=component.parent)}"
            )
        raise MissingFileError(
            f"{component}: no weights; expected {full[0].name} or {half[0].name} (or a sharded "
            f"{full[1].name}); is the download complete?"
        )
    if not chosen.name.endswith(".json"):
        return [chosen]
    try:
        weight_map = json.loads(chosen.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{chosen}: not a sharded-weights index with a 'weight_map' ({err})") from err
    shards = [component / name for name in sorted(set(weight_map.values()))]
    missing = [shard.name for shard in shards if not shard.is_file()]
    if missing:
        raise MissingFileError(f"{chosen} lists shards that are missing: {', '.join(missing)}")
    return shards


class FolderWeights(contextlib.ExitStack):
    """The open safetensors files of every component: headers as meta tensors, tensors read on demand."""

    def __init__(self, folder: Path, config: ModelConfig, *, prefer_fp16: bool):
        super().__init__()
        self.where: dict[str, dict[str, object]] = {}  # component → {diffusers key: open file}
        for component in components(config):
            self.where[component] = {}
            for path in weight_files(folder / component, prefer_fp16=prefer_fp16):
                handle = self.enter_context(_open(path))
                for key in handle.keys():
                    if key in self.where[component]:
                        raise CheckpointError(f"{path}: {key!r} is also in another shard of {folder / component}")
                    self.where[component][key] = handle
        self.config, self.folder = config, folder

    def headers(self) -> dict[str, tuple[int, ...]]:
        """Original-name key → shape, from the headers alone (the mapping runs on meta tensors). Tensors that
        are not floating point (weights must be) are refused here, by their names in the folder."""
        shapes, non_float = {}, []
        for component, where in self.where.items():
            meta = {}
            for key, handle in where.items():
                part = handle.get_slice(key)
                meta[key] = torch.empty(part.get_shape(), device="meta")
                if not _is_float(part.get_dtype()) and not IGNORED.match(key):
                    non_float.append(f"{component}/{key} ({part.get_dtype()})")
            shapes.update((name, tuple(tensor.shape)) for name, tensor in self.original(component, meta).items())
        if non_float:
            raise CheckpointError(f"{self.folder}: tensors that are not floating point: {', '.join(non_float)}")
        return shapes

    def original(self, component: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return to_original(component, state, self.config)

    def read(self, expected: set[str], *, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Every component's tensors, cast to `dtype` one at a time, under the original names in `expected`."""
        state = {}
        for component, where in self.where.items():
            part = {}
            for key, handle in where.items():
                try:
                    part[key] = handle.get_tensor(key).to(dtype)
                except Exception as err:  # safetensors' own error types for truncated files
                    raise CheckpointError(
                        f"{component}: reading {key!r} failed ({err}); a file may be truncated"
                    ) from err
            state.update((k, v) for k, v in self.original(component, part).items() if k in expected)
            del part
        return state


def folder_config(folder: Path, *, config: ModelConfig | None) -> ModelConfig:
    """The config to build: the folder's own when `config` is None, else `config` (the preset `model=` named, with
    its settings) once the folder is checked to be that preset; a mismatch is one line naming both."""
    found = config_from_folder(folder)
    if config is None:
        return found
    if config.name in matching_presets(found) or (config.name == found.name == "diffusers"):
        return config
    hint = (
        f"pass {describe(found)}" if found.name != "diffusers" else "pass model=tiny to take its config from the folder"
    )
    raise CheckpointError(f"{folder} holds {describe(found)} but model={config.name} was asked for; {hint}")


def load_diffusers_folder(
    folder: str | Path,
    *,
    config: ModelConfig | None = None,
    dtype="fp32",
    weights_dtype=None,
    device: str | torch.device = "cpu",
) -> StableDiffusion:
    """Load a diffusers SD 1.x / 2.x / SDXL folder strictly; the arguments mean what they mean for
    `models.loader.load_checkpoint`."""
    folder, device = Path(folder), resolve_device(device)
    dtype = resolve_dtype(dtype)
    weights_dtype = dtype if weights_dtype is None else resolve_dtype(weights_dtype)
    warn_if_slow_half_precision(dtype, device)
    if not is_diffusers_folder(folder):
        names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        singles = [name for name in names if name.endswith(".safetensors")]
        hint = f"; to load a single file in it pass model.checkpoint={folder / singles[0]}" if singles else ""
        listing = ", ".join(names[:12]) or "nothing"
        raise UserError(f"{folder} is not a diffusers model folder (no model_index.json; it holds {listing}){hint}")
    config = folder_config(folder, config=config)
    check_tokenizers(folder, config)
    with torch.device("meta"):
        model = StableDiffusion(config)
    with FolderWeights(folder, config, prefer_fp16=weights_dtype == torch.float16) as weights:
        expected = check_checkpoint(weights.headers(), model, path=str(folder))
        state = weights.read(set(expected), dtype=weights_dtype)
    for hf_prefix, oc_prefix in model.hf_text_prefixes():
        state = hf_clip_to_open_clip(state, hf_prefix=hf_prefix, oc_prefix=oc_prefix)
    model.load_state_dict(state, strict=True, assign=True)
    model.compute_dtype = dtype
    return model.to(device).eval().requires_grad_(False)
