"""Collect an ablation sweep (scripts/ablate.py -m …) into CSVs and plot edit success and preservation (issue 5).

    python scripts/aggregate.py multirun/ablate/2026-11-24/15-00-00_000000 [--out DIR] [--markdown]

Reads every job's rows.json under the folder and writes (into the folder, or --out; never overwriting):
- ablation_rows.csv     one row per (setting, seed, pair): the job settings and `p2p.shapes.metrics.score_edit` fields;
- ablation_summary.csv  per (cross fraction, self fraction, pair group), pooled over seeds and pairs with
                        `p2p.shapes.metrics.summarize` (edits of sources the model drew correctly): success, mean IoU,
                        kept layout (IoU ≥ 0.8), success and kept, median centroid shift; groups: all pairs,
                        color swaps, shape swaps; plus the same-seed, no-injection baseline (setting "none");
- ablation.png          over the cross-injection fraction: mean IoU and edit success of all pairs, the IoU of color
                        and shape swaps; one line per self fraction, standard errors (IoU: over seeds), the
                        no-injection baseline dashed, y axes zoomed to the data, the finding in the title.
A setting is the job's `edit` fields (SETTINGS) plus any other config field that differs between jobs
(`other_settings`, e.g. steps=10 vs steps=20: never pooled). Job folders without a finished rows.json (a failed or
still running job) are skipped and listed on stderr; an empty or missing folder, or outputs of an earlier
aggregation in the way, end it with a one-line error.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from models.errors import MissingFileError, OutputExistsError, UserError  # noqa: E402
from models.files import atomic_path  # noqa: E402
from p2p.shapes.metrics import summarize  # noqa: E402

# A job's setting = these fields of its config.yaml's `edit` (any of them may be swept); seeds are pooled.
SETTINGS = ("cross_replace_steps", "self_replace_steps", "self_max_fraction", "self_max_side")
RATES = (
    "n",
    "success",
    "success_se",
    "mean_iou",
    "mean_iou_se",
    "mean_iou_if_success",
    "kept_layout",
    "success_and_kept",
    "median_centroid_shift",
)
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
    try:  # the job saved its config resolved: plain YAML
        config = yaml.safe_load((job / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"config.yaml is unreadable ({type(error).__name__})") from None
    if not isinstance(config, dict):
        raise UserError("config.yaml holds no mapping")
    return rows, _flat(config)


def load_jobs(folder: Path) -> tuple[list[dict], list[Skipped]]:
    """Every finished job's rows, each with its setting (the `edit` fields SETTINGS, read back from the job's
    config.yaml whatever was swept) and `other_settings`: any other config field that differs between the jobs
    (steps=10 and steps=20 are two settings, never pooled). Jobs that failed or are unfinished are skipped and
    returned with the reason."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(
            f"{folder} is not a folder; pass the sweep folder of scripts/ablate.py -m (multirun/ablate/DATE/TIME)"
        )
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
            found = f"; {len(skipped)} job folders, none finished: " + "; ".join(
                f"{s.job}: {s.reason}" for s in skipped[:5]
            )
        raise MissingFileError(
            f"no finished ablation job under {folder}{found}. Run scripts/ablate.py -m … first "
            "(each job writes rows.json and config.yaml into its own folder)"
        )
    configs = [config for _, config in jobs.values()]
    edit_fields = {f"edit.{k}" for k in SETTINGS}
    others = sorted(
        k
        for k in set().union(*configs)
        if k not in edit_fields and k not in POOLED and len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1
    )
    rows = []
    for job_rows, config in jobs.values():
        setting = {
            **{k: config.get(f"edit.{k}") for k in SETTINGS},
            "other_settings": _describe(config, others),
            # what the no-injection baseline depends on: the other settings outside `edit`
            "baseline_settings": _describe(config, [k for k in others if not k.startswith("edit.")]),
        }
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
    per_seed = defaultdict(list)  # the seed is the unit of repetition: the IoU's error bar is over seeds
    for r in rows:
        if r[f"{prefix}_source_correct"]:
            per_seed[r["seed"]].append(r[f"{prefix}_iou"])
    seed_means = [sum(v) / len(v) for v in per_seed.values()]
    out["mean_iou_se"] = (
        math.sqrt(
            sum((m - sum(seed_means) / len(seed_means)) ** 2 for m in seed_means)
            / (len(seed_means) - 1)
            / len(seed_means)
        )
        if len(seed_means) > 1
        else math.nan
    )
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
                table.append(
                    {
                        "setting": "p2p",
                        **dict(zip((*SETTINGS, "other_settings"), setting)),
                        "group": group,
                        "seeds": len({r["seed"] for r in chosen}),
                        **rates(chosen, prefix="edit"),
                    }
                )
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
                table.append(
                    {
                        "setting": BASELINE,
                        **{k: BASELINE for k in SETTINGS},
                        "other_settings": other,
                        "group": group,
                        "seeds": len({r["seed"] for r in chosen}),
                        **rates(chosen, prefix="baseline"),
                    }
                )
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
PANELS = (
    ("all", "mean_iou", "mean_iou_se", "layout kept: mean object-mask IoU"),
    ("all", "success", "success_se", "edit success: the target reads as its caption"),
    ("color", "mean_iou", "mean_iou_se", "color swaps: mean IoU"),
    ("shape", "mean_iou", "mean_iou_se", "shape swaps: mean IoU"),
)


