"""Strict loading of single-file safetensors checkpoints (SD 1.x, SD 2.x, SDXL base 1.0, the built-in tiny model).

Steps: refuse pickles → read the header → choose the config (explicit override, file metadata, or
detection from key names and shapes; SDXL refiner, inpainting, LoRA, diffusers-format files are named and
refused) → drop a *declared* set of ignorable keys → check names, shapes and dtypes against the model's
keys in the file's own naming, listing every problem, before reading any tensor → read each tensor and cast
it to `weights_dtype` → rename HF CLIP text keys (SD 1.x, SDXL's CLIP-L) by rule → build on the meta device
and `load_state_dict(strict=True, assign=True)`, so a 7 GB file is never held twice in memory.
The compute dtype (`dtype`) may differ from `weights_dtype`: layers cast their weights in their forward.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.conditioner import CLIP_L_HF_PREFIX
from models.errors import MissingFileError, OutputExistsError, UserError
from models.files import atomic_path
from models.stable_diffusion import ModelConfig, StableDiffusion, preset
from models.text import HF_PREFIX, hf_clip_to_open_clip, open_clip_to_hf_clip

log = logging.getLogger(__name__)

CONFIG_METADATA_KEY = "p2p_model_config"  # safetensors metadata entry holding ModelConfig as JSON
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}

# Keys real SD files carry that the model does not use. Everything else must match exactly.
IGNORED_KEYS = (
    re.compile(r"^model_ema\."),  # EMA copies and their counters (the -emaonly files already hold EMA weights)
    re.compile(
        r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|"
        r"log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|"
        r"posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2)$"
    ),
    # ^ DDPM schedule buffers: models/ddim.py computes the schedule from the config
    re.compile(r"^cond_stage_model\.transformer\.text_model\.embeddings\.position_ids$"),  # HF CLIP's arange buffer
    re.compile(r"^cond_stage_model\.model\.(text_projection|logit_scale)$"),  # CLIP's contrastive head, unused
    re.compile(r"^first_stage_model\.loss\."),  # LPIPS/discriminator of the VAE's training loss
    # SDXL (shared/sd-keys/keys_sdxl_extras.txt): sgm's DiscreteDenoiser sigmas buffer (models/ddim.py computes
    # the schedule) and CLIP-L's arange buffer, which some SDXL files carry and others don't
    re.compile(r"^denoiser\.sigmas$"),
    re.compile(r"^conditioner\.embedders\.0\.transformer\.text_model\.embeddings\.position_ids$"),
)
_TEXT_LAYER = re.compile(r"^cond_stage_model\.model\.transformer\.resblocks\.(\d+)\.")


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded as the requested model; the message lists every problem."""


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, torch.dtype) or dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device) -> torch.device:
    """A device string/object → torch.device, refusing names torch does not know and GPUs this machine lacks."""
    try:
        resolved = torch.device(device.strip().lower() if isinstance(device, str) else device)  # device=CPU
    except (RuntimeError, TypeError) as err:
        raise UserError(f"device {device!r} is not a torch device; use e.g. 'cpu', 'cuda', 'cuda:1' or 'mps'") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} was asked for but this torch sees no CUDA GPU; use device=cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise UserError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r} was asked for but MPS is not available here; use device=cpu")
    return resolved


def is_ignored(key: str, config: ModelConfig) -> bool:
    """True for declared ignorable keys, including text layers past the ones the config runs (SD 2.x's last)."""
    if any(p.search(key) for p in IGNORED_KEYS):
        return True
    match = _TEXT_LAYER.match(key)
    return bool(match) and int(match.group(1)) >= config.text.layers


# SD 2.x 512-ε and 768-v files have identical weights; their public names tell them apart
_SD2_V_NAME = re.compile(r"768|(^|[-_.])v([-_.]|$)")  # v2-1_768-ema-pruned, 768-v-ema, sd21-v
_SD2_BASE_NAME = re.compile(r"base|512")  # v2-1_512-ema-pruned, 512-base-ema
_SD14_NAME = re.compile(r"(^|[^0-9.])1[-_.]?4($|[^0-9])")  # sd-v1-4, sd14 (same weights' layout as 1.5)
SUPPORTED = (
    "SD 1.x (model=sd14|sd15), SD 2.x (model=sd21-base|sd21), SDXL base 1.0 (model=sdxl) and files "
    f"carrying their config in the '{CONFIG_METADATA_KEY}' metadata (the built-in model)"
)
_UNET_INPUT = "model.diffusion_model.input_blocks.0.0.weight"
_IN_CHANNELS = {
    9: "an inpainting checkpoint (image + mask + latent: 9 UNet input channels)",
    8: "an InstructPix2Pix checkpoint (8 UNet input channels)",
    5: "an SD 2 depth-to-image checkpoint (5 UNet input channels)",
}


