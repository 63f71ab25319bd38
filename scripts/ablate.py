"""One job of the injection ablation (issue 5): edit success vs. layout preservation on the shapes world.

    python scripts/ablate.py -m edit.cross_replace_steps=0,0.2,0.4,0.6,0.8,1 edit.self_replace_steps=0,0.2,0.4,0.6 seed='range(8)'
    python scripts/aggregate.py multirun/ablate/DATE/TIME       # one CSV and the trade-off plot

Each job edits every (source, target) pair of conf/ablate.yaml from its seed's x_T with its `edit` settings,
and scores source and target with the shapes-world reader (`p2p.shapes.metrics.score_edit`): edit success = the
target reads as the target caption; preservation = IoU of the object masks and centroid shift; plus the same
for same-seed sampling without injection (`baseline=true`). Its folder (named by its overrides) gets
`config.yaml` (first), `result.json` (settings and `p2p.shapes.metrics.summarize` rates) and `rows.json` (one row per
pair; written last, so its presence means the job finished — what scripts/aggregate.py reads).
A flow model (`model=tiny_mmdit`, `sd3-medium` …) is edited on joint attention with the default `JointSpec`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from models.files import write_text  # noqa: E402
from p2p.edit import EditSpec  # noqa: E402
from p2p.experiments.ablation import checked_pairs, run_job  # noqa: E402
from scripts._cli import entry_point  # noqa: E402
from scripts._common import check_fresh, load_model, number, run_dir, sampler_settings, save_config  # noqa: E402

_MODELS: dict[str, object] = {}  # a multirun's jobs share one process: load each model once


def run(cfg: DictConfig, out: Path) -> dict:
    """The job into `out`: config.yaml first, then result.json, rows.json last (its presence = finished)."""
    out = check_fresh(out, what="a job", setting="hydra.sweep.dir")
    seed = number(cfg.seed, name="seed", kind=int)
    pairs = checked_pairs(OmegaConf.to_container(cfg.pairs) if cfg.pairs is not None else None)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    key = OmegaConf.to_yaml(cfg.model) + f"{cfg.dtype}{cfg.device}"
    model = _MODELS[key] if key in _MODELS else _MODELS.setdefault(key, load_model(cfg, flow=True))
    edit = OmegaConf.to_container(cfg.edit, resolve=True)
    setting = {
        "cross_replace_steps": edit["cross_replace_steps"],
        "self_replace_steps": edit["self_replace_steps"],
        "seed": seed,
        "steps": int(cfg.steps),
        "model": cfg.model.name,
    }
    settings = sampler_settings(cfg, model)
    spec = EditSpec(**edit)
    save_config(cfg, out)  # first: a job that fails later still says what it was
    rows, result = run_job(
        model, pairs, seed=seed, spec=spec, settings=settings, setting=setting, baseline=cfg.baseline, model_key=key
    )
    write_text(out / "result.json", json.dumps(result, indent=1))
    # rows.json is what scripts/aggregate.py reads, written last: a job killed before it is not a finished job
    write_text(out / "rows.json", json.dumps(rows, indent=1))
    return result


@entry_point("ablate")
def main(cfg: DictConfig) -> None:
    result = run(cfg, run_dir())
    print(json.dumps({k: result[k] for k in ("cross_replace_steps", "self_replace_steps", "seed", "seconds", "edit")}))


if __name__ == "__main__":
    main()
