"""PIE-Bench summary: the mean of every metric, overall and per edit type, with the published rows beside ours.

Units as the paper's table prints them: structure distance ×10³, PSNR dB, LPIPS ×10³, MSE ×10⁴, SSIM ×10²,
CLIP similarity as CLIPScore (×100 cosine). results.csv keeps the raw values.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path

from models.files import write_text
from p2p.experiments.pie_bench import mean, read_rows, type_name, write_results
from p2p.experiments.pie_metrics import METRICS

SCALE = {
    "structure_distance": 1e3,
    "psnr": 1.0,
    "lpips": 1e3,
    "mse": 1e4,
    "ssim": 1e2,
    "clip_whole": 1.0,
    "clip_edited": 1.0,
    "edit_success": 1e2,
}
HEADERS = {
    "structure_distance": "structure ×10³ ↓",
    "psnr": "PSNR ↑",
    "lpips": "LPIPS ×10³ ↓",
    "mse": "MSE ×10⁴ ↓",
    "ssim": "SSIM ×10² ↑",
    "clip_whole": "CLIP whole ↑",
    "clip_edited": "CLIP edited ↑",
    "edit_success": "edit success % ↑",
}
# Ju et al. 2023, Table 1 (SD 1.4, 50 steps, guidance 7.5, P2P): in the units above. The null-text row's time is the
# paper's on an A100-class GPU; the DDIM and negative-prompt rows as P2P_SPEC §7 quotes them (two columns).
PUBLISHED = {
    "Direct Inversion + P2P (published)": {
        "structure_distance": 11.65,
        "psnr": 27.22,
        "lpips": 54.55,
        "mse": 32.86,
        "ssim": 84.76,
        "clip_whole": 25.02,
        "clip_edited": 22.10,
    },
    "null-text inversion + P2P (published)": {
        "structure_distance": 13.44,
        "psnr": 27.03,
        "lpips": 60.67,
        "mse": 35.86,
        "ssim": 84.11,
        "clip_whole": 24.75,
        "clip_edited": 21.86,
        "seconds": 148.0,
    },
    "negative-prompt inversion + P2P (published)": {"structure_distance": 16.2, "psnr": 26.2},
    "DDIM inversion + P2P (published)": {"structure_distance": 69.4, "psnr": 17.9},
}
COLUMNS = [*METRICS, "edit_success"]


def summary_rows(rows: list[dict], *, label: str) -> list[dict]:
    """Overall then per edit type: n, the scaled mean of every metric present, seconds per image."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[str(row["editing_type_id"])].append(row)
    out = []
    for name, members in [("all", rows)] + [(t, groups[t]) for t in sorted(groups)]:
        line = {"run": label, "edit_type": "all" if name == "all" else f"{name} {type_name(name)}", "n": len(members)}
        for column in COLUMNS:
            if any(column in r for r in members):
                line[column] = round(mean([r.get(column) for r in members]) * SCALE[column], 2)
        line["seconds"] = round(mean([r["seconds"] for r in members]), 2)
        out.append(line)
    return out


def write_summary(out: str | Path, *, label: str = "ours") -> tuple[Path, Path]:
    """summary.csv and summary.md in `out` (results.csv rebuilt from rows/ first); returns their paths."""
    out = Path(out)
    write_results(out)
    rows = read_rows(out)
    ours = summary_rows(rows, label=label)
    columns = [c for c in COLUMNS if any(c in line for line in ours)]
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=["run", "edit_type", "n", *columns, "seconds"], lineterminator="\n", extrasaction="ignore"
    )
    writer.writeheader()
    writer.writerows(ours)
    csv_path = write_text(out / "summary.csv", buffer.getvalue(), overwrite=True)

    def cell(line: dict, column: str) -> str:
        return "" if line.get(column) is None else f"{line[column]:g}"

    head = ["run", "edit type", "n", *[HEADERS[c] for c in columns], "s / image"]
    lines = [
        f"# PIE-Bench summary: {out}",
        "",
        f"{len(rows)} entries; units as the paper's Table 1.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for line in [
        *ours[:1],
        *[{"run": name, "edit_type": "all", "n": 700, **values} for name, values in PUBLISHED.items()],
        *ours[1:],
    ]:
        lines.append(
            "| "
            + " | ".join(
                [
                    line["run"],
                    line["edit_type"],
                    str(line["n"]),
                    *[cell(line, c) for c in columns],
                    cell(line, "seconds"),
                ]
            )
            + " |"
        )
    md_path = write_text(out / "summary.md", "\n".join(lines) + "\n", overwrite=True)
    return csv_path, md_path


def comparison_markdown(runs: dict[str, str | Path], *, keys: set[str] | None = None) -> str:
    """One markdown table: the overall row of each run folder (label → folder), then the published rows;
    `keys`: only these entries of every run (the same subset for a fair comparison)."""
    lines = [
        summary_rows([r for r in read_rows(folder) if keys is None or r["key"] in keys], label=label)[0]
        for label, folder in runs.items()
    ]
    columns = [c for c in COLUMNS if any(c in line for line in lines)]
    head = ["run", "n", *[HEADERS[c] for c in columns], "s / image"]
    text = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    published = [{"run": name, "n": 700, **values} for name, values in PUBLISHED.items()]
    for line in lines + published:
        cells = ["" if line.get(c) is None else f"{line[c]:g}" for c in [*columns, "seconds"]]
        text.append("| " + " | ".join([line["run"], str(line["n"]), *cells]) + " |")
    return "\n".join(text) + "\n"
