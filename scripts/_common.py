"""What every Hydra script shares: building the model from `cfg.model`, sampler settings from the common
override names (`seed steps guidance negative_prompt height width dtype device`), and saving outputs into
the run's own folder without ever overwriting a file.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image

from models.diffusers_flow import load_flow_folder
from models.diffusers_folder import load_diffusers_folder
from models.errors import MissingFileError, OutputExistsError, UserError, number  # noqa: F401 (number: for scripts)
from models.files import atomic_path, write_text
from models.flow_loader import config_in_file, load_flow_model
from models.flow_model import BUILT_IN_FLOW_MODELS, FLOW_PRESETS, FlowModel, FlowModelConfig, flow_preset
from models.hub import resolve_checkpoint
from models.loader import load_checkpoint
from models.stable_diffusion import ModelConfig, StableDiffusion, preset
from p2p.edit import EDIT_KINDS, BlendSpec, EditSpec
from p2p.flow import FlowSamplerSettings
from p2p.pipeline import SamplerSettings

REPO = Path(__file__).resolve().parents[1]
TINY_WEIGHTS = REPO / "models" / "weights" / "tiny.safetensors"
# the built-in flow models' files (model=tiny_mmdit); each one's T5 tokenizer lies beside it (`tokenizer_beside`)
BUILT_IN_FLOW_WEIGHTS = {name: REPO / "models" / "weights" / f"{name}.safetensors" for name in BUILT_IN_FLOW_MODELS}


MODEL_KEYS = ("name", "checkpoint", "guidance")  # cfg.model keys that are not ModelConfig settings


def model_settings(cfg: DictConfig) -> dict:
    """`model.<setting>=…` overrides of the preset (SDXL: original_size, crop, target_size, …), as a dict."""
    return {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k not in MODEL_KEYS}


# cfg.model keys of the flow presets (conf/model/sd3-medium.yaml …) that name files or loading, not settings
FLOW_MODEL_KEYS = ("name", "checkpoint", "vae", "text_encoders", "t5_tokenizer", "release_text_encoders")


def is_flow(cfg: DictConfig) -> bool:
    """SD3 / SD3.5 / FLUX.1 and tiny_mmdit (rectified flow, `p2p/flow.py`) rather than the DDIM models."""
    return cfg.model.name in FLOW_PRESETS or cfg.model.name in BUILT_IN_FLOW_MODELS


def flow_settings(cfg: DictConfig) -> dict:
    """`model.<setting>=…` of a flow preset (t5, t5_length, guidance, …); null means the preset's value."""
    return {
        k: v
        for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
        if k not in FLOW_MODEL_KEYS and v is not None
    }


def model_config(cfg: DictConfig) -> ModelConfig | FlowModelConfig | None:
    """The preset's config with the run's model settings; None for the tiny model (its file holds its config)."""
    if cfg.model.name == "tiny":
        return None
    if is_flow(cfg):
        return flow_preset(cfg.model.name).with_settings(**flow_settings(cfg))
    return preset(cfg.model.name).with_settings(**model_settings(cfg))


def load_flow(cfg: DictConfig) -> FlowModel:
    """A flow preset's files (checkpoint, FLUX's vae, text encoders, T5 tokenizer) → a FlowModel whose parts are
    read when needed (text encoders first, released on a CPU before the transformer is read)."""
    m = cfg.model
    if m.get("checkpoint") is None and m.name in BUILT_IN_FLOW_WEIGHTS:
        return load_flow_files(cfg, checkpoint=built_in_flow_weights(m.name))
    if m.get("checkpoint") is None:
        raise UserError(
            f"model={m.name} needs its weights: pass model.checkpoint=PATH/TO/FILE.safetensors "
            "(SD3/SD3.5: the single file; FLUX: BFL's transformer file)"
        )
    checkpoint = resolve_checkpoint(m.checkpoint)
    if checkpoint.is_dir():  # a diffusers folder (or a cached repo id): every part and T5's tokenizer inside
        given = OmegaConf.to_container(m.get("text_encoders") or {}, resolve=True)
        if m.get("vae") is not None or any(v is not None for v in given.values()):
            raise UserError(
                f"{checkpoint} is a diffusers folder, which holds its text encoders and VAE; drop "
                "model.text_encoders / model.vae (or pass single files)"
            )
        return load_flow_folder(
            flow_preset(m.name).with_settings(**flow_settings(cfg)),
            folder=checkpoint,
            t5_tokenizer=m.get("t5_tokenizer"),
            dtype=cfg.dtype,
            weights_dtype=cfg.get("weights_dtype"),
            device=cfg.device,
            release_text_encoders=m.get("release_text_encoders"),
        )
    return load_flow_files(cfg, checkpoint=checkpoint)


