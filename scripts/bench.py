"""Benchmark: what P2P editing costs over plain sampling, and what the reference's scheme costs over ours.

    python scripts/bench.py                                   # built-in model, 50 steps
    python scripts/bench.py model=sd15 random_weights=true height=512 width=512 steps=2 device=cpu

On one UNet and the same prompts and seed, each scheme runs in its own subprocess (so peak memory is its own):
  (a) plain  — batched sampling of the prompts, fused attention everywhere;
  (b) p2p    — our edit (replace, cross 0.8, self 0.4): maps materialised only where edited;
  (c) reference — the official code's scheme: explicit softmax in every layer, every step, and a store of all
      maps with ≤ (latent/2)² queries, heads kept, summed every step — plus the same edit.
Prints seconds and peak extra memory of each, and the ratios (b)/(a) (target ≤ 1.10) and (c)/(b) (target ≥ 2).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.errors import UserError  # noqa: E402
from p2p.experiments.bench import SCHEMES, measure, random_model, report  # noqa: E402
from scripts._cli import entry_point  # noqa: E402
from scripts._common import load_model, prompt_list, sampler_settings  # noqa: E402


@entry_point("bench")
def main(cfg: DictConfig) -> None:
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
