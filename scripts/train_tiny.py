"""Train the built-in tiny model on the shapes world and write models/weights/tiny.safetensors.

    python scripts/train_tiny.py                      # both phases: the shipped file's recipe, 72 min on an idle
                                                      # 2-core CPU → runs/train_tiny/default/tiny.safetensors
    python scripts/train_tiny.py threads=1            # on a machine shared with other jobs (≈ 110 min)
    python scripts/train_tiny.py device=cuda          # minutes on a GPU
    python scripts/train_tiny.py resume=true          # continue after Ctrl-C / SIGTERM / a crash
    python scripts/train_tiny.py name=quick vae.steps=20 unet.steps=20     # → runs/train_tiny/quick/
    python scripts/train_tiny.py output=models/weights/tiny.safetensors overwrite=true   # replace the built-in model
    python scripts/train_tiny.py arch=mmdit name=tiny_mmdit     # the tiny MM-DiT (issue 33) → runs/train_tiny/tiny_mmdit/
                                                      # tiny_mmdit.safetensors + tiny_mmdit.spiece.model (its T5 tokenizer)

Nothing is overwritten unless asked: a run folder that holds a run must be resumed (resume=true) or left for
another name=, and an existing output file needs overwrite=true. Both are checked before any training.

The library part is p2p/shapes/recipe.py (settings → configs), p2p/shapes/training.py (loop, EMA, checkpoints)
and p2p/shapes/losses.py; this file only wires the config.
"""

from __future__ import annotations

import copy
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

from models.errors import UserError  # noqa: E402
from models.files import atomic_path, write_text  # noqa: E402
from models.flow_loader import save_flow_checkpoint  # noqa: E402
from models.flow_model import FlowModel  # noqa: E402
from models.loader import save_checkpoint  # noqa: E402
from models.stable_diffusion import StableDiffusion  # noqa: E402
from models.t5 import T5Tokenizer  # noqa: E402
from p2p.shapes.flow_training import dit_initialize_, train_flow, train_world_tokenizer  # noqa: E402
from p2p.shapes.recipe import (  # noqa: E402
    ARCHS,
    check_context_length,
    check_output,
    flow_model_config,
    model_config,
    train_config,
)
from p2p.shapes.training import StopRequested, check_run_dir, train  # noqa: E402
from p2p.shapes.world import WorldConfig  # noqa: E402
from scripts._cli import entry_point  # noqa: E402

MAX_FILE_MB = 30  # issue 7: the committed weights stay small


def save_run_config(cfg: DictConfig, run_dir: Path) -> Path:
    """config.yaml for a fresh run; a resume keeps it and adds config-resume-K.yaml (it may change e.g. steps)."""
    path, k = run_dir / "config.yaml", 1
    while path.exists():
        path, k = run_dir / f"config-resume-{k}.yaml", k + 1
    return write_text(path, OmegaConf.to_yaml(cfg, resolve=True))


def output_path(cfg: DictConfig) -> Path:
    """output=null: run_dir/tiny.safetensors (arch=unet) or run_dir/tiny_mmdit.safetensors (arch=mmdit)."""
    if cfg.output is not None:
        return Path(cfg.output)
    return Path(cfg.run_dir) / ("tiny.safetensors" if cfg.arch == "unet" else "tiny_mmdit.safetensors")


def build_model(cfg: DictConfig, settings: dict, world: WorldConfig, run_dir: Path) -> StableDiffusion | FlowModel:
    """The untrained model of the run's arch; tiny_mmdit also gets its T5 tokenizer, trained on the world's
    captions into run_dir/spiece.model (kept on resume)."""
    if cfg.arch == "unet":
        architecture = model_config(
            settings.get("architecture"), world, guidance=cfg.guidance, context_length=cfg.context_length
        )
        torch.manual_seed(settings["seed"])  # the initial weights (after model_config's trial forward)
        return StableDiffusion(architecture)
    architecture = flow_model_config(
        settings.get("architecture"), world, guidance=cfg.guidance, context_length=cfg.context_length
    )
    tokenizer = run_dir / "spiece.model"
    if not tokenizer.exists():
        train_world_tokenizer(tokenizer, world=world)
    torch.manual_seed(settings["seed"])  # the initial weights
    model = FlowModel(architecture)
    dit_initialize_(model.transformer)  # adaLN-Zero: every joint block starts as the identity
    model.t5_tokenizer = T5Tokenizer(tokenizer)
    return model


def export(model: StableDiffusion | FlowModel, output: Path, *, run_dir: Path, overwrite: bool) -> float:
    """fp16 weights with the config in the metadata (tiny_mmdit: SD3's original layout, its tokenizer beside);
    returns the size in MB, refused above MAX_FILE_MB."""
    output.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(model, StableDiffusion):
        save_checkpoint(model.float().cpu(), output, dtype="fp16", overwrite=overwrite)
    else:
        if overwrite:
            output.unlink(missing_ok=True)
        save_flow_checkpoint(copy.deepcopy(model).cpu().half(), output)
        write_bytes(output.with_suffix(".spiece.model"), (run_dir / "spiece.model").read_bytes(), overwrite=overwrite)
    size_mb = output.stat().st_size / 2**20
    if size_mb > MAX_FILE_MB:
        raise RuntimeError(f"{output} is {size_mb:.1f} MB; the shipped model must stay ≤ {MAX_FILE_MB} MB")
    return size_mb


def write_bytes(path: Path, data: bytes, *, overwrite: bool) -> None:
    with atomic_path(path, overwrite=overwrite) as partial:
        Path(partial).write_bytes(data)


@entry_point("train_tiny")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if cfg.arch not in ARCHS:
        raise UserError(f"arch={cfg.arch!r} is unknown; choose one of {ARCHS}")
    settings = OmegaConf.to_container(cfg, resolve=True)
    config, output = train_config(settings), output_path(cfg)
    world = WorldConfig(**config.world)
    check_context_length(int(cfg.context_length), world)
    check_output(output, overwrite=bool(cfg.overwrite))
    check_run_dir(config.run_dir, resume=config.resume)
    if config.device == "cpu":
        torch.set_num_threads(config.threads)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg, settings, world, run_dir).to(config.device)
    save_run_config(cfg, run_dir)

    began = time.time()
    try:
        (train if cfg.arch == "unet" else train_flow)(model, config)
    except StopRequested as stop:
        print(stop)
        sys.exit(1)
    wall_s = time.time() - began

    size_mb = export(model, output, run_dir=run_dir, overwrite=bool(cfg.overwrite))
    summary = {
        "arch": cfg.arch,
        "output": str(output),
        "size_mb": round(size_mb, 2),
        "wall_s_this_run": round(wall_s),
        **(
            {"scale_factor": model.config.scale_factor}
            if cfg.arch == "unet"
            else {"latent_scale": model.config.latent_scale, "latent_shift": model.config.latent_shift}
        ),
        "guidance": model.config.guidance,
        "device": config.device,
        "threads": torch.get_num_threads(),
    }
    write_text(run_dir / "summary.json", json.dumps(summary, indent=2), overwrite=True)  # a resume's replaces
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