def built_in_flow_weights(name: str) -> Path:
    """models/weights/<name>.safetensors, or a one-line error saying how to make it."""
    path = BUILT_IN_FLOW_WEIGHTS[name]
    if not path.exists():
        raise MissingFileError(
            f"the built-in model {path} is missing; train it with `python scripts/train_tiny.py arch=mmdit "
            f"name={name}` and export it with output={path.relative_to(REPO)} (models/weights/README.md)"
        )
    return path


def tokenizer_beside(checkpoint: Path) -> Path | None:
    """A built-in flow model's T5 tokenizer, `<name>.spiece.model` beside its `<name>.safetensors`."""
    path = checkpoint.with_suffix(".spiece.model")
    return path if path.exists() else None


def load_flow_files(cfg: DictConfig, *, checkpoint: Path) -> FlowModel:
    m = cfg.model
    config = config_in_file(checkpoint, preset=flow_preset(m.name)).with_settings(**flow_settings(cfg))
    t5_tokenizer = m.get("t5_tokenizer")
    if t5_tokenizer is None and m.name in BUILT_IN_FLOW_MODELS:
        t5_tokenizer = tokenizer_beside(checkpoint)
    text_encoders = OmegaConf.to_container(m.text_encoders, resolve=True) if m.get("text_encoders") else None
    return load_flow_model(
        config,
        checkpoint=checkpoint,
        vae=m.get("vae"),
        text_encoders=text_encoders,
        t5_tokenizer=t5_tokenizer,
        dtype=cfg.dtype,
        weights_dtype=cfg.get("weights_dtype"),
        device=cfg.device,
        release_text_encoders=m.get("release_text_encoders"),
    )


def load_model(cfg: DictConfig, *, flow: bool = False) -> StableDiffusion | FlowModel:
    """`cfg.model` (name, checkpoint, settings) + `cfg.dtype`, `cfg.weights_dtype`, `cfg.device` → a loaded model.
    `flow=True`: the caller also runs the rectified-flow presets (generate, edit, figure, ablate, eval_joint)."""
    if is_flow(cfg):
        if not flow:
            raise UserError(
                f"model={cfg.model.name} runs in generate.py, edit.py, figure.py, ablate.py and eval_joint.py only "
                "for now: use an SD preset (sd15, sd21, sdxl, tiny) here"
            )
        return load_flow(cfg)
    name, checkpoint = cfg.model.name, cfg.model.get("checkpoint")
    if checkpoint is None and name == "tiny":
        checkpoint = TINY_WEIGHTS
        if not checkpoint.exists():
            raise MissingFileError(
                f"the built-in model {checkpoint} is missing; train it with "
                "`python scripts/train_tiny.py output=models/weights/tiny.safetensors` "
                "(72 min on an idle 2-core CPU), or restore it with `git checkout -- models/weights`"
            )
    if checkpoint is None:
        raise UserError(
            f"model={name} needs its weights: pass model.checkpoint=PATH/TO/{name}.safetensors "
            "(single-file safetensors; .ckpt files are refused), a diffusers model folder, or a Hugging Face "
            "repo id already in the local cache"
        )
    # The tiny file carries its own config; SD files get the named preset (their files hold no config). A
    # diffusers folder (or a cached repo id) is checked against the preset; with model=tiny its configs decide.
    path = resolve_checkpoint(checkpoint)
    load = load_diffusers_folder if path.is_dir() else load_checkpoint
    model = load(
        path,
        config=model_config(cfg),
        dtype=cfg.dtype,
        weights_dtype=cfg.get("weights_dtype"),
        device=cfg.device,
    )
    if name == "tiny" and model_settings(cfg):
        model.config = model.config.with_settings(**model_settings(cfg))
    return model


def prompt_list(value, *, minimum: int = 1, name: str = "prompts") -> list[str]:
    """`prompts=...` from the command line → a list of non-empty strings, at least `minimum` of them.

    A bare string is refused rather than read as a list of its characters (`prompts='a red circle'` would
    otherwise give one prompt per letter); an empty list and non-string entries are refused too ("" is a
    prompt: the unconditional one).
    """
    example = 'prompts=\'["a red circle on a black background", "a blue circle on a black background"]\''
    if isinstance(value, str) or not isinstance(value, (list, tuple, ListConfig)):
        raise UserError(f"{name} must be a list of strings, got {value!r}; pass e.g. {example}")
    prompts = list(value)
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise UserError(f"{name} must be a list of strings; {bad!r} are not strings (got {prompts!r}): quote them")
    if len(prompts) < minimum:
        raise UserError(
            f"{name} needs at least {minimum} prompt{'s' if minimum > 1 else ''}, got {len(prompts)} "
            f"({prompts!r}); pass e.g. {example}"
        )
    return prompts


