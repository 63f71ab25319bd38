"""Benchmark: what P2P editing costs over plain sampling, and what the reference's scheme costs over ours.

    python scripts/bench.py                                   # built-in model, 50 steps
    python scripts/bench.py model=sd15 random_weights=true height=512 width=512 steps=2 device=cpu

On one UNet and the same prompts and seed, each scheme runs in its own subprocess (so peak memory is its own):
  (a) plain  — batched sampling of the prompts, fused attention everywhere;
  (b) p2p    — our edit (replace, cross 0.8, self 0.4): maps materialised only where edited;
  (c) reference — the official code's scheme: explicit softmax in every layer, every step, and a store of all
      maps with ≤ (latent/2)² queries, heads kept, summed every step — plus the same edit.
Prints seconds and peak extra memory of each, and the ratios (b)/(a) (target ≤ 1.10) and (c)/(b) (target ≥ 2).

    python scripts/bench.py model=sd15 random_weights=true diffusers=true height=256 width=256 steps=3 repeats=3

`diffusers=true` (issue 26, `pip install -e '.[bench]'`): the same file in diffusers' own pipeline as (1), then
(2) plain, (3) p2p, (4) reference, prompts → images, interleaved over `repeats` (`p2p/experiments/side_by_side.py`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.errors import UserError  # noqa: E402
from models.files import write_text  # noqa: E402
from p2p.experiments.bench import SCHEMES, measure, random_model, report  # noqa: E402
from scripts._cli import entry_point  # noqa: E402
from scripts._common import (
    TINY_WEIGHTS,
    check_fresh,
    load_model,
    model_config,
    number,
    prompt_list,
    run_dir,
    sampler_settings,
)  # noqa: E402


def with_diffusers(cfg: DictConfig) -> None:
    """The side-by-side mode: one file, four schemes, fresh processes, interleaved rounds."""
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        raise UserError(f"diffusers=true needs diffusers and transformers ({err}): pip install -e '.[bench]'") from err
    from p2p.experiments.side_by_side import checkpoint_config, random_checkpoint, report, side_by_side, summary

    out = check_fresh(run_dir())  # refused now rather than after the runs
    if cfg.weights_dtype not in (None, cfg.dtype):
        raise UserError(
            f"weights_dtype={cfg.weights_dtype} with diffusers=true: diffusers computes in the dtype it stores, so "
            f"both sides hold dtype={cfg.dtype}; leave weights_dtype unset"
        )
    repeats = number(cfg.repeats, name="repeats", kind=int)
    if repeats < 1:
        raise UserError(f"repeats={repeats}; use an integer ≥ 1")
    config = model_config(cfg)
    with tempfile.TemporaryDirectory(prefix="p2p-bench-") as tmp:
        if cfg.random_weights:
            checkpoint = random_checkpoint(cfg.model.name, Path(tmp) / f"random-{cfg.model.name}.safetensors")
        else:
            checkpoint = Path(cfg.model.get("checkpoint") or TINY_WEIGHTS).expanduser()
            config = config or checkpoint_config(checkpoint)
        settings = sampler_settings(cfg, SimpleNamespace(config=config))  # the model's default guidance
        height, width = cfg.height or config.image_size, cfg.width or config.image_size
        threads = cfg.threads or torch.get_num_threads()
        rounds = side_by_side(
            checkpoint,
            config=config,
            prompts=prompt_list(cfg.prompts, minimum=2),
            settings=settings,
            height=height,
            width=width,
            seed=cfg.seed,
            negative_prompt=cfg.negative_prompt,
            dtype=cfg.dtype,
            device=cfg.device,
            threads=threads,
            repeats=repeats,
        )
    write_text(out / "side_by_side.json", json.dumps(summary(rounds), indent=2) + "\n")
    print(
        report(
            rounds,
            header=f"model={config.name} {'random weights ' if cfg.random_weights else ''}size={height}x{width} "
            f"steps={settings.steps} guidance={settings.guidance} prompts={len(cfg.prompts)} dtype={cfg.dtype} "
            f"device={cfg.device} threads={threads} rounds={repeats} (time: prompts → images, loading excluded; "
            "memory: peak resident above the loaded model)",
        )
    )


@entry_point("bench")
def main(cfg: DictConfig) -> None:
    if cfg.diffusers:
        with_diffusers(cfg)
        return
    if cfg.scheme != "all":  # one scheme, in this process: what the parent below runs
        if cfg.scheme not in SCHEMES:
            raise UserError(f"scheme={cfg.scheme!r}; choose one of {SCHEMES} or 'all'")
        model = (
            random_model(cfg.model.name, device=cfg.device, dtype=cfg.dtype, weights_dtype=cfg.weights_dtype)
            if cfg.random_weights
            else load_model(cfg)
        )
        result = measure(
            model,
            prompt_list(cfg.prompts, minimum=2),
            scheme=cfg.scheme,
            seed=cfg.seed,
            settings=sampler_settings(cfg, model),
            height=cfg.height,
            width=cfg.width,
        )
        print("RESULT " + json.dumps(result))
        return
    overrides = [a for a in sys.argv[1:] if not a.startswith("scheme=")]
    results = {}
    for scheme in SCHEMES:  # each in its own process: its peak memory is its own
        child = subprocess.run(
            [sys.executable, __file__, f"scheme={scheme}", "hydra.run.dir=.", "hydra.output_subdir=null", *overrides],
            capture_output=True,
            text=True,
            check=True,
        )
        line = next(line for line in child.stdout.splitlines() if line.startswith("RESULT "))
        results[scheme] = json.loads(line[len("RESULT ") :])
    print(
        report(
            results,
            header=f"model={cfg.model.name} {'random weights ' if cfg.random_weights else ''}"
            f"size={cfg.height or 'native'}x{cfg.width or 'native'} steps={cfg.steps} prompts={len(cfg.prompts)} "
            f"dtype={cfg.dtype} weights_dtype={cfg.weights_dtype or cfg.dtype} device={cfg.device} "
            f"threads={torch.get_num_threads()}",
        )
    )


if __name__ == "__main__":
    main()