def _x_positions(table: list[dict]) -> tuple[dict, list, list]:
    """Cross fractions on x: their values when all are numbers, else one slot each (per-word windows)."""
    values = sorted({row["cross_replace_steps"] for row in table if row["setting"] != BASELINE}, key=_order)
    numeric = all(isinstance(v, float) for v in values)
    position = {v: (v if numeric else i) for i, v in enumerate(values)}
    return position, [position[v] for v in values], [_label(v) for v in values]


def _zoomed(ax, values: list[float]) -> None:
    """The y axis spans the data (with a margin), not 0…1: a change from 0.39 to 0.85 must look like one."""
    finite = [v for v in values if math.isfinite(v)]
    if finite:
        low, high = min(finite), max(finite)
        pad = max(0.05 * (high - low), 0.01)
        ax.set_ylim(low - pad, high + pad)


def _panel(ax, table: list[dict], *, group: str, y: str, error: str, ylabel: str, position: dict) -> None:
    curves = defaultdict(list)
    for row in table:
        if row["group"] == group and row["setting"] != BASELINE:
            curves[(row["self_replace_steps"], _self_layers(row), row["other_settings"])].append(row)
    selfs = sorted({self_ for self_, _, _ in curves}, key=_order)
    styles = sorted({(layers, other) for _, layers, other in curves})  # one line style each
    shown = []
    for (self_, layers, other), points in sorted(curves.items(), key=lambda kv: (kv[0][1:], _order(kv[0][0]))):
        points.sort(key=lambda r: _order(r["cross_replace_steps"]))
        color = plt.cm.viridis(selfs.index(self_) / max(len(selfs) - 1, 1) * 0.9)
        label = f"self {_label(self_)}" + (f" ({layers}{', ' + other if other else ''})" if len(styles) > 1 else "")
        ax.errorbar(
            [position[p["cross_replace_steps"]] for p in points],
            [p[y] for p in points],
            yerr=[p.get(error, math.nan) for p in points],
            marker="o",
            markersize=4,
            capsize=2,
            color=color,
            linestyle=LINESTYLES[styles.index((layers, other)) % len(LINESTYLES)],
            label=label,
        )
        shown += [p[y] + sign * p.get(error, 0.0) for p in points for sign in (-1, 1)]
    for row in (row for row in table if row["group"] == group and row["setting"] == BASELINE):
        ax.axhline(
            row[y],
            color="red",
            linestyle="--",
            linewidth=1,
            label="no injection (same seed)" + (f", {row['other_settings']}" if row["other_settings"] else ""),
        )
        shown.append(row[y])
    _zoomed(ax, shown)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(alpha=0.3)


def finding(table: list[dict]) -> str:
    """The sweep's result in one sentence, from the all-pairs rows: how far IoU (mean over the self fractions)
    moves with the cross fraction, the range of edit success, and how much the self fraction changes IoU at a
    fixed cross fraction."""
    rows = [r for r in table if r["group"] == "all" and r["setting"] != BASELINE and math.isfinite(r["mean_iou"])]
    if not rows:
        return "no judged edits"
    by_cross = defaultdict(list)
    for r in rows:
        by_cross[r["cross_replace_steps"]].append(r)
    crosses = sorted(by_cross, key=_order)
    first, last = (sum(r["mean_iou"] for r in by_cross[c]) / len(by_cross[c]) for c in (crosses[0], crosses[-1]))
    success = [r["success"] for r in rows]
    self_spread = max(
        max(r["mean_iou"] for r in group) - min(r["mean_iou"] for r in group) for group in by_cross.values()
    )
    return (
        f"layout IoU {first:.2f} → {last:.2f} from cross {_label(crosses[0])} to {_label(crosses[-1])}, "
        f"edit success {min(success):.2f}–{max(success):.2f} throughout; "
        f"the self fraction moves IoU by ≤ {self_spread:.2f}"
    )


