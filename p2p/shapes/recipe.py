"""What a training run of the built-in model builds, from its settings as plain dicts: the TrainConfig of
`p2p.shapes.training`, the model's architecture (`tiny_config()` with the run's overrides) — each checked before
any training, naming the setting a user typed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from models.errors import OutputExistsError, UserError
from models.flow_model import FlowModel, FlowModelConfig, tiny_mmdit_config
from models.stable_diffusion import ModelConfig, StableDiffusion, tiny_config
from models.text import clip_tokenizer
from p2p.shapes.training import PhaseConfig, TrainConfig
from p2p.shapes.world import MAX_OBJECTS, WorldConfig, make_caption

SCRIPT_ONLY_KEYS = ("name", "output", "overwrite", "guidance", "context_length", "architecture", "arch")
ARCHITECTURE_PARTS = ("unet", "vae", "text")  # the sub-configs `architecture` may change (models/*.py)
FLOW_ARCHITECTURE_PARTS = ("mmdit", "vae", "clip_l", "clip_g", "t5_encoder")  # arch=mmdit: FlowModelConfig's
ARCHS = ("unet", "mmdit")  # arch=unet: the tiny UNet (issue 7); arch=mmdit: tiny_mmdit (issue 33)


def train_config(settings: dict) -> TrainConfig:
    """The run's resolved settings (a plain dict) → TrainConfig; the script-only keys are left out."""
    plain = {k: v for k, v in settings.items() if k not in (*SCRIPT_ONLY_KEYS, "hydra")}
    phases = {}
    for phase in ("vae", "unet", "mmdit"):
        if phase not in plain:
            continue
        try:
            phases[phase] = PhaseConfig(**plain[phase])
        except ValueError as err:  # name the override the user typed: vae.steps=-1, not steps=-1
            raise UserError(f"{phase}.{err}") from None
    return TrainConfig(**{**plain, **phases, "world": plain.get("world") or {}})


def model_config(overrides: dict | None, world: WorldConfig, *, guidance: float, context_length: int) -> ModelConfig:
    """`tiny_config()` with the run's `architecture` overrides, guidance and context length, at the world's size.

    `architecture` = {unet: {...}, vae: {...}, text: {...}} with the fields of UNetConfig, VAEConfig and
    TextConfig, e.g. `'architecture={vae: {ch_mult: [1,2]}}'` for an f = 2 VAE (16×16 latents at 32 px).
    Unknown parts or fields are named before any training; the model is built once here, so a shape that does
    not fit fails now too (one forward pass at the world's size)."""
    config = dataclasses.asdict(tiny_config())
    overrides = {} if overrides is None else overrides
    if not isinstance(overrides, dict):
        raise UserError(f"architecture={overrides!r} must be a mapping like {{unet: {{model_channels: 64}}}}")
    for part, values in overrides.items():
        if part not in ARCHITECTURE_PARTS or not isinstance(values, dict):
            raise UserError(f"architecture.{part}={values!r}: choose a mapping for one of {ARCHITECTURE_PARTS}")
        unknown = sorted(set(values) - set(config[part]))
        if unknown:
            raise UserError(f"architecture.{part} has no field(s) {unknown}; it has {sorted(config[part])}")
        config[part].update(values)
    config.update(image_size=world.image_size, guidance=float(guidance))
    config["text"]["context_length"] = int(context_length)
    try:
        result = ModelConfig.from_dict(config)
        if result.image_size % result.latent_factor:
            raise UserError(
                f"the world's {result.image_size} px images do not divide by the VAE's factor {result.latent_factor}"
            )
        with torch.no_grad():  # one forward through every part at the world's size
            model = StableDiffusion(result)
            latents = model.encode_images(torch.zeros(1, 3, world.image_size, world.image_size))
            model.unet(latents, torch.zeros(1, dtype=torch.long), model.encode_prompts([""]))
    except (TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"architecture={overrides}: {err}") from None
    return result


def check_overrides(overrides, config: dict, parts: tuple[str, ...]) -> dict:
    """`architecture` overrides checked against the config dict's parts and fields; returns them (a dict)."""
    overrides = {} if overrides is None else overrides
    if not isinstance(overrides, dict):
        raise UserError(f"architecture={overrides!r} must be a mapping like {{{parts[0]}: {{depth: 4}}}}")
    for part, values in overrides.items():
        if part not in parts or not isinstance(values, dict):
            raise UserError(f"architecture.{part}={values!r}: choose a mapping for one of {parts}")
        unknown = sorted(set(values) - set(config[part]))
        if unknown:
            raise UserError(f"architecture.{part} has no field(s) {unknown}; it has {sorted(config[part])}")
    return overrides


def flow_model_config(
    overrides: dict | None, world: WorldConfig, *, guidance: float, context_length: int
) -> FlowModelConfig:
    """`tiny_mmdit_config()` with the run's `architecture` overrides ({mmdit: {...}, vae: {...}, clip_l: {...},
    clip_g: {...}, t5_encoder: {...}}), guidance and CLIP context length, at the world's image size; built and
    run once at that size, so a shape that does not fit fails before any training."""
    config = dataclasses.asdict(tiny_mmdit_config())
    for part, values in check_overrides(overrides, config, FLOW_ARCHITECTURE_PARTS).items():
        config[part].update(values)
    config.update(image_size=world.image_size, guidance=float(guidance))
    for part in ("clip_l", "clip_g"):
        config[part]["context_length"] = int(context_length)
    config["mmdit"]["clip_text_positions"] = int(context_length)
    try:
        result = FlowModelConfig.from_json(json.dumps(config))
        result.check_image_size(height=world.image_size, width=world.image_size)
        with torch.no_grad():  # one forward through the VAE and the transformer at the world's size
            model = FlowModel(result)
            z = model.vae.encode(torch.zeros(1, 3, world.image_size, world.image_size)).mean
            text = result.mmdit.context_dim
            model.transformer(
                z,
                timesteps=torch.zeros(1),
                context=torch.zeros(1, 4, text),
                pooled=torch.zeros(1, result.mmdit.pooled_dim),
            )
    except (TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"architecture={overrides}: {err}") from None
    return result


def check_context_length(context_length: int, world: WorldConfig) -> None:
    """Refuse, before any training, a text context too short for the world's longest caption."""

    def longest(words):
        return max(words, key=lambda w: len(clip_tokenizer().encode(w)))

    caption = make_caption(
        [(longest(world.colors), longest(world.shapes))] * MAX_OBJECTS, background=longest(world.backgrounds)
    )
    needed = len(clip_tokenizer().encode(caption)) + 2  # + start and end tokens
    if not needed <= context_length <= 77:
        raise UserError(
            f"context_length={context_length}: the world's longest caption ({caption!r}) needs {needed} "
            f"positions with the start and end tokens; choose {needed}..77 (CLIP's maximum)"
        )


def check_output(output: Path, *, overwrite: bool) -> None:
    """Before any training: a finished model is never replaced unless the user says so."""
    if output.exists() and not overwrite:
        raise OutputExistsError(f"output={output} exists; pass overwrite=true to replace it, or choose another output=")
    if output.suffix != ".safetensors":
        raise UserError(f"output={output} must end in .safetensors (the only format the loader reads)")
