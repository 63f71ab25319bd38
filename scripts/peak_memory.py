"""Run a command and report its peak memory: anonymous (RssAnon) and total resident, over its whole process tree.

python scripts/peak_memory.py [--json OUT.json] [--interval 0.2] -- python scripts/edit.py model=sdxl ...

RssAnon is the memory the run allocated itself; a safetensors checkpoint's mmapped pages are file-backed (RssFile)
and the kernel can drop them, so the issue's memory targets are stated in RssAnon. Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from models.errors import UserError  # noqa: E402
from p2p.experiments.peak import run_measured  # noqa: E402
from scripts._cli import fail  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the measurement here (refuses to overwrite)"
    )
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples of /proc")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        fail("no command given: pass it after --, e.g. peak_memory.py -- python scripts/edit.py model=tiny")
    try:
        result = run_measured(command, interval=args.interval, json_path=args.json)
    except UserError as error:
        fail(str(error))
    print(result.summary())
    sys.exit(result.returncode)


if __name__ == "__main__":
    main()
