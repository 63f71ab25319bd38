"""Collect an ablation sweep (scripts/ablate.py -m …) into CSVs and plot edit success vs. preservation (issue 5).

    python scripts/aggregate.py multirun/ablate/2026-11-24/15-00-00_000000 [--out DIR]

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

from p2p.metrics import summarize  # noqa: E402

RATES = ("n", "success", "success_se", "mean_iou", "kept_layout", "success_and_kept", "median_centroid_shift")
SUMMARY_COLUMNS = ("setting", "cross_replace_steps", "self_replace_steps", "group", "seeds", *RATES)
GROUPS = {"all": lambda swap: True, "color": lambda swap: swap == "color", "shape": lambda swap: swap == "shape"}
BASELINE = "none"  # the setting column of same-seed sampling without injection


def load_rows(folder: Path) -> list[dict]:
    files = sorted(Path(folder).rglob("rows.json"))
    if not files:
        raise FileNotFoundError(f"no rows.json under {folder}; run scripts/ablate.py -m … first (its jobs write "
                                "one rows.json each into the sweep folder)")
    return [row for f in files for row in json.loads(f.read_text())]


def rates(rows: list[dict], *, prefix: str) -> dict:
    """`summarize` with every column present (NaN when no source was drawn correctly) and a standard error."""
    summary = summarize(rows, prefix=prefix)
    out = {k: summary.get(k, math.nan) for k in RATES if k != "success_se"}
    n, p = out["n"], out["success"]
    out["success_se"] = math.sqrt(p * (1 - p) / n) if n else math.nan
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
        settings[(_number(row["cross_replace_steps"]), _number(row["self_replace_steps"]))].append(row)
    table = []
    for (cross, self_), group_rows in sorted(settings.items(), key=lambda kv: (_order(kv[0][0]), _order(kv[0][1]))):
        for group, keep in GROUPS.items():
            chosen = [r for r in group_rows if keep(r["swap"])]
            if chosen:
                table.append({"setting": "p2p", "cross_replace_steps": cross, "self_replace_steps": self_,
                              "group": group, "seeds": len({r["seed"] for r in chosen}), **rates(chosen, prefix="edit")})
    # The baseline does not depend on the injection fractions: every job of a seed repeats it, count it once.
    unique = {(r["source"], r["target"], r["seed"], r["steps"], r["guidance"], r["model"]): r
              for r in rows if "baseline_iou" in r}
    for group, keep in GROUPS.items():
        chosen = [r for r in unique.values() if keep(r["swap"])]
        if chosen:
            table.append({"setting": BASELINE, "cross_replace_steps": BASELINE, "self_replace_steps": BASELINE,
                          "group": group, "seeds": len({r["seed"] for r in chosen}), **rates(chosen, prefix="baseline")})
    return table


def write_csv(rows: list[dict], path: Path, columns) -> Path:
    if path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite it (pass --out DIR)")
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _panel(ax, table: list[dict], *, group: str, x: str, xlabel: str) -> None:
    curves = defaultdict(list)
    for row in table:
        if row["group"] == group and row["setting"] != BASELINE:
            curves[row["self_replace_steps"]].append(row)
    for self_, points in sorted(curves.items(), key=lambda kv: _order(kv[0])):
        points.sort(key=lambda r: _order(r["cross_replace_steps"]))
        line, = ax.plot([p[x] for p in points], [p["success"] for p in points], "o-", label=f"self {_label(self_)}")
        for p in points:
            ax.annotate(_label(p["cross_replace_steps"]), (p[x], p["success"]), textcoords="offset points",
                        xytext=(4, 3), fontsize=7, color=line.get_color())
    for row in table:
        if row["group"] == group and row["setting"] == BASELINE:
            ax.plot([row[x]], [row["success"]], "k*", markersize=12, label="no injection (same seed)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("edit success (target reads as its caption)")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)


def plot(table: list[dict], path: Path, *, title: str) -> Path:
    """2×2: all pairs vs IoU and vs centroid shift; color swaps and shape swaps vs IoU."""
    if path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite it (pass --out DIR)")
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    iou = "layout preservation: mean object-mask IoU, source vs edit"
    _panel(axes[0, 0], table, group="all", x="mean_iou", xlabel=iou)
    _panel(axes[0, 1], table, group="all", x="median_centroid_shift", xlabel="median centroid shift (px, lower = better)")
    _panel(axes[1, 0], table, group="color", x="mean_iou", xlabel=iou)
    _panel(axes[1, 1], table, group="shape", x="mean_iou", xlabel=iou)
    axes[0, 1].invert_xaxis()  # right = better on every panel
    for ax, name in zip(axes.flat, ("all pairs", "all pairs", "color swaps", "shape swaps")):
        ax.set_title(f"{name} (point labels: cross fraction)", fontsize=10)
    axes[0, 0].legend(fontsize=8, loc="lower left")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the sweep folder of scripts/ablate.py -m (multirun/ablate/DATE/TIME)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the sweep folder)")
    args = parser.parse_args(argv)
    for name, path in aggregate(args.folder, args.out).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
