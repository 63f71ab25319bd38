"""Editing quality of the built-in model, measured with the shapes world's reader (issues 3 and 7).

    python scripts/eval_edits.py                 # 200 seeds per study, the model's default sampler settings
    python scripts/eval_edits.py n=20 steps=25   # quick look

The studies are described in `p2p.experiments.edit_eval`. Writes `edits.json` (summaries + per-seed rows) into
the run folder and prints one line per study.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.files import write_text  # noqa: E402
from p2p.edit import EditSpec  # noqa: E402
from p2p.experiments.edit_eval import evaluate_edits, summary_lines  # noqa: E402
from scripts._cli import entry_point  # noqa: E402
from scripts._common import check_counts, load_model, run_dir, sampler_settings  # noqa: E402


@entry_point("eval_edits")
def main(cfg: DictConfig) -> None:
    check_counts(cfg, n=1)
    out = run_dir()
    model = load_model(cfg)
    report = evaluate_edits(
        model,
        n=cfg.n,
        first_seed=cfg.first_seed,
        spec=EditSpec(**OmegaConf.to_container(cfg.edit, resolve=True)),
        blend=OmegaConf.to_container(cfg.blend, resolve=True),
        settings=sampler_settings(cfg, model),
    )
    write_text(out / "edits.json", json.dumps(report, indent=1, default=float))
    print("\n".join(summary_lines(report)))
    print(f"wrote {out / 'edits.json'}")


if __name__ == "__main__":
    main()
