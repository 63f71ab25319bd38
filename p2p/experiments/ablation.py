"""One job of the injection ablation (issue 5): word swaps of the shapes world at one injection setting and seed,
scored by the world's reader (edit success, object-mask IoU, centroid shift), beside same-seed sampling without
injection. `scripts/ablate.py` runs one such job per Hydra multirun job; `ablation_report` collects them.
"""

from __future__ import annotations

import time
from dataclasses import asdict

from models.errors import UserError
from models.flow_model import FlowModel
from models.stable_diffusion import StableDiffusion
from p2p import flow
from p2p.edit import EditSpec
from p2p.pipeline import SamplerSettings, decode, initial_latent, sample
from p2p.shapes.metrics import edit_study, score_edit, summarize
from p2p.shapes.world import parse_caption

_BASELINES: dict[tuple, list[dict]] = {}  # a multirun's jobs share one process: each seed's baseline is sampled once


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


def baseline_scores(
    model: StableDiffusion, model_key: str, pairs: list[tuple[str, str]], *, seed: int, settings: SamplerSettings
) -> list[dict]:
    """Same-seed sampling without injection, scored like the edits: all prompts of the seed in one batch."""
    key = (model_key, tuple(pairs), seed, settings.steps, settings.guidance)
    if key not in _BASELINES:
        prompts = list(dict.fromkeys(p for pair in pairs for p in pair))
        if isinstance(model, FlowModel):  # SD3 / FLUX (e.g. tiny_mmdit): the flow loop, one seed for every prompt
            images = dict(zip(prompts, flow.generate(model, prompts, seed=seed, settings=settings, progress=False)))
        else:
            size = model.config.image_size
            latent = initial_latent(seed, height=size, width=size, latent_factor=model.config.latent_factor)
            images = dict(
                zip(prompts, decode(model, sample(model, prompts, latent=latent, settings=settings, progress=False)))
            )
        _BASELINES[key] = [
            {
                f"baseline_{k}": v
                for k, v in asdict(score_edit(images[s], images[t], source_caption=s, target_caption=t)).items()
            }
            for s, t in pairs
        ]
    return _BASELINES[key]


def checked_pairs(value) -> list[tuple[str, str]]:
    """`pairs` as (source, target) captions of the shapes world, which its reader can score: checked before
    the model is loaded (a caption outside the world would otherwise fail after the sampling)."""
    pairs = [tuple(pair) if not isinstance(pair, str) else (pair,) for pair in (value or [])]
    if not pairs or any(len(pair) != 2 or not all(isinstance(c, str) for c in pair) for pair in pairs):
        raise UserError(
            f"pairs={value!r}: give a list of [source, target] caption pairs, e.g. "
            "pairs='[[a red circle, a blue circle]]'"
        )
    for caption in dict.fromkeys(c for pair in pairs for c in pair):  # in order: the first bad one is named
        parse_caption(caption)  # raises naming the word outside the world's vocabulary or grammar
    return pairs


def run_job(
    model: StableDiffusion,
    pairs: list[tuple[str, str]],
    *,
    seed: int,
    spec: EditSpec,
    settings: SamplerSettings,
    setting: dict,
    baseline: bool,
    model_key: str,
) -> tuple[list[dict], dict]:
    """Edit and score every pair at one setting and seed → (rows, result). `setting`: the columns that name the
    job in the aggregated CSV (fractions, seed, steps, model); `model_key` identifies the model for the cache of
    baselines, which do not depend on the injection setting."""
    began = time.perf_counter()
    rows = edit_study(model, pairs, seeds=[seed], spec=spec, settings=settings, baseline=False)
    if baseline:
        for row, scores in zip(rows, baseline_scores(model, model_key, pairs, seed=seed, settings=settings)):
            row.update(scores)
    setting = {**setting, "guidance": settings.guidance}
    rows = [{**setting, "swap": swap_kind(r["source"], r["target"]), **r} for r in rows]
    result = {
        **setting,
        "seconds": round(time.perf_counter() - began, 2),
        "pairs": len(pairs),
        "edit": summarize(rows, prefix="edit"),
        "baseline": summarize(rows, prefix="baseline") if baseline else None,
    }
    return rows, result
