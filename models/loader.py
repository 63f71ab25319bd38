"""Strict loading of single-file safetensors checkpoints (SD 1.x, SD 2.x, and the built-in tiny model).

Steps: refuse pickles → read the header → choose the config (file metadata, explicit override, or
detection from key names and shapes) → drop a *declared* set of ignorable keys → rename SD 1.x text
keys by rule → check names and shapes, listing every problem → build on the meta device and
`load_state_dict(strict=True, assign=True)`, so a 4 GB file is never held twice in memory.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.stable_diffusion import ModelConfig, StableDiffusion, preset
from models.text import HF_PREFIX, hf_clip_to_open_clip, open_clip_to_hf_clip

log = logging.getLogger(__name__)

CONFIG_METADATA_KEY = "p2p_model_config"  # safetensors metadata entry holding ModelConfig as JSON
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}

# Keys real SD files carry that the model does not use. Everything else must match exactly.
IGNORED_KEYS = (
    re.compile(r"^model_ema\."),  # EMA copies and their counters (the -emaonly files already hold EMA weights)
    re.compile(r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|"
               r"log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|"
               r"posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2)$"),
    # ^ DDPM schedule buffers: models/ddim.py computes the schedule from the config
    re.compile(r"^cond_stage_model\.transformer\.text_model\.embeddings\.position_ids$"),  # HF CLIP's arange buffer
    re.compile(r"^cond_stage_model\.model\.(text_projection|logit_scale)$"),  # CLIP's contrastive head, unused
    re.compile(r"^first_stage_model\.loss\."),  # LPIPS/discriminator of the VAE's training loss
)
_TEXT_LAYER = re.compile(r"^cond_stage_model\.model\.transformer\.resblocks\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as the requested model; the message lists every problem."""


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device) -> torch.device:
    """A device string/object → torch.device, refusing names torch does not know and GPUs this machine lacks."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device; use e.g. 'cpu', 'cuda', 'cuda:1' or 'mps'") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but this torch sees no CUDA GPU; use device=cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} was asked for but MPS is not available here; use device=cpu")
    return resolved


def is_ignored(key: str, config: ModelConfig) -> bool:
    """True for declared ignorable keys, including text layers past the ones the config runs (SD 2.x's last)."""
    if any(p.search(key) for p in IGNORED_KEYS):
        return True
    match = _TEXT_LAYER.match(key)
    return bool(match) and int(match.group(1)) >= config.text.layers


def detect_config(shapes: dict[str, tuple[int, ...]], *, path: str = "") -> ModelConfig:
    """Pick a preset from key names and shapes. SD 2.x ε (512) and v (768) have identical weights:
    the file name decides ('768' or '-v' → sd21), else sd21 with a warning to pass `model=sd21-base`."""
    if any(k.startswith(HF_PREFIX) for k in shapes):
        return preset("sd15")  # SD 1.4 and 1.5 share one architecture
    width = shapes.get("cond_stage_model.model.token_embedding.weight", (0, 0))[1]
    if width == 1024:
        name = Path(path).name.lower()
        if "base" in name or "512" in name:
            return preset("sd21-base")
        if not ("768" in name or "-v" in name):
            log.warning("%s: cannot tell SD 2.x 512-ε from 768-v by its weights; assuming sd21 (v). "
                        "Pass model=sd21-base for the ε model.", path)
        return preset("sd21")
    raise CheckpointError(f"{path}: not a recognised SD checkpoint (no SD 1.x or SD 2.x text encoder keys, and no "
                          f"'{CONFIG_METADATA_KEY}' metadata); pass a model config explicitly")


def _open(path: Path):
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: refusing to unpickle a '{path.suffix}' file (it can run arbitrary code). Convert it once, "
            f"in an environment you trust: python -c \"import torch, safetensors.torch as st; "
            f"sd = torch.load('{path.name}', map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
            f"st.save_file({{k: v.contiguous() for k, v in sd.items() if hasattr(v, 'contiguous')}}, "
            f"'{path.stem}.safetensors')\"")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: cannot read as safetensors ({err}); is the file truncated or not a "
                              "safetensors file?") from err


def load_checkpoint(path: str | Path, *, config: ModelConfig | None = None, dtype="fp32",
                    device: str | torch.device = "cpu") -> StableDiffusion:
    """Load a single-file checkpoint strictly. `config` overrides the metadata or detected preset."""
    path, dtype, device = Path(path), resolve_dtype(dtype), resolve_device(device)
    with _open(path) as f:
        metadata = f.metadata() or {}
        keys = list(f.keys())
        if config is None and CONFIG_METADATA_KEY in metadata:
            config = ModelConfig.from_json(metadata[CONFIG_METADATA_KEY])
        if config is None:
            config = detect_config({k: tuple(f.get_slice(k).get_shape()) for k in keys}, path=str(path))
        state = {}
        try:
            for key in keys:
                if not is_ignored(key, config):
                    tensor = f.get_tensor(key)
                    state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        except Exception as err:
            raise CheckpointError(f"{path}: reading tensor {key!r} failed ({err}); the file may be truncated") from err
    if config.text.hf_layout:
        state = hf_clip_to_open_clip(state)

    with torch.device("meta"):
        model = StableDiffusion(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state(state, expected, path=str(path), config_name=config.name)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False)


def check_state(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], *, path: str,
                config_name: str) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or misshaped:
        def listing(title, items, fmt):
            return [f"  {len(items)} {title}:"] + [f"    {fmt(k)}" for k in items[:20]] + (
                [f"    … and {len(items) - 20} more"] if len(items) > 20 else [])
        lines = [f"{path} does not match model config {config_name!r}:"]
        if missing:
            lines += listing("missing keys", missing, str)
        if unexpected:
            lines += listing("unexpected keys", unexpected, str)
        if misshaped:
            lines += listing("mis-shaped keys", misshaped,
                             lambda k: f"{k}: file {tuple(state[k].shape)}, model {expected[k]}")
        raise CheckpointError("\n".join(lines))


def original_state_dict(model: StableDiffusion) -> dict[str, torch.Tensor]:
    """Our weights under the names the original checkpoint uses (SD 1.x text keys back to HF CLIP)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return open_clip_to_hf_clip(state) if model.config.text.hf_layout else state


def save_checkpoint(model: StableDiffusion, path: str | Path, *, dtype="fp32", overwrite: bool = False) -> Path:
    """Save in the original layout with the model config in the metadata (how the tiny model ships)."""
    path, dtype = Path(path), resolve_dtype(dtype)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True or choose another path")
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in original_state_dict(model).items()}
    save_file(state, str(path), metadata={CONFIG_METADATA_KEY: model.config.to_json()})
    return path
