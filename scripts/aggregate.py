"""Collect an ablation sweep into CSVs and the plot (issue 5); the work is `p2p.experiments.ablation_report`.

    python scripts/aggregate.py multirun/ablate/2026-11-24/15-00-00_000000 [--out DIR] [--markdown]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from models.errors import UserError  # noqa: E402
from p2p.experiments.ablation_report import aggregate, markdown_table  # noqa: E402
from scripts._cli import fail  # noqa: E402


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