def plot(table: list[dict], path: Path, *, title: str) -> Path:
    """2×2 over the cross-injection fraction: all pairs' IoU and success (top), color and shape swaps' IoU
    (bottom); one line per self fraction, error bars = standard errors, the no-injection baseline dashed."""
    position, ticks, tick_labels = _x_positions(table)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for ax, (group, y, error, ylabel) in zip(axes.flat, PANELS):
        _panel(ax, table, group=group, y=y, error=error, ylabel=ylabel, position=position)
        ax.set_xticks(ticks, tick_labels)
        n = next((r["n"] for r in table if r["group"] == group and r["setting"] == BASELINE), None)
        ax.set_title(
            {"all": "all pairs", "color": "color swaps", "shape": "shape swaps"}[group]
            + (f" (n = {int(n)} per point)" if n is not None else ""),
            fontsize=10,
        )
    for ax in axes[1]:
        ax.set_xlabel("cross-attention injection fraction (cross_replace_steps)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle(f"{title}\n{finding(table)}", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
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
        raise OutputExistsError(
            f"{', '.join(existing)} exist{'s' if len(existing) == 1 else ''}; refusing to overwrite "
            "an earlier aggregation (pass --out DIR, or move them away)"
        )
    out.mkdir(parents=True, exist_ok=True)
    table = summary_table(rows)
    row_columns = list(dict.fromkeys(k for r in rows for k in r))
    steps = ", ".join(str(v) for v in sorted({r["steps"] for r in rows}))
    title = (
        f"P2P word swaps on the shapes world ({', '.join(sorted({str(r['model']) for r in rows}))} model, "
        f"{steps} DDIM steps, {len({(r['source'], r['target']) for r in rows})} pairs × "
        f"{len({r['seed'] for r in rows})} seeds" + (f"; {len(skipped)} job folders skipped" if skipped else "") + ")"
    )
    paths = {
        "rows": write_csv(rows, out / OUTPUTS["rows"], row_columns),
        "summary": write_csv(table, out / OUTPUTS["summary"], SUMMARY_COLUMNS),
        "plot": plot(table, out / OUTPUTS["plot"], title=title),
    }
    return Aggregated(paths, table=table, skipped=skipped)


def read_summary(path: Path) -> list[dict]:
    """An ablation_summary.csv back into the summary table (numbers as floats), e.g. to re-draw its plot."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} is not a file; pass an ablation_summary.csv written by scripts/aggregate.py")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    missing = sorted(set(SUMMARY_COLUMNS) - set(rows[0] if rows else ()) - {"mean_iou_se"})  # older files lack it
    if not rows or missing:
        raise UserError(f"{path} is not an ablation summary: {'no rows' if not rows else f'columns {missing} missing'}")
    text = ("setting", "other_settings", "group")
    return [{k: (v if k in text or v in ("", "none", "None") else _number(v)) for k, v in row.items()} for row in rows]


def markdown_table(table: list[dict], *, group: str = "all") -> str:
    """The summary of one pair group as a Markdown table (for docs), rates in percent."""
    lines = [
        "| cross | self | self layers | n | success | mean IoU | IoU of successes | IoU ≥ 0.8 | "
        "success and IoU ≥ 0.8 | median shift (px) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        if r["group"] == group:
            cross, self_, layers = (
                ("no injection", "", "")
                if r["setting"] == BASELINE
                else (_label(r["cross_replace_steps"]), _label(r["self_replace_steps"]), _self_layers(r))
            )
            layers = ", ".join(part for part in (layers, r["other_settings"]) if part)
            lines.append(
                f"| {cross} | {self_} | {layers} | {r['n']} | {100 * r['success']:.0f}% ± {100 * r['success_se']:.0f} | "
                f"{r['mean_iou']:.2f} | {r['mean_iou_if_success']:.2f} | {100 * r['kept_layout']:.0f}% | {100 * r['success_and_kept']:.0f}% | "
                f"{r['median_centroid_shift']:.2f} |"
            )
    return "\n".join(lines)
