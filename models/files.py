"""Writing a file completely or not at all, and never over an earlier output by accident.

Every file this project writes — checkpoints, images, configs, JSON reports, CSVs, plots — goes through
`atomic_path`: the writer fills a hidden temporary file beside the target, and only a writer that finished
renames it into place (one `os.replace`, atomic on POSIX). A crash, a bug or Ctrl-C halfway leaves no file that
looks finished but isn't; at most a `.<name>.partial-<pid><suffix>` that nothing reads.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from models.errors import OutputExistsError


@contextlib.contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write to; on a clean exit it becomes `path`, on an exception it is removed.

    The temporary name keeps the suffix, so writers that infer the format from it (Pillow, matplotlib) work.
    Refuses (OutputExistsError) when `path` exists, unless `overwrite`.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
    try:
        yield partial
        if path.exists() and not overwrite:  # someone wrote it meanwhile: keep theirs
            raise OutputExistsError(f"{path} appeared while it was being written; refusing to overwrite it")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_text(path: str | Path, text: str, *, overwrite: bool = False) -> Path:
    """`Path.write_text`, atomically and without overwriting (see `atomic_path`)."""
    with atomic_path(path, overwrite=overwrite) as partial:
        partial.write_text(text)
    return Path(path)
