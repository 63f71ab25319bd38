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

The library part is p2p/shapes/recipe.py (settings → configs), p2p/shapes/training.py (loop, EMA, checkpoints)
and p2p/shapes/losses.py; this file only wires the config.
"""

from __future__ import annotations

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

from models.files import write_text  # noqa: E402
from models.loader import save_checkpoint  # noqa: E402
from models.stable_diffusion import StableDiffusion  # noqa: E402
from p2p.shapes.recipe import check_context_length, check_output, model_config, train_config  # noqa: E402
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


@entry_point("train_tiny")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings = OmegaConf.to_container(cfg, resolve=True)
    config, output = train_config(settings), Path(cfg.output)
    world = WorldConfig(**config.world)
    check_context_length(int(cfg.context_length), world)
    architecture = model_config(
        settings.get("architecture"), world, guidance=cfg.guidance, context_length=cfg.context_length
    )
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
    size_mb = output.stat().st_size / 2**20
    if size_mb > MAX_FILE_MB:
        raise RuntimeError(f"{output} is {size_mb:.1f} MB; the shipped model must stay ≤ {MAX_FILE_MB} MB")
    summary = {
        "output": str(output),
        "size_mb": round(size_mb, 2),
        "wall_s_this_run": round(wall_s),
        "scale_factor": model.config.scale_factor,
        "guidance": model.config.guidance,
        "device": config.device,
        "threads": torch.get_num_threads(),
    }
    write_text(run_dir / "summary.json", json.dumps(summary, indent=2), overwrite=True)  # a resume's replaces
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
