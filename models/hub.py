"""What `model.checkpoint=` names: a single file, a diffusers model folder, or a Hugging Face repo id (offline).

- an existing file → that file (`models/loader.py` reads it);
- an existing folder → a diffusers model folder (`model_index.json`, `unet/`, `vae/`, `text_encoder*/`, …;
  `models/diffusers_folder.py` reads it);
- `ORG/NAME` that is not an existing path → the snapshot of that repo in the local Hugging Face cache.

The cache is read with plain path logic and nothing else: no `huggingface_hub` call, no network, ever. Its layout
(huggingface_hub's `file_download.py`, "cache-system" docs): `<cache>/models--ORG--NAME/refs/main` holds the commit
hash of the snapshot last downloaded for the `main` branch, `<cache>/models--ORG--NAME/snapshots/<hash>/…` holds
the repo's files (usually symlinks into `../../blobs/`, which `open` follows). The cache folder is huggingface_hub's:
`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`; every
one that is set is searched in that order (the first holding the repo wins), so a repo downloaded before an
environment variable was set is still found.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from models.errors import MissingFileError, UserError

WEIGHT_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".pkl", ".sft")  # a path, not a repo id
# huggingface_hub's repo-id rule (`validate_repo_id`): one "/", names of letters, digits, "-", "_", "."
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
REPO_FOLDER_PREFIX = "models--"  # the cache's folder for a model repo: models--ORG--NAME ("/" spelt "--")
MAIN_REF = Path("refs") / "main"  # the commit hash the `main` branch pointed at when last downloaded


def cache_dirs() -> list[Path]:
    """The Hugging Face hub cache folders to search, most specific first, without repeats."""
    env = os.environ
    candidates = [
        env.get("HF_HUB_CACHE"),
        env.get("HUGGINGFACE_HUB_CACHE"),  # huggingface_hub's older name for HF_HUB_CACHE
        env.get("HF_HOME") and str(Path(env["HF_HOME"]) / "hub"),
        env.get("XDG_CACHE_HOME") and str(Path(env["XDG_CACHE_HOME"]) / "huggingface" / "hub"),
        str(Path("~/.cache/huggingface/hub")),
    ]
    seen, dirs = set(), []
    for candidate in candidates:
        if candidate:
            path = Path(candidate).expanduser()
            if path not in seen:
                seen.add(path)
                dirs.append(path)
    return dirs


def looks_like_repo_id(value: str) -> bool:
    """`ORG/NAME`, not a path a user would type for a file (no weight-file suffix, no leading . / ~)."""
    return bool(REPO_ID.match(value)) and not value.lower().endswith(WEIGHT_FILE_SUFFIXES)


def snapshot_in_cache(repo_id: str, cache: Path) -> Path | None:
    """The snapshot folder of `repo_id` in one cache folder: the one `refs/main` names, else the only one; None
    when the repo is not there. Several snapshots and no `refs/main` is ambiguous: an error naming them."""
    repo = cache / (REPO_FOLDER_PREFIX + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / MAIN_REF
    if ref.is_file():
        commit = ref.read_text().strip()
        if (snapshots / commit).is_dir():
            return snapshots / commit
        raise MissingFileError(
            f"{repo_id!r}: {ref} names snapshot {commit!r}, which is not in {snapshots} (an interrupted "
            "download?); download the repo again or pass model.checkpoint=<its snapshot folder>"
        )
    found = sorted(p for p in snapshots.iterdir() if p.is_dir())
    if len(found) == 1:
        return found[0]
    if found:
        raise UserError(
            f"{repo_id!r} has {len(found)} snapshots in {snapshots} ({', '.join(p.name for p in found)}) and no "
            f"{MAIN_REF} to choose one; pass model.checkpoint=<one snapshot folder>"
        )
    return None


def resolve_checkpoint(value: str | Path) -> Path:
    """A `model.checkpoint=` value → an existing file or folder. Repo ids are looked up in the local cache only;
    a value that is neither an existing path nor a cached repo raises one line naming where it looked."""
    path = Path(value).expanduser()
    if path.exists():
        return path
    text = str(value)
    if not looks_like_repo_id(text):
        raise MissingFileError(f"checkpoint {text!r} does not exist")
    dirs = cache_dirs()
    for cache in dirs:
        snapshot = snapshot_in_cache(text, cache)
        if snapshot is not None:
            return snapshot
    raise MissingFileError(
        f"checkpoint {text!r} is not a file or folder, and as a Hugging Face repo id it is not in the local cache "
        f"(looked for {REPO_FOLDER_PREFIX}{text.replace('/', '--')} in: {', '.join(map(str, dirs))}); nothing is "
        "downloaded here: fetch it once with `huggingface-cli download "
        f"{text}` (set HF_HUB_CACHE or HF_HOME if your cache is elsewhere) or pass the path of a file or folder"
    )
