"""Strict loading of SD3 / SD3.5 single files and FLUX.1's separate files into a `FlowModel`.

Every file is read into one layout, the SD3 bundles' (`models/flow_model.py`):
- SD3/SD3.5 `checkpoint`: `model.diffusion_model.*` + `first_stage_model.*`, optionally `text_encoders.clip_l/clip_g/
  t5xxl.transformer.*` bundled; text encoders not bundled come from `text_encoders={"clip_l": PATH, ...}` (their own
  files, HF/transformers names: `text_model.*`, `shared.weight`, `encoder.*`), which also override bundled ones.
- FLUX `checkpoint`: BFL's transformer (`double_blocks.*`, no prefix) → `model.diffusion_model.`; `vae` (BFL's
  `ae.safetensors`) → `first_stage_model.`; `text_encoders` clip_l and t5xxl as above.
As `models/loader.py` does for SD: pickles refused, every header checked before any tensor is read (names, shapes,
float dtypes; a *declared* set of extra tensors dropped), a file of another family or size refused naming both,
tensors cast to `weights_dtype` one at a time, modules built on the meta device and loaded `strict=True, assign=True`.
Parts are read on demand (`FlowModel.ensure_loaded`), so on a CPU the text encoders can run and be released
before the transformer is read.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.errors import UserError
from models.flow_model import PARTS, TEXT_PARTS, FlowModel, FlowModelConfig
from models.loader import CheckpointError, _is_float, _open, check_state, resolve_device, resolve_dtype
from models.mmdit import CHECKPOINT_PREFIX
from models.t5 import ALIAS_OF_SHARED, T5Tokenizer
from models.text import hf_clip_to_open_clip, open_clip_to_hf_clip

log = logging.getLogger(__name__)

# Tensors released files may carry that the model does not use (../shared/sd-keys/*_extras.txt), in our layout.
DECLARED_EXTRA_KEYS = (
    re.compile(r"^model\.model_sampling\.sigmas$"),  # the reference wrapper's σ table (models/flow.py computes it)
    re.compile(r"^text_encoders\.(clip_l|clip_g|t5xxl)\.logit_scale$"),  # CLIP's contrastive temperature, unused
    re.compile(r"^text_encoders\.(clip_l|clip_g)\.transformer\.text_model\.embeddings\.position_ids$"),  # an arange
    re.compile(r"^text_encoders\.clip_l\.transformer\.text_projection\.weight$"),  # SD3 uses CLIP-L unprojected
)
T5_ALIAS = PARTS["t5xxl"] + "transformer." + ALIAS_OF_SHARED  # tied copy of `shared.weight` some files carry
LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature: our bigG tower has the (unused) parameter
FILE_PREFIXES = {
    "transformer": CHECKPOINT_PREFIX,
    "vae": PARTS["vae"],
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5xxl": "text_encoders.t5xxl.transformer.",
}
CPU_HEADROOM_BYTES = 2 * 2**30  # activations, the VAE decode, the Python process itself
DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
NAMES = {
    "sd3-medium": "SD3-medium",
    "sd35-medium": "SD3.5-medium",
    "sd35-large": "SD3.5-large",
    "flux-dev": "FLUX.1-dev",
    "flux-schnell": "FLUX.1-schnell",
}


FLOW_CONFIG_METADATA_KEY = "p2p_flow_model_config"  # safetensors metadata: a FlowModelConfig as JSON (test files)


def config_in_file(path, *, preset: FlowModelConfig) -> FlowModelConfig:
    """The architecture a file states in its metadata (files this project writes; released files state none),
    else `preset`. A file of the other family is refused naming both."""
    with _open(Path(path).expanduser()) as f:
        text = (f.metadata() or {}).get(FLOW_CONFIG_METADATA_KEY)
    if text is None:
        return preset
    try:
        config = FlowModelConfig.from_json(text)
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(
            f"{path}: its '{FLOW_CONFIG_METADATA_KEY}' metadata is not a flow model config ({err})"
        ) from err
    if config.family != preset.family:
        raise CheckpointError(
            f"{path} holds a {config.family.upper()} model ({config.name}), not one for "
            f"model={preset.name} ({preset.family.upper()})"
        )
    return config


def save_flow_checkpoint(model: FlowModel, path) -> Path:
    """Everything in the SD3 bundle's layout, with the config in the metadata (how tests make original-layout files)."""
    from safetensors.torch import save_file

    from models.files import atomic_path

    state = {k: v.contiguous() for k, v in original_state_dict(model).items()}
    with atomic_path(path) as partial:
        save_file(state, str(partial), metadata={FLOW_CONFIG_METADATA_KEY: model.config.to_json()})
    return Path(path)


