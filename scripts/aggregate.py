"""Collect an ablation sweep (scripts/ablate.py -m …) into CSVs and plot edit success vs. preservation (issue 5).

    python scripts/aggregate.py multirun/ablate/2026-11-24/15-00-00_000000 [--out DIR] [--markdown]

Reads every job's rows.json under the folder and writes (into the folder, or --out; never overwriting):
- ablation_rows.csv     one row per (setting, seed, pair): the job settings and `p2p.metrics.score_edit` fields;
- ablation_summary.csv  per (cross fraction, self fraction, pair group), pooled over seeds and pairs with
                        `p2p.metrics.summarize` (edits of sources the model drew correctly): success, mean IoU,
                        kept layout (IoU ≥ 0.8), success and kept, median centroid shift; groups: all pairs,
                        color swaps, shape swaps; plus the same-seed, no-injection baseline (setting "none");
- ablation.png          success vs. mean IoU and vs. centroid shift, one curve per self fraction, points
                        labelled by the cross fraction, the baseline as a star; bottom: color vs. shape swaps.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from omegaconf import OmegaConf  # noqa: E402

from p2p.metrics import summarize  # noqa: E402

# A job's setting = these fields of its config.yaml's `edit` (any of them may be swept); seeds are pooled.
SETTINGS = ("cross_replace_steps", "self_replace_steps", "self_max_fraction", "self_max_side")
RATES = ("n", "success", "success_se", "mean_iou", "mean_iou_if_success", "kept_layout", "success_and_kept",
         "median_centroid_shift")
SUMMARY_COLUMNS = ("setting", *SETTINGS, "group", "seeds", *RATES)
GROUPS = {"all": lambda swap: True, "color": lambda swap: swap == "color", "shape": lambda swap: swap == "shape"}
BASELINE = "none"  # the setting column of same-seed sampling without injection


def load_rows(folder: Path) -> list[dict]:
    files = sorted(Path(folder).rglob("rows.json"))
    if not files:
        raise FileNotFoundError(f"no rows.json under {folder}; run scripts/ablate.py -m … first (its jobs write "
                                "one rows.json each into the sweep folder)")
    rows = []
    for f in files:  # the job's resolved config says its setting, whatever was swept
        edit = OmegaConf.to_container(OmegaConf.load(f.parent / "config.yaml").edit)
        rows += [{**row, **{k: edit[k] for k in SETTINGS}} for row in json.loads(f.read_text())]
    return rows


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
        settings[tuple(_number(row[k]) for k in SETTINGS)].append(row)
    table = []
    for setting, group_rows in sorted(settings.items(), key=lambda kv: [_order(v) for v in kv[0]]):
        for group, keep in GROUPS.items():
            chosen = [r for r in group_rows if keep(r["swap"])]
            if chosen:
                table.append({"setting": "p2p", **dict(zip(SETTINGS, setting)), "group": group,
                              "seeds": len({r["seed"] for r in chosen}), **rates(chosen, prefix="edit")})
    # The baseline does not depend on the injection fractions: every job of a seed repeats it, count it once.
    unique = {(r["source"], r["target"], r["seed"], r["steps"], r["guidance"], r["model"]): r
              for r in rows if "baseline_iou" in r}
    for group, keep in GROUPS.items():
        chosen = [r for r in unique.values() if keep(r["swap"])]
        if chosen:
            table.append({"setting": BASELINE, **{k: BASELINE for k in SETTINGS}, "group": group, "seeds": len({r["seed"] for r in chosen}), **rates(chosen, prefix="baseline")})
    return table


def write_csv(rows: list[dict], path: Path, columns) -> Path:
    if path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite it (pass --out DIR)")
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _self_layers(row: dict) -> str:
    """Which layers get self-attention injection (`p2p.edit.self_max_queries`)."""
    if row["self_max_side"] not in (None, "None"):
        return f"side ≤ {_label(row['self_max_side'])}"
    return f"side ≤ {_label(row['self_max_fraction'])}·latent"


LINESTYLES = ("-", "--", ":", "-.")  # one per set of self-injected layers; colors tell the self fraction


def _panel(ax, table: list[dict], *, group: str, x: str, xlabel: str) -> None:
    curves = defaultdict(list)
    for row in table:
        if row["group"] == group and row["setting"] != BASELINE:
            curves[(row["self_replace_steps"], _self_layers(row))].append(row)
    selfs = sorted({self_ for self_, _ in curves}, key=_order)
    layer_sets = sorted({layers for _, layers in curves})
    for (self_, layers), points in sorted(curves.items(), key=lambda kv: (kv[0][1], _order(kv[0][0]))):
        points.sort(key=lambda r: _order(r["cross_replace_steps"]))
        color = plt.cm.viridis(selfs.index(self_) / max(len(selfs) - 1, 1) * 0.9)
        label = f"self {_label(self_)}" + (f" ({layers})" if len(layer_sets) > 1 else "")
        ax.plot([p[x] for p in points], [p["success"] for p in points], marker="o", color=color,
                linestyle=LINESTYLES[layer_sets.index(layers) % len(LINESTYLES)], label=label)
        for p in points:
            ax.annotate(_label(p["cross_replace_steps"]), (p[x], p["success"]), textcoords="offset points",
                        xytext=(4, 3), fontsize=7, color=color)
    for row in table:
        if row["group"] == group and row["setting"] == BASELINE:
            ax.plot([row[x]], [row["success"]], "r*", markersize=14, label="no injection (same seed)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("edit success (target reads as its caption)")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)


def plot(table: list[dict], path: Path, *, title: str) -> Path:
    """2×2: all pairs vs IoU and vs centroid shift; color swaps and shape swaps vs IoU."""
    if path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite it (pass --out DIR)")
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
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def aggregate(folder: Path, out: Path | None = None) -> dict[str, Path]:
    out = Path(out or folder)
    out.mkdir(parents=True, exist_ok=True)
    rows = load_rows(folder)
    table = summary_table(rows)
    row_columns = list(dict.fromkeys(k for r in rows for k in r))
    first = rows[0]
    title = (f"P2P word swaps on the shapes world ({first['model']} model, {first['steps']} DDIM steps, "
             f"{len({(r['source'], r['target']) for r in rows})} pairs × {len({r['seed'] for r in rows})} seeds)")
    return {"rows": write_csv(rows, out / "ablation_rows.csv", row_columns),
            "summary": write_csv(table, out / "ablation_summary.csv", SUMMARY_COLUMNS),
            "plot": plot(table, out / "ablation.png", title=title)}


def markdown_table(table: list[dict], *, group: str = "all") -> str:
    """The summary of one pair group as a Markdown table (for docs), rates in percent."""
    lines = ["| cross | self | self layers | n | success | mean IoU | IoU of successes | IoU ≥ 0.8 | "
             "success and IoU ≥ 0.8 | median shift (px) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        if r["group"] == group:
            cross, self_, layers = (("no injection", "", "") if r["setting"] == BASELINE else
                                    (_label(r["cross_replace_steps"]), _label(r["self_replace_steps"]), _self_layers(r)))
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
    for name, path in aggregate(args.folder, args.out).items():
        print(f"{name}: {path}")
    if args.markdown:
        print(markdown_table(summary_table(load_rows(args.folder))))


if __name__ == "__main__":
    main()
