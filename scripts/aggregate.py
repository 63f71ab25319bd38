"""Collect an ablation sweep into CSVs and the plot (issue 5); the work is `p2p.experiments.ablation_report`.

python scripts/aggregate.py multirun/ablate/2026-11-24/15-00-00_000000 [--out DIR] [--markdown]
python scripts/aggregate.py --replot docs/ablation_summary.csv --out DIR --title "…"   # the plot alone
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from models.errors import UserError  # noqa: E402
from p2p.experiments.ablation_report import OUTPUTS, aggregate, markdown_table, plot, read_summary  # noqa: E402
from scripts._cli import fail  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "folder", type=Path, nargs="?", help="the sweep folder of scripts/ablate.py -m (multirun/ablate/DATE/TIME)"
    )
    parser.add_argument("--replot", type=Path, default=None, help="re-draw ablation.png from this ablation_summary.csv")
    parser.add_argument("--title", default="P2P word swaps on the shapes world", help="the plot's title (--replot)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the sweep folder)")
    parser.add_argument("--markdown", action="store_true", help="also print the all-pairs summary as a Markdown table")
    args = parser.parse_args(argv)
    if (args.folder is None) == (args.replot is None):
        fail("pass either the sweep folder or --replot SUMMARY.csv")
    try:
        if args.replot is not None:
            out = Path(args.out or args.replot.parent) / OUTPUTS["plot"]
            print(f"plot: {plot(read_summary(args.replot), out, title=args.title)}")
            return
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
