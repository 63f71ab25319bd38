"""Collect an ablation sweep (scripts/ablate.py -m …) into CSVs and plot edit success vs. preservation (issue 5).

    python scripts/aggregate.py multirun/ablate/2026-11-24/15-00-00_000000 [--out DIR] [--markdown]

Reads every job's rows.json under the folder and writes (into the folder, or --out; never overwriting):
- ablation_rows.csv     one row per (setting, seed, pair): the job settings and `p2p.shapes.metrics.score_edit` fields;
- ablation_summary.csv  per (cross fraction, self fraction, pair group), pooled over seeds and pairs with
                        `p2p.shapes.metrics.summarize` (edits of sources the model drew correctly): success, mean IoU,
                        kept layout (IoU ≥ 0.8), success and kept, median centroid shift; groups: all pairs,
                        color swaps, shape swaps; plus the same-seed, no-injection baseline (setting "none");
- ablation.png          success vs. mean IoU and vs. centroid shift, one curve per self fraction, points
                        labelled by the cross fraction, the baseline as a star; bottom: color vs. shape swaps.
A setting is the job's `edit` fields (SETTINGS) plus any other config field that differs between jobs
(`other_settings`, e.g. steps=10 vs steps=20: never pooled). Job folders without a finished rows.json (a failed or
still running job) are skipped and listed on stderr; an empty or missing folder, or outputs of an earlier
aggregation in the way, end it with a one-line error.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from omegaconf import OmegaConf  # noqa: E402

from models.errors import UserError, MissingFileError, OutputExistsError  # noqa: E402
from models.files import atomic_path  # noqa: E402
from scripts._cli import fail  # noqa: E402
from p2p.shapes.metrics import summarize  # noqa: E402

# A job's setting = these fields of its config.yaml's `edit` (any of them may be swept); seeds are pooled.
SETTINGS = ("cross_replace_steps", "self_replace_steps", "self_max_fraction", "self_max_side")
RATES = ("n", "success", "success_se", "mean_iou", "mean_iou_if_success", "kept_layout", "success_and_kept",
         "median_centroid_shift")
SUMMARY_COLUMNS = ("setting", *SETTINGS, "other_settings", "group", "seeds", *RATES)
GROUPS = {"all": lambda swap: True, "color": lambda swap: swap == "color", "shape": lambda swap: swap == "shape"}
BASELINE = "none"  # the setting column of same-seed sampling without injection


# Config fields that never split a setting: seeds are pooled; the rest say how a job ran, not what it measured.
POOLED = ("seed", "threads", "device", "pairs")


@dataclass
class Skipped:
    job: str  # the job folder, relative to the sweep folder
    reason: str


def _flat(config: dict) -> dict:
    """{'edit': {'kind': 'replace'}, 'steps': 20} → {'edit.kind': 'replace', 'steps': 20}: one level deep, so a
    per-word window ({default_: 0.8, red: 0.2}) stays one value."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            flat[key] = value
    return flat


def _job_folders(folder: Path) -> list[Path]:
    """Every folder a job of the sweep wrote into: Hydra gives each a .hydra/ before the job runs."""
    marks = ("rows.json", "config.yaml", ".hydra")
    return sorted({p.parent for mark in marks for p in folder.rglob(mark) if ".hydra" not in p.parent.parts})


