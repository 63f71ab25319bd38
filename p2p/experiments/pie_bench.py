"""The PIE-Bench runner (issue 27): invert every entry, edit it with P2P, score it, resumably and in shards.

Each entry's work is a pure function of (entry, settings, seed): the edit is deterministic DDIM from the
inversion, which goes through the on-disk cache. An entry is complete when its row file `rows/<key>.json` exists;
it is written (atomically) after the edited image, so a killed run loses at most the entry in flight, and a rerun
skips complete entries. Shard i of k takes the sorted keys i, i + k, …; the union of the shards' rows is the
unsharded run's. `results.csv` is rebuilt from rows/ at the end of every shard (and by `summarize`).

The edit per entry (PIE-Bench's P2P protocol, its run_editing_p2p.py): replace when the source and target prompts
have as many words, refine otherwise; LocalBlend on `blended_word` ("source_word target_word"), each word used in
the prompt that has it (an added object's word is only in the target), no blend when neither is there.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from models.errors import OutputExistsError, UserError
from models.files import atomic_path, write_text
from models.stable_diffusion import StableDiffusion
from p2p.edit import BlendSpec, EditSpec
from p2p.experiments.pie_metrics import METRICS, MetricSet
from p2p.pipeline import SamplerSettings
from p2p.real.images import load_image
from p2p.real.photo import InversionSettings, edit_photo
from p2p.shapes.pie import EDIT_TYPES, IMAGES_DIR, PieEntry, decode_mask, read_mapping
from p2p.shapes.reader import matches_caption, read_image
from p2p.shapes.world import WorldConfig, parse_caption
from p2p.tokens import has_word

log = logging.getLogger(__name__)

AUTO_KIND = "auto"  # edit.kind=auto: replace when the word counts match, refine otherwise (PIE-Bench's P2P rule)
ROWS_DIR = "rows"
SETTINGS_FILE = "settings.json"
RESULTS_FILE = "results.csv"


@dataclass
class BenchSettings:
    """Everything an entry's result depends on, besides the entry and the model (written to settings.json)."""

    model: str
    inversion: InversionSettings
    edit: EditSpec  # kind "auto" picks replace / refine per entry
    blend: BlendSpec | None  # threshold etc.; the words come from each entry; None = no LocalBlend
    sampler: SamplerSettings
    seed: int = 0

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def shard_keys(keys: Sequence[str], *, shard: int, n_shards: int) -> list[str]:
    """Shard `shard` of `n_shards`: the sorted keys shard, shard + k, … (every key in exactly one shard)."""
    for name, value, low in (("n_shards", n_shards, 1), ("shard", shard, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"{name}={value!r} must be an integer ≥ {low}")
    if shard >= n_shards:
        raise UserError(f"shard={shard} is out of range for n_shards={n_shards}; shards are 0 … {n_shards - 1}")
    return sorted(keys)[shard::n_shards]


def entry_edit(
    entry: PieEntry, *, spec: EditSpec, blend: BlendSpec | None
) -> tuple[list[str], EditSpec, BlendSpec | None]:
    """The prompts, the edit (auto → replace / refine by word counts) and the blend words of one entry."""
    source, target = entry.source, entry.target
    kind = spec.kind
    if kind == AUTO_KIND:
        kind = "replace" if len(source.split()) == len(target.split()) else "refine"
    spec = dataclasses.replace(spec, kind=kind)
    words = entry.blended_word.split()
    if blend is None or not words:
        return [source, target], spec, None
    if len(words) != 2:
        raise UserError(f"entry {entry.key}: blended_word {entry.blended_word!r} is not 'source_word target_word'")
    per_prompt = [[w] if has_word(p, w) else [] for p, w in zip((source, target), words)]
    if not any(per_prompt):
        log.warning("entry %s: blended words %r are in neither prompt; editing without LocalBlend", entry.key, words)
        return [source, target], spec, None
    return [source, target], spec, dataclasses.replace(blend, words=per_prompt)


def edit_success(edited: np.ndarray, target: str) -> float | None:
    """On shapes-PIE: 1 when the edited image reads as the target caption (the world's reader), else 0;
    None for a prompt outside the world's grammar (PIE-Bench proper)."""
    try:
        spec = parse_caption(target)
    except UserError:
        return None
    size = WorldConfig().image_size
    if edited.shape[:2] != (size, size):
        return None  # the reader reads the world's own size (the built-in model's 32 px)
    return float(matches_caption(read_image(edited), spec)["all"])


def run_entry(
    model: StableDiffusion,
    entry: PieEntry,
    *,
    data_dir: Path,
    settings: BenchSettings,
    metrics: MetricSet,
    cache_dir: str | Path | None,
    progress: bool = False,
) -> tuple[dict, np.ndarray]:
    """One entry: (its row, the edited image uint8 (H, W, 3) at the model's size)."""
    start = time.perf_counter()
    torch.manual_seed(settings.seed)  # nothing here draws noise (η = 0); fixed anyway so a row never depends on order
    size = model.config.image_size
    path = data_dir / IMAGES_DIR / entry.image_path
    source_image = load_image(path, height=size, width=size)
    prompts, spec, blend = entry_edit(entry, spec=settings.edit, blend=settings.blend)
    photo = edit_photo(
        model,
        source_image,
        prompts,
        spec=spec,
        blend=blend,
        settings=settings.sampler,
        inversion=settings.inversion,
        cache_dir=cache_dir,
        progress=progress,
        reconstruct=False,
    )
    edited = photo.edited[1]
    with Image.open(path) as original:  # the mask has the dataset image's size (512 for PIE-Bench proper)
        mask_hw = original.size[::-1]
    mask = decode_mask(entry.mask, mask_hw)
    if mask.shape != edited.shape[:2]:  # scored at the model's size: the mask follows, nearest neighbour
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(edited.shape[1::-1], Image.NEAREST), float)
    row = {"key": entry.key, "editing_type_id": entry.editing_type_id, "edit_kind": spec.kind}
    row.update(metrics(source_image, edited, mask, entry.target))
    success = edit_success(edited, entry.target)
    if success is not None:
        row["edit_success"] = success
    row["inversion_seconds"] = photo.metrics["inversion_seconds"]
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row, edited


