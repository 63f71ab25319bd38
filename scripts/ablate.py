"""One job of the injection ablation (issue 5): edit success vs. layout preservation on the shapes world.

    python scripts/ablate.py -m edit.cross_replace_steps=0,0.2,0.4,0.6,0.8,1 edit.self_replace_steps=0,0.2,0.4,0.6 seed='range(8)'
    python scripts/aggregate.py multirun/ablate/DATE/TIME       # one CSV and the trade-off plot

Each job edits every (source, target) pair of conf/ablate.yaml from its seed's x_T with its `edit` settings,
and scores source and target with the shapes-world reader (`p2p.shapes.metrics.score_edit`): edit success = the
target reads as the target caption; preservation = IoU of the object masks and centroid shift; plus the same
for same-seed sampling without injection (`baseline=true`). Its folder (named by its overrides) gets
`config.yaml` (first), `result.json` (settings and `p2p.shapes.metrics.summarize` rates) and `rows.json` (one row per
pair; written last, so its presence means the job finished — what scripts/aggregate.py reads).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from scripts._cli import entry_point  # noqa: E402
from scripts._common import check_fresh, load_model, number, run_dir, sampler_settings, save_config  # noqa: E402
from models.errors import UserError  # noqa: E402
from models.files import write_text  # noqa: E402
from p2p.edit import EditSpec  # noqa: E402
from p2p.shapes.metrics import edit_study, score_edit, summarize  # noqa: E402
from p2p.pipeline import decode, initial_latent, sample  # noqa: E402
from p2p.shapes.world import parse_caption  # noqa: E402

_MODELS: dict[str, object] = {}  # a multirun's jobs share one process: load each model once …
_BASELINES: dict[tuple, dict] = {}  # … and sample each seed's no-injection baseline once (it has no fractions)


def swap_kind(source: str, target: str) -> str:
    """What a pair changes: 'color', 'shape', 'color+shape', 'background' or 'other'."""
    a, b = parse_caption(source), parse_caption(target)
    changed = []
    if len(a.objects) == len(b.objects):
        if any(x[0] != y[0] for x, y in zip(a.objects, b.objects)):
            changed.append("color")
        if any(x[1] != y[1] for x, y in zip(a.objects, b.objects)):
            changed.append("shape")
    if a.background != b.background:
        changed.append("background")
    return "+".join(changed) if len(a.objects) == len(b.objects) and changed else "other"


def settings_of(cfg: DictConfig) -> dict:
    """The columns that name a job's setting in the aggregated CSV."""
    edit = OmegaConf.to_container(cfg.edit, resolve=True)
    return {"cross_replace_steps": edit["cross_replace_steps"], "self_replace_steps": edit["self_replace_steps"],
            "seed": number(cfg.seed, name="seed", kind=int), "steps": int(cfg.steps), "model": cfg.model.name}


def baseline_scores(model, model_key: str, pairs: list[tuple[str, str]], *, seed: int, settings) -> list[dict]:
    """Same-seed sampling without injection, scored like the edits: all prompts of the seed in one batch."""
    key = (model_key, tuple(pairs), seed, settings.steps, settings.guidance)
    if key not in _BASELINES:
        prompts = list(dict.fromkeys(p for pair in pairs for p in pair))
        size = model.config.image_size
        latent = initial_latent(seed, height=size, width=size, latent_factor=model.config.latent_factor)
        images = dict(zip(prompts, decode(model, sample(model, prompts, latent=latent, settings=settings, progress=False))))
        _BASELINES[key] = [{f"baseline_{k}": v for k, v in asdict(score_edit(
            images[s], images[t], source_caption=s, target_caption=t)).items()} for s, t in pairs]
    return _BASELINES[key]


def checked_pairs(value) -> list[tuple[str, str]]:
    """`pairs` as (source, target) captions of the shapes world, which its reader can score: checked before
    the model is loaded (a caption outside the world would otherwise fail after the sampling)."""
    pairs = [tuple(pair) if not isinstance(pair, str) else (pair,) for pair in (value or [])]
    if not pairs or any(len(pair) != 2 or not all(isinstance(c, str) for c in pair) for pair in pairs):
        raise UserError(f"pairs={value!r}: give a list of [source, target] caption pairs, e.g. "
                         "pairs='[[a red circle, a blue circle]]'")
    for caption in dict.fromkeys(c for pair in pairs for c in pair):  # in order: the first bad one is named
        parse_caption(caption)  # raises naming the word outside the world's vocabulary or grammar
    return pairs


def run_job(cfg: DictConfig, out: Path) -> dict:
    """Score every pair for this job's setting and seed; write config.yaml, result.json and rows.json, in that
    order (rows.json last: its presence means the job finished)."""
    check_fresh(out, what="a job", setting="hydra.sweep.dir")
    seed = number(cfg.seed, name="seed", kind=int)
    pairs = checked_pairs(OmegaConf.to_container(cfg.pairs) if cfg.pairs is not None else None)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    key = OmegaConf.to_yaml(cfg.model) + f"{cfg.dtype}{cfg.device}"
    model = _MODELS[key] if key in _MODELS else _MODELS.setdefault(key, load_model(cfg))
    settings = sampler_settings(cfg, model)
    spec = EditSpec(**OmegaConf.to_container(cfg.edit, resolve=True))
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)  # first: a job that fails later still says what it was
    began = time.perf_counter()
    rows = edit_study(model, pairs, seeds=[seed], spec=spec, settings=settings, baseline=False)
    if cfg.baseline:
        for row, scores in zip(rows, baseline_scores(model, key, pairs, seed=seed, settings=settings)):
            row.update(scores)
    setting = {**settings_of(cfg), "guidance": settings.guidance}
    rows = [{**setting, "swap": swap_kind(r["source"], r["target"]), **r} for r in rows]
    result = {**setting, "seconds": round(time.perf_counter() - began, 2), "pairs": len(pairs),
              "edit": summarize(rows, prefix="edit"),
              "baseline": summarize(rows, prefix="baseline") if cfg.baseline else None}
    write_text(out / "result.json", json.dumps(result, indent=1))
    # rows.json is what scripts/aggregate.py reads, written last: a job killed before it is not a finished job
    write_text(out / "rows.json", json.dumps(rows, indent=1))
    return result


@entry_point("ablate")
def main(cfg: DictConfig) -> None:
    result = run_job(cfg, run_dir())
    print(json.dumps({k: result[k] for k in ("cross_replace_steps", "self_replace_steps", "seed", "seconds", "edit")}))


if __name__ == "__main__":
    main()
