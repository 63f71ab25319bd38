"""Peak memory of a command, sampled from /proc over its whole process tree (Linux).

The issues' memory targets are stated in anonymous memory (RssAnon): what a run allocates itself. A safetensors
checkpoint is mmapped, so its pages are file-backed (RssFile), shared with the page cache and dropped by the
kernel under pressure; they are reported too, as total resident memory, but are not the target.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from models.errors import UserError
from models.files import write_text

GIB = 2**30


@dataclass(frozen=True)
class PeakMemory:
    command: list[str]
    returncode: int
    seconds: float
    peak_anon_bytes: int  # the largest sum of RssAnon over the tree seen in one sample
    peak_rss_bytes: int  # the same for VmRSS (anonymous + file-backed + shared)
    samples: int

    def summary(self) -> str:
        return (
            f"peak RssAnon {self.peak_anon_bytes / GIB:.2f} GiB, peak RSS {self.peak_rss_bytes / GIB:.2f} GiB, "
            f"{self.seconds:.1f} s, exit {self.returncode}"
        )


def _status_kib(pid: int, fields: tuple[str, ...]) -> dict[str, int]:
    values = dict.fromkeys(fields, 0)
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in values:
                values[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass  # the process ended between listing and reading
    return values


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants, from /proc/*/stat's parent ids."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        pid = int(text.split(" ", 1)[0])
        ppid = int(text.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces
        parents.setdefault(ppid, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(parents.get(pid, []))
    return tree


def tree_memory(root: int) -> tuple[int, int]:
    """(RssAnon, VmRSS) in bytes summed over `root`'s process tree."""
    anon = rss = 0
    for pid in process_tree(root):
        status = _status_kib(pid, ("RssAnon", "VmRSS"))
        anon += status["RssAnon"] * 1024
        rss += status["VmRSS"] * 1024
    return anon, rss


def run_measured(command: list[str], *, interval: float = 0.2, json_path: Path | None = None) -> PeakMemory:
    """Run `command`, sampling its tree's memory every `interval` s; its stdout/stderr pass through."""
    if not Path("/proc/self/status").exists():
        raise UserError("peak memory is read from /proc/<pid>/status: this needs Linux")
    if interval <= 0:
        raise UserError(f"--interval must be > 0 seconds, got {interval}")
    start = time.perf_counter()
    try:
        process = subprocess.Popen(command)
    except FileNotFoundError as err:
        raise UserError(f"cannot run {command[0]!r}: no such program") from err
    peak_anon = peak_rss = samples = 0
    while process.poll() is None:
        anon, rss = tree_memory(process.pid)
        peak_anon, peak_rss, samples = max(peak_anon, anon), max(peak_rss, rss), samples + 1
        time.sleep(interval)
    result = PeakMemory(command, process.returncode, time.perf_counter() - start, peak_anon, peak_rss, samples)
    if json_path is not None:
        write_text(json_path, json.dumps(asdict(result), indent=2) + "\n")
    return result