def check_settings(out: Path, settings: BenchSettings, data_dir: Path) -> None:
    """The run folder's settings.json: written by the first shard, the same for every later one (or refused)."""
    wanted = {"data": str(Path(data_dir).resolve()), **settings.to_json()}
    path = out / SETTINGS_FILE
    if path.exists():
        held = json.loads(path.read_text())
        if held != wanted:
            changed = sorted(k for k in set(held) | set(wanted) if held.get(k) != wanted.get(k))
            raise OutputExistsError(
                f"{out} holds a run with other settings ({', '.join(changed)} differ); resume "
                "it with its own settings, or use a new folder"
            )
        return
    try:
        write_text(path, json.dumps(wanted, indent=1))
    except OutputExistsError:  # another shard wrote it meanwhile: check against that one
        check_settings(out, settings, data_dir)


def run_benchmark(
    model: StableDiffusion,
    data_dir: str | Path,
    out: str | Path,
    *,
    settings: BenchSettings,
    metrics: MetricSet,
    shard: int = 0,
    n_shards: int = 1,
    cache_dir: str | Path | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """Run this shard's incomplete entries into `out`; returns counts {done, skipped, total}."""
    data_dir, out = Path(data_dir), Path(out)
    entries = read_mapping(data_dir)
    keys = sorted(entries)[:limit] if limit else sorted(entries)
    mine = shard_keys(keys, shard=shard, n_shards=n_shards)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, settings, data_dir)
    rows_dir = out / ROWS_DIR
    todo = [k for k in mine if not (rows_dir / f"{k}.json").exists()]
    if metrics.skipped:
        log.warning("metrics skipped (no weights given): %s", metrics.skipped_line())
    for key in tqdm(todo, desc=f"shard {shard}/{n_shards}", position=shard, disable=not progress):
        entry = entries[key]
        row, edited = run_entry(
            model, entry, data_dir=data_dir, settings=settings, metrics=metrics, cache_dir=cache_dir
        )
        with atomic_path(out / IMAGES_DIR / entry.image_path, overwrite=True) as partial:  # a killed run's leftover
            Image.fromarray(edited).save(partial)
        write_text(rows_dir / f"{key}.json", json.dumps(row))  # last: its presence means the entry is complete
    write_results(out)
    return {"done": len(todo), "skipped": len(mine) - len(todo), "total": len(mine)}


def read_rows(out: str | Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((Path(out) / ROWS_DIR).glob("*.json"))]


def write_results(out: str | Path) -> Path:
    """results.csv: one row per complete entry, sorted by key (the union of every shard's rows)."""
    rows = read_rows(out)
    columns = ["key", "editing_type_id", "edit_kind", *METRICS, "edit_success", "inversion_seconds", "seconds"]
    columns = [c for c in columns if any(c in r for r in rows)] or columns[:3]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(Path(out) / RESULTS_FILE, buffer.getvalue(), overwrite=True)


def mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]  # the benchmark's "nan" rows are left out
    return float(np.mean(finite)) if finite else float("nan")


def type_name(type_id: str) -> str:
    return EDIT_TYPES.get(str(type_id), str(type_id))