def check_counts(cfg: DictConfig, **minimums: int) -> None:
    """Refuse e.g. n=0 up front (an evaluation over no seeds would fail late, or report nothing)."""
    for name, minimum in minimums.items():
        if not isinstance(cfg[name], int) or cfg[name] < minimum:
            raise UserError(f"{name}={cfg[name]!r} is out of range; use an integer ≥ {minimum}")


DEFAULT_DDIM_STEPS = 50  # `steps=null` for the DDIM models (the flow presets have their own, e.g. 28)


def sampler_settings(cfg: DictConfig, model: StableDiffusion | FlowModel) -> SamplerSettings | FlowSamplerSettings:
    guidance = (
        cfg.guidance
        if cfg.get("guidance") is not None
        else (cfg.model.get("guidance") if cfg.model.get("guidance") is not None else model.config.guidance)
    )
    default_steps = model.config.steps if isinstance(model, FlowModel) else DEFAULT_DDIM_STEPS
    steps = number(default_steps if cfg.get("steps") is None else cfg.steps, name="steps", kind=int)
    if isinstance(model, FlowModel):
        return FlowSamplerSettings(steps=steps, guidance=number(guidance, name="guidance"))
    return SamplerSettings(
        steps=steps, guidance=number(guidance, name="guidance"), eta=number(cfg.get("eta", 0.0), name="eta")
    )


def run_dir() -> Path:
    """The Hydra run's own output folder (named by the time to the microsecond, so runs never share one)."""
    return Path(HydraConfig.get().runtime.output_dir)


def slug(text: str, *, max_length: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:max_length] or "prompt"


RUN_OUTPUTS = ("config.yaml", "*.json", "*.png", "images")  # what our scripts write (Hydra's .hydra/ and log are not)


def check_fresh(out: Path, *, what: str = "a previous run's files", setting: str = "hydra.run.dir") -> Path:
    """The run folder, refused before any work if an earlier run already wrote there (a reused `setting`), so
    a clash is found in a second rather than after the sampling or inversion it would have overwritten."""
    out = Path(out)
    earlier = sorted({p.name for pattern in RUN_OUTPUTS for p in out.glob(pattern)})
    if earlier:
        raise OutputExistsError(
            f"{out} already holds {what} ({', '.join(earlier)}); refusing to overwrite it — "
            f"leave {setting} at its default (a new folder per run) or pick a new one"
        )
    return out


def save_image(image: np.ndarray, path: Path) -> Path:
    """uint8 (H, W, 3) → PNG; refuses to overwrite."""
    with atomic_path(path) as partial:
        Image.fromarray(image).save(partial)
    return Path(path)


def save_config(cfg: DictConfig, out: Path) -> Path:
    """The resolved config beside the images, so every output says how it was made."""
    return write_text(Path(out) / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def edit_inputs(cfg: DictConfig) -> tuple[list[str], EditSpec, BlendSpec | None]:
    """The run's prompts, edit and blend, checked before the model is loaded: a string given as `prompts`
    would otherwise be split into characters, and `blend=local` without words would silently not blend."""
    example = """prompts='["a red circle","a blue circle"]'"""
    prompts = prompt_list(cfg.prompts)
    spec = EditSpec(**OmegaConf.to_container(cfg.edit, resolve=True))
    if spec.kind not in EDIT_KINDS:
        raise UserError(
            f"edit.kind={spec.kind!r} is not supported; choose one of {EDIT_KINDS} "
            "(config groups: edit=replace|refine|reweight|store)"
        )
    if spec.kind != "none" and len(prompts) < 2:
        raise UserError(
            f"edit.kind={spec.kind} needs a source and at least one target prompt ({example}); got "
            f"{prompts} — to sample one prompt and record its attention use edit=store attention=true"
        )
    blend_dict = OmegaConf.to_container(cfg.blend, resolve=True)
    if not blend_dict.get("words") and set(blend_dict) != {"words"}:  # a blend group other than blend=none
        raise UserError(
            "LocalBlend needs its words: blend.words=[circle] (every prompt) or one list per prompt, "
            "blend.words=[[red],[blue]]; or blend=none for no blend"
        )
    blend = BlendSpec(**blend_dict) if blend_dict.get("words") else None
    return prompts, spec, blend
