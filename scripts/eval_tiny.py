"""Generation quality of the built-in tiny model, read back by the shapes-world reader (issue 7).

    python scripts/eval_tiny.py                                  # the numbers of the model card
    python scripts/eval_tiny.py n=50 guidance=3                  # a quick guidance probe
    python scripts/eval_tiny.py model.checkpoint=runs/train_tiny/default/tiny.safetensors
    python scripts/eval_tiny.py model=tiny_mmdit                 # the built-in tiny MM-DiT (issue 33)
    python scripts/eval_tiny.py model=tiny_mmdit model.checkpoint=runs/train_tiny/tiny_mmdit/tiny_mmdit.safetensors

The studies are described in `p2p.experiments.generation_eval`. Writes results.json, samples.png and config.yaml
to its own run folder (outputs/eval_tiny/<date>/<time>) and prints the table.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: spinning threads stall a shared CPU
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a fresh clone without installing

from models.files import write_text  # noqa: E402
from p2p import views  # noqa: E402
from p2p.experiments.generation_eval import evaluate_generation, summary_lines  # noqa: E402
from scripts._cli import entry_point  # noqa: E402
from scripts._common import (  # noqa: E402
    BUILT_IN_FLOW_WEIGHTS,
    TINY_WEIGHTS,
    check_counts,
    load_model,
    run_dir,
    sampler_settings,
    save_config,
)


@entry_point("eval_tiny")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(cfg.threads)
    check_counts(cfg, n=1, batch_size=1, sample_tiles=1)
    out = run_dir()
    model = load_model(cfg, flow=True)
    results, grid = evaluate_generation(
        model,
        n=cfg.n,
        first_seed=cfg.first_seed,
        batch_size=cfg.batch_size,
        settings=sampler_settings(cfg, model),
        sample_tiles=cfg.sample_tiles,
    )
    built_in = BUILT_IN_FLOW_WEIGHTS.get(cfg.model.name, TINY_WEIGHTS)
    results = {"model": cfg.model.name, "checkpoint": str(cfg.model.get("checkpoint") or built_in), **results}
    write_text(out / "results.json", json.dumps(results, indent=2))  # a rate over no rows is null, not NaN
    save_config(cfg, out)
    views.save_png(grid, out / "samples.png")
    print(f"{results['checkpoint']}: " + "\n".join(summary_lines(results)))
    print(f"wrote {out / 'results.json'} and {out / 'samples.png'}")


if __name__ == "__main__":
    main()