def describe_unsupported(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """What a file we cannot load is, judged from its keys and shapes (None: it looks like a text-to-image LDM)."""
    keys = list(shapes)
    if _sd_family(shapes) == "sdxl":
        return None
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return (
            "an SD-XL checkpoint other than SDXL base 1.0 (text encoders under 'conditioner.embedders.' but not "
            "base 1.0's CLIP ViT-L + OpenCLIP bigG: the refiner or another variant)"
        )
    if "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight" in shapes:
        return "an SD3/SD3.5 MM-DiT checkpoint: pass model=sd3-medium, sd35-medium or sd35-large"
    if any(k.endswith("double_blocks.0.img_attn.qkv.weight") for k in keys):
        return "a FLUX.1 transformer: pass model=flux-dev or flux-schnell"
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_" in k or "lora_down" in k for k in keys):
        return "a LoRA (low-rank weight differences, not a whole model)"
    if any(
        re.match(r"^((unet|vae|text_encoder|encoder|decoder)\.)?(down_blocks|mid_block|up_blocks)\.", k) for k in keys
    ):
        return "a diffusers-format file (diffusers module names, not the original single-file layout)"
    if _UNET_INPUT in shapes and len(shapes[_UNET_INPUT]) == 4 and shapes[_UNET_INPUT][1] != 4:
        channels = shapes[_UNET_INPUT][1]
        return _IN_CHANNELS.get(channels, f"a UNet with {channels} input channels (text-to-image SD has 4)")
    if any(k.startswith("model.diffusion_model.label_emb.") for k in keys):
        return "a class- or image-conditioned UNet ('label_emb': unCLIP or similar)"
    return None


_SDXL_CLIP_L = CLIP_L_HF_PREFIX + "embeddings.token_embedding.weight"
_SDXL_BIGG = "conditioner.embedders.1.model.token_embedding.weight"


def _sd_family(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """'sd1' (HF CLIP ViT-L/14 text keys), 'sd2' (OpenCLIP ViT-H/14 text keys), 'sdxl' (both of SDXL base 1.0's
    text encoders: CLIP ViT-L/14 under HF names and OpenCLIP ViT-bigG/14) or None."""
    if shapes.get(_SDXL_CLIP_L, (0, 0))[-1] == 768 and shapes.get(_SDXL_BIGG, (0, 0))[-1] == 1280:
        return "sdxl"
    if shapes.get(HF_PREFIX + "embeddings.token_embedding.weight", (0, 0))[-1] == 768:
        return "sd1"
    if shapes.get("cond_stage_model.model.token_embedding.weight", (0, 0))[-1] == 1024:
        return "sd2"
    return None


def detect_config(shapes: dict[str, tuple[int, ...]], *, path: str = "") -> ModelConfig:
    """Pick a preset from key names and shapes. SD 1.4 and 1.5 share one architecture (the file name picks
    the preset's name). SD 2.x ε (512) and v (768) have identical weights: the file name decides ('768' or a
    '-v' part → sd21, 'base' or '512' → sd21-base), else sd21 with a warning to pass `model=sd21-base`."""
    unsupported = describe_unsupported(shapes)
    if unsupported:
        raise CheckpointError(f"{path}: {unsupported}; supported are {SUPPORTED}")
    name = Path(path).name.lower()
    family = _sd_family(shapes)
    if family == "sdxl":
        return preset("sdxl")
    if family == "sd1":
        return preset("sd14" if _SD14_NAME.search(name) else "sd15")
    if family == "sd2":
        is_v, is_base = bool(_SD2_V_NAME.search(name)), bool(_SD2_BASE_NAME.search(name))
        if is_base and not is_v:
            return preset("sd21-base")
        if is_v == is_base:  # neither hint, or both
            log.warning(
                "%s: cannot tell SD 2.x 512-ε from 768-v by its weights or name; assuming sd21 (v). "
                "Pass model=sd21-base for the ε model.",
                path,
            )
        return preset("sd21")
    raise CheckpointError(
        f"{path}: not a recognised SD checkpoint (no SD 1.x, SD 2.x or SDXL text encoder keys, and no "
        f"'{CONFIG_METADATA_KEY}' metadata); supported are {SUPPORTED}"
    )


def _refuse_pickle(path: Path, why: str) -> CheckpointError:
    converted = f"{path.stem}.safetensors" if path.suffix != ".safetensors" else f"{path.stem}-converted.safetensors"
    return CheckpointError(
        f'{path}: {why} Convert it once, in an environment you trust: python -c "import torch, safetensors.torch '
        f"as st; sd = torch.load('{path.name}', map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
        f"st.save_file({{k: v.contiguous() for k, v in sd.items() if hasattr(v, 'contiguous')}}, "
        f"'{converted}')\""
    )


def _open(path: Path):
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _refuse_pickle(path, f"refusing to unpickle a '{path.suffix}' file (it can run arbitrary code).")
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a folder; load_checkpoint reads one .safetensors file (a diffusers model folder: "
            "models.diffusers_folder.load_diffusers_folder, or model.checkpoint=FOLDER in the scripts)"
        )
    if not path.is_file():
        raise MissingFileError(f"checkpoint {str(path)!r} does not exist")
    with open(path, "rb") as file:
        magic = file.read(9)
    # safetensors = an 8-byte little-endian header length, then the JSON header. Its first byte is the length's
    # lowest, which is 0x80 (a pickle's first byte) for 1 file in 256: recognise safetensors first.
    header_length = int.from_bytes(magic[:8], "little")
    is_safetensors = magic[8:9] == b"{" and 2 <= header_length < path.stat().st_size
    if not is_safetensors and (magic[:2] == b"PK" or magic[:1] == b"\x80"):  # a zip (torch.save) or a bare pickle
        raise _refuse_pickle(
            path,
            "this is a PyTorch pickle (torch.save), not safetensors, whatever its name; "
            "it is not unpickled (that can run arbitrary code).",
        )
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(
            f"{path}: cannot read as safetensors ({err}); is the file truncated or not a safetensors file?"
        ) from err


def _config_from_metadata(metadata: dict[str, str], *, path: Path) -> ModelConfig | None:
    if CONFIG_METADATA_KEY not in metadata:
        return None
    try:
        return ModelConfig.from_json(metadata[CONFIG_METADATA_KEY])
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(
            f"{path}: its '{CONFIG_METADATA_KEY}' metadata is not a model config ({err}); "
            "pass model=<preset> to ignore it"
        ) from err


def load_checkpoint(
    path: str | Path,
    *,
    config: ModelConfig | None = None,
    dtype="fp32",
    weights_dtype=None,
    device: str | torch.device = "cpu",
) -> StableDiffusion:
    """Load a single-file checkpoint strictly. `config` overrides the metadata or detected preset.

    `weights_dtype` (None = `dtype`): the dtype the parameters are held in; `dtype`: the one computed in (each
    layer casts its weights to it in its forward). On a CPU, `weights_dtype=fp16 dtype=fp32` halves the memory
    at fp32 speed. Names, shapes and dtypes are checked from the file's header before any tensor is read, so a
    wrong file fails in a second whatever its size; then only the model's own tensors are read, cast one at a
    time: an fp16 file loaded as fp32 (or the reverse) is never held twice.
    """
    path, device = Path(path), resolve_device(device)
    dtype = resolve_dtype(dtype)
    weights_dtype = dtype if weights_dtype is None else resolve_dtype(weights_dtype)
    warn_if_slow_half_precision(dtype, device)
    with _open(path) as f:
        header = {k: f.get_slice(k) for k in f.keys()}
        shapes = {k: tuple(s.get_shape()) for k, s in header.items()}
        config = config or _config_from_metadata(f.metadata() or {}, path=path) or detect_config(shapes, path=str(path))
        with torch.device("meta"):
            model = StableDiffusion(config)
        expected = check_checkpoint(
            shapes, model, path=str(path), non_float=[k for k, s in header.items() if not _is_float(s.get_dtype())]
        )
        state = {}
        try:
            for key in expected:
                state[key] = f.get_tensor(key).to(weights_dtype)
        except Exception as err:
            raise CheckpointError(f"{path}: reading tensor {key!r} failed ({err}); the file may be truncated") from err
    for hf_prefix, oc_prefix in model.hf_text_prefixes():
        state = hf_clip_to_open_clip(state, hf_prefix=hf_prefix, oc_prefix=oc_prefix)
    model.load_state_dict(state, strict=True, assign=True)
    model.compute_dtype = dtype
    return model.to(device).eval().requires_grad_(False)


def warn_if_slow_half_precision(dtype: torch.dtype, device: torch.device) -> None:
    """One warning when half precision would be *computed* on a CPU without native bf16/fp16 matmul."""
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16) and not _cpu_has_native_half():
        log.warning(
            "dtype=%s on this CPU (no AVX512-BF16/AMX) computes 80-500x slower than fp32; the fast setting "
            "is weights_dtype=bf16 dtype=fp32 (half-precision storage, fp32 compute)",
            "bf16" if dtype == torch.bfloat16 else "fp16",
        )


@functools.lru_cache(maxsize=1)
def _cpu_has_native_half() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False  # not Linux: assume not (a warning too many is cheaper than hours of slow sampling)
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16"))


def check_checkpoint(
    shapes: dict[str, tuple[int, ...]], model: StableDiffusion, *, path: str, non_float: list[str] = ()
) -> dict[str, tuple[int, ...]]:
    """Check a file's header (key → shape) against `model` (may be on `meta`) and return the keys to read.

    Compared in the file's own naming (SD 1.x text keys stay HF CLIP's), after dropping the declared
    ignorable keys; raises a CheckpointError listing every problem, with what the file seems to be."""
    expected = {k: tuple(v.shape) for k, v in original_state_dict(model).items()}
    kept = {k: shape for k, shape in shapes.items() if not is_ignored(k, model.config)}
    check_state(
        kept,
        expected,
        path=path,
        config_name=model.config.name,
        non_float=[k for k in non_float if k in expected],
        hint=_hint(shapes, model.config),
    )
    return expected


def _is_float(safetensors_dtype: str) -> bool:
    return safetensors_dtype.startswith("F") or safetensors_dtype == "BF16"  # F16, F32, F64, F8_*, BF16


def _hint(shapes: dict[str, tuple[int, ...]], config: ModelConfig) -> str:
    """A line for the error message: what the file seems to be when it does not match the config."""
    unsupported = describe_unsupported(shapes)
    if unsupported:
        return f"The file looks like {unsupported}; supported are {SUPPORTED}."
    family = _sd_family(shapes)
    if family == "sdxl" and config.text_2 is None:
        return "The file looks like SDXL base 1.0: pass model=sdxl."
    if family == "sd1" and (not config.text.hf_layout or config.text_2 is not None):
        return "The file looks like SD 1.x: pass model=sd15 (or sd14)."
    if family == "sd2" and config.text.width != 1024:
        return "The file looks like SD 2.x: pass model=sd21-base (512, ε) or model=sd21 (768, v)."
    return ""


def check_state(
    shapes: dict[str, tuple[int, ...]],
    expected: dict[str, tuple[int, ...]],
    *,
    path: str,
    config_name: str,
    non_float: list[str] = (),
    hint: str = "",
) -> None:
    """Raise a CheckpointError listing every missing, unexpected, mis-shaped and non-float key."""
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    misshaped = sorted(k for k in set(shapes) & set(expected) if shapes[k] != expected[k])
    non_float = sorted(non_float)
    if missing or unexpected or misshaped or non_float:

        def listing(title, items, fmt):
            return (
                [f"  {len(items)} {title}:"]
                + [f"    {fmt(k)}" for k in items[:20]]
                + ([f"    … and {len(items) - 20} more"] if len(items) > 20 else [])
            )

        lines = [f"{path} does not match model config {config_name!r}:"]
        if missing:
            lines += listing("missing keys", missing, str)
        if unexpected:
            lines += listing("unexpected keys", unexpected, str)
        if misshaped:
            lines += listing("mis-shaped keys", misshaped, lambda k: f"{k}: file {shapes[k]}, model {expected[k]}")
        if non_float:
            lines += listing("keys that are not floating point (weights must be)", non_float, str)
        if hint:
            lines.append(hint)
        raise CheckpointError("\n".join(lines))


def original_state_dict(model: StableDiffusion) -> dict[str, torch.Tensor]:
    """Our weights under the names the original checkpoint uses (SD 1.x's and SDXL's CLIP-L keys back to HF CLIP)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    for hf_prefix, oc_prefix in model.hf_text_prefixes():
        state = open_clip_to_hf_clip(state, hf_prefix=hf_prefix, oc_prefix=oc_prefix)
    return state


def save_checkpoint(model: StableDiffusion, path: str | Path, *, dtype="fp32", overwrite: bool = False) -> Path:
    """Save in the original layout with the model config in the metadata (how the tiny model ships)."""
    path, dtype = Path(path), resolve_dtype(dtype)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; pass overwrite=True or choose another path")
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in original_state_dict(model).items()}
    with atomic_path(path, overwrite=overwrite) as partial:
        save_file(state, str(partial), metadata={CONFIG_METADATA_KEY: model.config.to_json()})
    return path
