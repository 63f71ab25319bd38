"""Real-image editing on the built-in model, with images rendered by the shapes world (issue 4).

    python scripts/eval_inversion.py             # 20 renders, the model's default guidance, 50 steps
    python scripts/eval_inversion.py n=4 steps=20

The measurements are described in `p2p.experiments.inversion_eval`. Writes `inversion.json` into the run folder
and prints the summary.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.files import write_text  # noqa: E402
from p2p.edit import EditSpec  # noqa: E402
from p2p.experiments.inversion_eval import evaluate_inversion  # noqa: E402
from scripts._cli import entry_point  # noqa: E402
from scripts._common import check_counts, load_model, run_dir, sampler_settings  # noqa: E402


@entry_point("eval_inversion")
def main(cfg: DictConfig) -> None:
    check_counts(cfg, n=1, reference_n=0, far_margin=0)
    out = run_dir()
    model = load_model(cfg)
    report = evaluate_inversion(
        model,
        n=cfg.n,
        first_seed=cfg.first_seed,
        reference_n=cfg.reference_n,
        far_margin=cfg.far_margin,
        spec=EditSpec(**OmegaConf.to_container(cfg.edit, resolve=True)),
        blend=OmegaConf.to_container(cfg.blend, resolve=True),
        settings=sampler_settings(cfg, model),
    )
    write_text(out / "inversion.json", json.dumps(report, indent=1, default=float))
    for key, value in report["summary"].items():
        print(f"{key:<36} {value:8.3f}")
    print(f"wrote {out / 'inversion.json'}")


if __name__ == "__main__":
    main()
