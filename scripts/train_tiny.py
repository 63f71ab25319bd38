"""Train the built-in tiny model on the shapes world and write models/weights/tiny.safetensors.

    python scripts/train_tiny.py                      # both phases: the shipped file's recipe, 72 min on an idle
                                                      # 2-core CPU → runs/train_tiny/default/tiny.safetensors
    python scripts/train_tiny.py threads=1            # on a machine shared with other jobs (≈ 110 min)
    python scripts/train_tiny.py device=cuda          # minutes on a GPU
    python scripts/train_tiny.py resume=true          # continue after Ctrl-C / SIGTERM / a crash
    python scripts/train_tiny.py name=quick vae.steps=20 unet.steps=20     # → runs/train_tiny/quick/
    python scripts/train_tiny.py output=models/weights/tiny.safetensors overwrite=true   # replace the built-in model

Nothing is overwritten unless asked: a run folder that holds a run must be resumed (resume=true) or left for
another name=, and an existing output file needs overwrite=true. Both are checked before any training.

The library part is p2p/shapes/training.py (loop, EMA, checkpoints) and p2p/shapes/losses.py; this file only wires the config.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

# before torch loads OpenMP. ACTIVE (threads spin between ops) is what makes 2 threads pay on this small model:
# 0.55 s per UNet step vs 0.84 s PASSIVE and 0.77 s on 1 thread; on a busy CPU use threads=1 (or PASSIVE)
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a fresh clone without installing

from scripts._cli import entry_point  # noqa: E402

from models.errors import UserError, OutputExistsError  # noqa: E402
from models.files import write_text  # noqa: E402
from models.loader import save_checkpoint  # noqa: E402
from models.text import clip_tokenizer  # noqa: E402
from models.stable_diffusion import ModelConfig, StableDiffusion, tiny_config  # noqa: E402
from p2p.shapes.training import PhaseConfig, StopRequested, TrainConfig, check_run_dir, train  # noqa: E402
from p2p.shapes.world import MAX_OBJECTS, WorldConfig, make_caption  # noqa: E402

MAX_FILE_MB = 30  # issue 7: the committed weights stay small
SCRIPT_ONLY_KEYS = ("name", "output", "overwrite", "guidance", "context_length", "architecture")
ARCHITECTURE_PARTS = ("unet", "vae", "text")  # the sub-configs `architecture` may change (models/*.py)


def train_config(cfg: DictConfig) -> TrainConfig:
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in (*SCRIPT_ONLY_KEYS, "hydra"):
        plain.pop(key, None)
    phases = {}
    for phase in ("vae", "unet"):
        try:
            phases[phase] = PhaseConfig(**plain[phase])
        except ValueError as err:  # name the override the user typed: vae.steps=-1, not steps=-1
            raise UserError(f"{phase}.{err}") from None
    return TrainConfig(**{**plain, **phases, "world": plain.get("world") or {}})


def model_config(cfg: DictConfig, world: WorldConfig) -> ModelConfig:
    """`tiny_config()` with the run's `architecture` overrides, guidance and context length, at the world's size.

    `architecture` = {unet: {...}, vae: {...}, text: {...}} with the fields of UNetConfig, VAEConfig and
    TextConfig, e.g. `'architecture={vae: {ch_mult: [1,2]}}'` for an f = 2 VAE (16×16 latents at 32 px).
    Unknown parts or fields are named before any training; the model is built once here, so a shape that does
    not fit fails now too (one forward pass at the world's size)."""
    config = dataclasses.asdict(tiny_config())
    overrides = OmegaConf.to_container(cfg.architecture, resolve=True) if cfg.get("architecture") else {}
    if not isinstance(overrides, dict):
        raise UserError(f"architecture={overrides!r} must be a mapping like {{unet: {{model_channels: 64}}}}")
    for part, values in overrides.items():
        if part not in ARCHITECTURE_PARTS or not isinstance(values, dict):
            raise UserError(f"architecture.{part}={values!r}: choose a mapping for one of {ARCHITECTURE_PARTS}")
        unknown = sorted(set(values) - set(config[part]))
        if unknown:
            raise UserError(f"architecture.{part} has no field(s) {unknown}; it has {sorted(config[part])}")
        config[part].update(values)
    config.update(image_size=world.image_size, guidance=float(cfg.guidance))
    config["text"]["context_length"] = int(cfg.context_length)
    try:
        result = ModelConfig.from_dict(config)
        if result.image_size % result.latent_factor:
            raise UserError(f"the world's {result.image_size} px images do not divide by the VAE's factor "
                             f"{result.latent_factor}")
        with torch.no_grad():  # one forward through every part at the world's size
            model = StableDiffusion(result)
            latents = model.encode_images(torch.zeros(1, 3, world.image_size, world.image_size))
            model.unet(latents, torch.zeros(1, dtype=torch.long), model.encode_prompts([""]))
    except (TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"architecture={overrides}: {err}") from None
    return result


def check_output(output: Path, *, overwrite: bool) -> None:
    """Before any training: a finished model is never replaced unless the user says so."""
    if output.exists() and not overwrite:
        raise OutputExistsError(f"output={output} exists; pass overwrite=true to replace it, or choose another output=")
    if output.suffix != ".safetensors":
        raise UserError(f"output={output} must end in .safetensors (the only format the loader reads)")


def save_run_config(cfg: DictConfig, run_dir: Path) -> Path:
    """config.yaml for a fresh run; a resume keeps it and adds config-resume-K.yaml (it may change e.g. steps)."""
    path, k = run_dir / "config.yaml", 1
    while path.exists():
        path, k = run_dir / f"config-resume-{k}.yaml", k + 1
    return write_text(path, OmegaConf.to_yaml(cfg, resolve=True))


def check_context_length(context_length: int, world: WorldConfig) -> None:
    """Refuse, before any training, a text context too short for the world's longest caption."""
    def longest(words):
        return max(words, key=lambda w: len(clip_tokenizer().encode(w)))
    caption = make_caption([(longest(world.colors), longest(world.shapes))] * MAX_OBJECTS,
                           background=longest(world.backgrounds))
    needed = len(clip_tokenizer().encode(caption)) + 2  # + start and end tokens
    if not needed <= context_length <= 77:
        raise UserError(f"context_length={context_length}: the world's longest caption ({caption!r}) needs {needed} "
                         f"positions with the start and end tokens; choose {needed}..77 (CLIP's maximum)")


@entry_point("train_tiny")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config, output = train_config(cfg), Path(cfg.output)
    world = WorldConfig(**config.world)
    check_context_length(int(cfg.context_length), world)
    architecture = model_config(cfg, world)
    check_output(output, overwrite=bool(cfg.overwrite))
    check_run_dir(config.run_dir, resume=config.resume)
    if config.device == "cpu":
        torch.set_num_threads(config.threads)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_run_config(cfg, run_dir)

    torch.manual_seed(config.seed)  # the initial weights
    model = StableDiffusion(architecture).to(config.device)
    began = time.time()
    try:
        train(model, config)
    except StopRequested as stop:
        print(stop)
        sys.exit(1)
    wall_s = time.time() - began

    output.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model.float().cpu(), output, dtype="fp16", overwrite=bool(cfg.overwrite))
    size_mb = output.stat().st_size / 2 ** 20
    if size_mb > MAX_FILE_MB:
        raise RuntimeError(f"{output} is {size_mb:.1f} MB; the shipped model must stay ≤ {MAX_FILE_MB} MB")
    summary = {"output": str(output), "size_mb": round(size_mb, 2), "wall_s_this_run": round(wall_s),
               "scale_factor": model.config.scale_factor, "guidance": model.config.guidance,
               "device": config.device, "threads": torch.get_num_threads()}
    write_text(run_dir / "summary.json", json.dumps(summary, indent=2), overwrite=True)  # a resume's replaces
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