def machine_memory_bytes() -> int:
    """Physical memory of this machine (the CPU check's budget)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def part_of(key: str) -> str | None:
    return next((part for part, prefix in PARTS.items() if key.startswith(prefix)), None)


def original_state_dict(model: FlowModel) -> dict[str, torch.Tensor]:
    """Our weights under the SD3 bundle's names (CLIP towers back to HF names; bigG's projection as a Linear)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for part in ("clip_l", "clip_g"):
        ours, file = PARTS[part] + "model.", FILE_PREFIXES[part]
        projection = state.pop(ours + "text_projection", None)
        state.pop(ours + "logit_scale", None)
        state = open_clip_to_hf_clip(state, hf_prefix=file + "text_model.", oc_prefix=ours)
        if projection is not None:  # open_clip: x @ P; HF Linear: x @ W.T, so W = P.T
            state[file + "text_projection.weight"] = projection.T.contiguous()
    return state


def to_module_names(state: dict[str, torch.Tensor], config: FlowModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of `original_state_dict` for the parts present in `state`."""
    for part in ("clip_l", "clip_g"):
        ours, file = PARTS[part] + "model.", FILE_PREFIXES[part]
        if not any(k.startswith(file) for k in state):
            continue
        projection = state.pop(file + "text_projection.weight", None)
        state = hf_clip_to_open_clip(state, hf_prefix=file + "text_model.", oc_prefix=ours)
        if projection is not None:
            state[ours + "text_projection"] = projection.T.contiguous()
            state[ours + "logit_scale"] = torch.tensor(LOGIT_SCALE, dtype=projection.dtype)
    return state


def identify(shapes: dict[str, tuple[int, ...]]) -> tuple[str | None, str]:
    """(preset name or None, what the file is), judged from its names and shapes."""
    p = CHECKPOINT_PREFIX
    if p + "joint_blocks.0.x_block.attn.qkv.weight" in shapes:
        width = shapes[p + "joint_blocks.0.x_block.attn.qkv.weight"][-1]
        if p + "joint_blocks.0.x_block.attn2.qkv.weight" in shapes:
            name = "sd35-medium"
        elif p + "joint_blocks.0.x_block.attn.ln_q.weight" in shapes:
            name = "sd35-large"
        else:
            name = "sd3-medium"
        return name, f"an {NAMES[name]}-like MM-DiT (width {width}, model={name})"
    for prefix in ("", p):
        if prefix + "double_blocks.0.img_attn.qkv.weight" in shapes:
            name = "flux-dev" if prefix + "guidance_in.in_layer.weight" in shapes else "flux-schnell"
            return name, f"a {NAMES[name]} transformer (model={name})"
    if p + "input_blocks.0.0.weight" in shapes:
        return None, "an SD 1.x/2.x/SDXL UNet checkpoint (model=sd15|sd21-base|sd21|sdxl)"
    if "decoder.conv_in.weight" in shapes:
        return None, "a VAE on its own (FLUX's ae.safetensors: pass it as model.vae=PATH)"
    if "shared.weight" in shapes or ALIAS_OF_SHARED in shapes:
        return None, "a T5 encoder on its own (pass it as model.text_encoders.t5xxl=PATH)"
    if any(k.startswith(("text_model.", "embeddings.token_embedding")) for k in shapes):
        return None, "a CLIP text encoder on its own (pass it as model.text_encoders.clip_l=PATH or clip_g=PATH)"
    return None, "not a recognised SD3/SD3.5/FLUX.1 file"


@dataclass
class Source:
    """One file and the parts it supplies: our (SD3 bundle) key → the file's key, and shapes by our key."""

    path: Path
    parts: set[str]
    file_keys: dict[str, str] = field(default_factory=dict)


def _file_key_map(keys: list[str], part: str | None, *, prefix: str) -> dict[str, str]:
    """File keys → our keys: `prefix` in front; standalone CLIP files in transformers ≥ 5.6 names get `text_model.`."""
    out = {}
    for key in keys:
        inner = key
        if part in ("clip_l", "clip_g") and key.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
            inner = "text_model." + key
        out[prefix + inner] = key
    return out


class FlowFiles:
    """The checked headers of a flow model's files; `load(parts)` / `read_into(model, parts)` read tensors."""

    def __init__(
        self,
        config: FlowModelConfig,
        *,
        checkpoint,
        vae=None,
        text_encoders: dict | None = None,
        t5_tokenizer=None,
        dtype="fp32",
        weights_dtype=None,
        device="cpu",
        release_text_encoders=None,
    ):
        self.config, self.device = config, resolve_device(device)
        self.release_text_encoders = (
            self.device.type == "cpu" if release_text_encoders is None else bool(release_text_encoders)
        )
        self.dtype = resolve_dtype(dtype)
        self.weights_dtype = self.dtype if weights_dtype is None else resolve_dtype(weights_dtype)
        text_encoders = {k: v for k, v in dict(text_encoders or {}).items() if v is not None}
        unknown = sorted(set(text_encoders) - set(TEXT_PARTS))
        if unknown:
            raise UserError(f"model.text_encoders has {unknown}; accepted are {list(TEXT_PARTS)} (paths to files)")
        with torch.device("meta"):
            self.expected = {k: tuple(v.shape) for k, v in original_state_dict(FlowModel(config)).items()}
        self.check_memory()  # before any file is opened: FLUX on a small CPU machine stops here, in one line
        self.sources: dict[str, Source] = {}
        self._add_checkpoint(Path(checkpoint).expanduser(), explicit=set(text_encoders))
        if config.family == "flux":
            if vae is None:
                raise UserError(f"model={config.name} needs its autoencoder: pass model.vae=PATH/TO/ae.safetensors")
            self._add(Path(vae).expanduser(), "vae", prefix=PARTS["vae"])
        elif vae is not None:
            self._add(Path(vae).expanduser(), "vae", prefix=PARTS["vae"])
        for part, path in text_encoders.items():
            if part in config.text_parts:
                self._add(Path(path).expanduser(), part, prefix=FILE_PREFIXES[part])
        missing = [p for p in ("transformer", "vae", *config.text_parts) if p not in self.sources]
        if missing:
            hints = [f"model.text_encoders.{p}=PATH/TO/{p}.safetensors" for p in missing]
            raise UserError(
                f"model={config.name}: {', '.join(missing)} not found in {checkpoint}; pass "
                f"{' '.join(hints)}" + (" (or model.t5=false to run without T5)" if "t5xxl" in missing else "")
            )
        self.t5_tokenizer = None
        if config.t5:
            if t5_tokenizer is None:
                raise UserError(
                    f"model={config.name} needs T5's tokenizer: pass model.t5_tokenizer=PATH to its "
                    "spiece.model or tokenizer.json (or model.t5=false to run without T5)"
                )
            self.t5_tokenizer = T5Tokenizer(Path(t5_tokenizer).expanduser())

    # --- headers -------------------------------------------------------------------------------------------
    def _read_header(self, path: Path) -> tuple[dict[str, tuple[int, ...]], list[str]]:
        with _open(path) as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            return (
                {k: tuple(s.get_shape()) for k, s in slices.items()},
                [k for k, s in slices.items() if not _is_float(s.get_dtype())],
            )

    def _add_checkpoint(self, path: Path, *, explicit: set[str]) -> None:
        shapes, non_float = self._read_header(path)
        name, what = identify(shapes)
        family = None if name is None else "flux" if name.startswith("flux") else "sd3"
        if family != self.config.family:
            raise CheckpointError(
                f"{path} is {what}, not a {self.config.family.upper()} file for "
                f"model={self.config.name}; pass the matching model=… or the right file"
            )
        if family == "flux":
            prefix = "" if any(k.startswith(CHECKPOINT_PREFIX) for k in shapes) else CHECKPOINT_PREFIX
            self._check(path, shapes, non_float, {"transformer"}, prefix=prefix, hint=what)
            return
        present = {part_of(k) for k in shapes} - {None}
        parts = {"transformer", "vae"} | ({p for p in present & set(self.config.text_parts)} - explicit)
        ignored = (present & set(TEXT_PARTS)) - parts
        if ignored:
            log.info("%s: bundled %s not used (given as their own files, or model.t5=false)", path, sorted(ignored))
        keep = {k: s for k, s in shapes.items() if part_of(k) not in ignored}
        self._check(path, keep, non_float, parts, prefix="", hint=what)

    def _add(self, path: Path, part: str, *, prefix: str) -> None:
        shapes, non_float = self._read_header(path)
        self._check(path, shapes, non_float, {part}, prefix=prefix, hint=identify(shapes)[1])

    def _check(self, path: Path, shapes, non_float, parts: set[str], *, prefix: str, hint: str) -> None:
        file_keys = {}
        for part in sorted(parts):
            file_keys |= _file_key_map([k for k in shapes if part_of(prefix + k) in (part, None)], part, prefix=prefix)
        ours = {k: shapes[f] for k, f in file_keys.items() if not any(p.search(k) for p in DECLARED_EXTRA_KEYS)}
        if T5_ALIAS in ours:  # the tied alias: stands in for `shared.weight` when that is absent
            alias_shape = ours.pop(T5_ALIAS)
            if PARTS["t5xxl"] + "transformer.shared.weight" not in ours:
                ours[PARTS["t5xxl"] + "transformer.shared.weight"] = alias_shape
                file_keys[PARTS["t5xxl"] + "transformer.shared.weight"] = file_keys[T5_ALIAS]
        expected = {k: s for k, s in self.expected.items() if part_of(k) in parts}
        non_float = [k for k, f in file_keys.items() if f in set(non_float) and k in expected]
        check_state(
            ours,
            expected,
            path=str(path),
            config_name=self.config.name,
            non_float=non_float,
            hint=f"The file looks like {hint}.",
        )
        for part in parts:
            self.sources[part] = Source(
                path, {part}, {k: f for k, f in file_keys.items() if part_of(k) == part and k in expected}
            )

    # --- memory --------------------------------------------------------------------------------------------
    def part_bytes(self, parts) -> int:
        size = DTYPE_BYTES[self.weights_dtype]
        return sum(math.prod(s) * size for k, s in self.expected.items() if part_of(k) in set(parts))

    def check_memory(self) -> None:
        """On a CPU, refuse in one line a model whose weights cannot fit this machine's memory."""
        if self.device.type != "cpu":
            return
        text = self.part_bytes(self.config.text_parts)
        image = self.part_bytes(("transformer", "vae"))
        peak = max(text, image) if self.release_text_encoders else text + image
        total = machine_memory_bytes()
        if peak + CPU_HEADROOM_BYTES > total:
            half = peak * 2 // DTYPE_BYTES[self.weights_dtype]
            instead = (
                "keep the weights in half precision: weights_dtype=bf16 dtype=fp32"
                if half + CPU_HEADROOM_BYTES <= total
                else f"run it on a GPU with ≥ {math.ceil(half / 2**30) + 2} GiB (device=cuda weights_dtype=bf16 "
                "dtype=bf16)"
            )
            raise UserError(
                f"model={self.config.name} does not fit this machine: its weights need {peak / 2**30:.1f} GiB in "
                f"{str(self.weights_dtype).removeprefix('torch.')} (+ ~{CPU_HEADROOM_BYTES // 2**30} GiB to run) and it "
                f"has {total / 2**30:.1f} GiB of RAM; {instead}"
            )

    # --- tensors -------------------------------------------------------------------------------------------
    def load(self, parts) -> FlowModel:
        """A FlowModel with `parts` read from the files; the others are read when `ensure_loaded` asks."""
        model = self._build(set(parts))
        model.t5_tokenizer, model.part_loader, model.compute_dtype = self.t5_tokenizer, self.read_into, self.dtype
        return model

    def read_into(self, model: FlowModel, parts: set[str]) -> None:
        new = self._build(parts)
        if new.model is not None:
            model.model = new.model
        if new.first_stage_model is not None:
            model.first_stage_model = new.first_stage_model
        if new.text_encoders is not None:
            if model.text_encoders is None:
                model.text_encoders = new.text_encoders
            else:
                for part in TEXT_PARTS:
                    if hasattr(new.text_encoders, part):
                        setattr(model.text_encoders, part, getattr(new.text_encoders, part))

    def _build(self, parts: set[str]) -> FlowModel:
        parts = {p for p in parts if p in self.sources}
        state = {}
        for part in sorted(parts):
            source = self.sources[part]
            with _open(source.path) as f:
                for key, file_key in source.file_keys.items():
                    try:
                        state[key] = f.get_tensor(file_key).to(self.weights_dtype)
                    except Exception as err:
                        raise CheckpointError(
                            f"{source.path}: reading tensor {file_key!r} failed ({err}); the file may be truncated"
                        ) from err
        return assemble(self.config, parts, state, device=self.device)


def assemble(config: FlowModelConfig, parts: set[str], state: dict[str, torch.Tensor], *, device) -> FlowModel:
    """A FlowModel of `parts` built on the meta device and given `state` (original names) without a copy."""
    with torch.device("meta"):
        model = FlowModel(config, parts=parts)
    model.load_state_dict(to_module_names(state, config), strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False)


def load_flow_model(
    config: FlowModelConfig,
    *,
    checkpoint,
    vae=None,
    text_encoders: dict | None = None,
    t5_tokenizer=None,
    dtype="fp32",
    weights_dtype=None,
    device="cpu",
    release_text_encoders: bool | None = None,
) -> FlowModel:
    """Check every file, then read the parts: with `release_text_encoders` (default: on a CPU) only the text
    encoders now, the transformer and VAE when sampling asks for them, after the text encoders are released."""
    files = FlowFiles(
        config,
        checkpoint=checkpoint,
        vae=vae,
        text_encoders=text_encoders,
        t5_tokenizer=t5_tokenizer,
        dtype=dtype,
        weights_dtype=weights_dtype,
        device=device,
        release_text_encoders=release_text_encoders,
    )
    model = files.load(set(config.text_parts) if files.release_text_encoders else set(PARTS))
    model.release_text_encoders_after_encoding = files.release_text_encoders
    return model