def _read_job(job: Path) -> tuple[list[dict], dict]:
    """A finished job's rows and flattened config; ValueError with the reason for anything else."""
    if not (job / "rows.json").is_file():
        raise UserError("no rows.json: the job failed or has not finished (see its ablate.log)")
    if not (job / "config.yaml").is_file():
        raise UserError("rows.json but no config.yaml: its setting is unknown")
    try:
        rows = json.loads((job / "rows.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"rows.json is unreadable ({error})") from None
    if not isinstance(rows, list) or not rows:
        raise UserError("rows.json holds no rows")
    try:
        config = OmegaConf.to_container(OmegaConf.load(job / "config.yaml"), resolve=True)
    except Exception as error:  # OmegaConf/YAML raise several kinds; any of them means the same here
        raise UserError(f"config.yaml is unreadable ({type(error).__name__})") from None
    return rows, _flat(config)


def load_jobs(folder: Path) -> tuple[list[dict], list[Skipped]]:
    """Every finished job's rows, each with its setting (the `edit` fields SETTINGS, read back from the job's
    config.yaml whatever was swept) and `other_settings`: any other config field that differs between the jobs
    (steps=10 and steps=20 are two settings, never pooled). Jobs that failed or are unfinished are skipped and
    returned with the reason."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"{folder} is not a folder; pass the sweep folder of scripts/ablate.py -m "
                                "(multirun/ablate/DATE/TIME)")
    jobs, skipped, seen = {}, [], {}
    for job in _job_folders(folder):
        name = str(job.relative_to(folder))
        try:
            jobs[job] = _read_job(job)
        except ValueError as reason:
            skipped.append(Skipped(name, str(reason)))
            continue
        # two sweeps under one folder may repeat a job (same settings, same seed): count its edits once
        identity = json.dumps({k: v for k, v in jobs[job][1].items() if k != "threads"}, sort_keys=True, default=str)
        if identity in seen:
            del jobs[job]
            skipped.append(Skipped(name, f"the same config and seed as {seen[identity]}, counted once"))
        else:
            seen[identity] = name
    if not jobs:
        found = ""
        if skipped:
            found = f"; {len(skipped)} job folders, none finished: " + "; ".join(f"{s.job}: {s.reason}"
                                                                                for s in skipped[:5])
        raise MissingFileError(f"no finished ablation job under {folder}{found}. Run scripts/ablate.py -m … first "
                                "(each job writes rows.json and config.yaml into its own folder)")
    configs = [config for _, config in jobs.values()]
    edit_fields = {f"edit.{k}" for k in SETTINGS}
    others = sorted(k for k in set().union(*configs) if k not in edit_fields and k not in POOLED
                    and len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1)
    rows = []
    for job_rows, config in jobs.values():
        setting = {**{k: config.get(f"edit.{k}") for k in SETTINGS}, "other_settings": _describe(config, others),
                   # what the no-injection baseline depends on: the other settings outside `edit`
                   "baseline_settings": _describe(config, [k for k in others if not k.startswith("edit.")])}
        rows += [{**row, **setting} for row in job_rows]
    return rows, skipped



def _describe(config: dict, keys: list[str]) -> str:
    """'guidance=3.0 steps=10': a job's values of the other swept fields."""
    return " ".join(f"{k}={json.dumps(config.get(k))}" for k in keys)


def rates(rows: list[dict], *, prefix: str) -> dict:
    """`summarize` with every column present (NaN when no source was drawn correctly), the standard error of
    the success rate, and the mean IoU of the successful edits alone (a failed edit often draws nothing: IoU 0)."""
    summary = summarize(rows, prefix=prefix)
    out = {k: summary.get(k, math.nan) for k in RATES}
    n, p = out["n"], out["success"]
    out["success_se"] = math.sqrt(p * (1 - p) / n) if n else math.nan
    succeeded = [r[f"{prefix}_iou"] for r in rows if r[f"{prefix}_source_correct"] and r[f"{prefix}_target_correct"]]
    out["mean_iou_if_success"] = sum(succeeded) / len(succeeded) if succeeded else math.nan
    return out


def _number(value):
    """Fractions sort and plot as numbers; anything else (a per-word dict) stays text."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _order(value) -> tuple:
    """Sort key: numbers first in numeric order, then text."""
    return (0, value, "") if isinstance(value, float) else (1, 0.0, str(value))


def _label(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def summary_table(rows: list[dict]) -> list[dict]:
    settings = defaultdict(list)
    for row in rows:
        settings[(*(_number(row[k]) for k in SETTINGS), row["other_settings"])].append(row)
    table = []
    for setting, group_rows in sorted(settings.items(), key=lambda kv: [_order(v) for v in kv[0]]):
        for group, keep in GROUPS.items():
            chosen = [r for r in group_rows if keep(r["swap"])]
            if chosen:
                table.append({"setting": "p2p", **dict(zip((*SETTINGS, "other_settings"), setting)), "group": group,
                              "seeds": len({r["seed"] for r in chosen}), **rates(chosen, prefix="edit")})
    # The baseline does not depend on the edit: every job of a seed repeats it, count it once per other setting
    # that is not an edit field (steps=10 and steps=20 have their own baselines).
    baselines = defaultdict(dict)
    for r in rows:
        if "baseline_iou" in r:
            key = (r["source"], r["target"], r["seed"], r["steps"], r["guidance"], r["model"])
            baselines[r["baseline_settings"]][key] = r
    for other, unique in sorted(baselines.items()):
        for group, keep in GROUPS.items():
            chosen = [r for r in unique.values() if keep(r["swap"])]
            if chosen:
                table.append({"setting": BASELINE, **{k: BASELINE for k in SETTINGS}, "other_settings": other,
                              "group": group, "seeds": len({r["seed"] for r in chosen}),
                              **rates(chosen, prefix="baseline")})
    return table


def write_csv(rows: list[dict], path: Path, columns) -> Path:
    with atomic_path(path) as partial, partial.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _self_layers(row: dict) -> str:
    """Which layers get self-attention injection (`p2p.edit.self_max_queries`)."""
    if row["self_max_side"] not in (None, "None"):
        return f"side ≤ {_label(row['self_max_side'])}"
    return f"side ≤ {_label(row['self_max_fraction'])}·latent"


LINESTYLES = ("-", "--", ":", "-.")  # one per set of self-injected layers (and other setting); colors: self fraction
BASELINE_MARKERS = ("*", "P", "X", "D")  # one per other setting of the no-injection baseline


def _panel(ax, table: list[dict], *, group: str, x: str, xlabel: str) -> None:
    curves = defaultdict(list)
    for row in table:
        if row["group"] == group and row["setting"] != BASELINE:
            curves[(row["self_replace_steps"], _self_layers(row), row["other_settings"])].append(row)
    selfs = sorted({self_ for self_, _, _ in curves}, key=_order)
    styles = sorted({(layers, other) for _, layers, other in curves})  # one line style each
    for (self_, layers, other), points in sorted(curves.items(), key=lambda kv: (kv[0][1:], _order(kv[0][0]))):
        points.sort(key=lambda r: _order(r["cross_replace_steps"]))
        color = plt.cm.viridis(selfs.index(self_) / max(len(selfs) - 1, 1) * 0.9)
        label = f"self {_label(self_)}" + (f" ({layers}{', ' + other if other else ''})" if len(styles) > 1 else "")
        ax.plot([p[x] for p in points], [p["success"] for p in points], marker="o", color=color,
                linestyle=LINESTYLES[styles.index((layers, other)) % len(LINESTYLES)], label=label)
        for p in points:
            ax.annotate(_label(p["cross_replace_steps"]), (p[x], p["success"]), textcoords="offset points",
                        xytext=(4, 3), fontsize=7, color=color)
    baselines = [row for row in table if row["group"] == group and row["setting"] == BASELINE]
    for i, row in enumerate(baselines):
        ax.plot([row[x]], [row["success"]], "r" + BASELINE_MARKERS[i % len(BASELINE_MARKERS)], markersize=12,
                label="no injection (same seed)" + (f", {row['other_settings']}" if row["other_settings"] else ""))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("edit success (target reads as its caption)")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)


def plot(table: list[dict], path: Path, *, title: str) -> Path:
    """2×2: all pairs vs IoU and vs centroid shift; color swaps and shape swaps vs IoU."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 9))
    iou = "layout preservation: mean object-mask IoU, source vs edit"
    _panel(axes[0, 0], table, group="all", x="mean_iou", xlabel=iou)
    _panel(axes[0, 1], table, group="all", x="median_centroid_shift", xlabel="median centroid shift (px, lower = better)")
    _panel(axes[1, 0], table, group="color", x="mean_iou", xlabel=iou)
    _panel(axes[1, 1], table, group="shape", x="mean_iou", xlabel=iou)
    axes[0, 1].invert_xaxis()  # right = better on every panel
    for ax, name in zip(axes.flat, ("all pairs", "all pairs", "color swaps", "shape swaps")):
        n = next((r["n"] for r in table if r["group"] == name.split()[0] and r["setting"] == BASELINE), None)
        ax.set_title(f"{name}" + (f" (n = {n} per point)" if n is not None else "") + "; labels: cross fraction",
                     fontsize=10)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    with atomic_path(path) as partial:
        fig.savefig(partial, dpi=90)
    plt.close(fig)
    return path


OUTPUTS = {"rows": "ablation_rows.csv", "summary": "ablation_summary.csv", "plot": "ablation.png"}


class Aggregated(dict):
    """The written files by name, {'rows': …csv, 'summary': …csv, 'plot': …png}, and what they were made of:
    `table` (the summary's rows) and `skipped` (the job folders left out, each with the reason)."""

    def __init__(self, paths: dict[str, Path], *, table: list[dict], skipped: list[Skipped]):
        super().__init__(paths)
        self.table, self.skipped = table, skipped


def aggregate(folder: Path, out: Path | None = None) -> Aggregated:
    """Read the sweep, then write the two CSVs and the plot into `out` (default: the sweep folder). All three
    are checked first: an earlier aggregation is never overwritten, not even in part."""
    out = Path(out or folder)
    rows, skipped = load_jobs(folder)
    existing = [str(out / name) for name in OUTPUTS.values() if (out / name).exists()]
    if existing:
        raise OutputExistsError(f"{', '.join(existing)} exist{'s' if len(existing) == 1 else ''}; refusing to overwrite "
                              "an earlier aggregation (pass --out DIR, or move them away)")
    out.mkdir(parents=True, exist_ok=True)
    table = summary_table(rows)
    row_columns = list(dict.fromkeys(k for r in rows for k in r))
    steps = ", ".join(str(v) for v in sorted({r["steps"] for r in rows}))
    title = (f"P2P word swaps on the shapes world ({', '.join(sorted({str(r['model']) for r in rows}))} model, "
             f"{steps} DDIM steps, {len({(r['source'], r['target']) for r in rows})} pairs × "
             f"{len({r['seed'] for r in rows})} seeds" + (f"; {len(skipped)} job folders skipped" if skipped else "") + ")")
    paths = {"rows": write_csv(rows, out / OUTPUTS["rows"], row_columns),
             "summary": write_csv(table, out / OUTPUTS["summary"], SUMMARY_COLUMNS),
             "plot": plot(table, out / OUTPUTS["plot"], title=title)}
    return Aggregated(paths, table=table, skipped=skipped)


def markdown_table(table: list[dict], *, group: str = "all") -> str:
    """The summary of one pair group as a Markdown table (for docs), rates in percent."""
    lines = ["| cross | self | self layers | n | success | mean IoU | IoU of successes | IoU ≥ 0.8 | "
             "success and IoU ≥ 0.8 | median shift (px) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        if r["group"] == group:
            cross, self_, layers = (("no injection", "", "") if r["setting"] == BASELINE else
                                    (_label(r["cross_replace_steps"]), _label(r["self_replace_steps"]), _self_layers(r)))
            layers = ", ".join(part for part in (layers, r["other_settings"]) if part)
            lines.append(f"| {cross} | {self_} | {layers} | {r['n']} | {100 * r['success']:.0f}% ± {100 * r['success_se']:.0f} | "
                         f"{r['mean_iou']:.2f} | {r['mean_iou_if_success']:.2f} | {100 * r['kept_layout']:.0f}% | {100 * r['success_and_kept']:.0f}% | "
                         f"{r['median_centroid_shift']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the sweep folder of scripts/ablate.py -m (multirun/ablate/DATE/TIME)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the sweep folder)")
    parser.add_argument("--markdown", action="store_true", help="also print the all-pairs summary as a Markdown table")
    args = parser.parse_args(argv)
    try:
        result = aggregate(args.folder, args.out)
    except UserError as error:
        fail(str(error))
    for job in result.skipped:  # said on stderr, so a pipe of the table stays clean
        print(f"skipped {job.job}: {job.reason}", file=sys.stderr)
    if result.skipped:
        print(f"skipped {len(result.skipped)} job folders; the outputs hold the other jobs only", file=sys.stderr)
    for name, path in result.items():
        print(f"{name}: {path}")
    if args.markdown:
        print(markdown_table(result.table))


if __name__ == "__main__":
    main()
