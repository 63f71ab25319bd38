"""The pictures of one edit (all from p2p/views.py) and its files, named as scripts/edit.py names them."""

from __future__ import annotations

import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from models.files import write_text
from p2p import views
from p2p.app.photos import INVERSIONS, Photo
from p2p.app.requests import EditRequest
from p2p.edit import EditResult

SELF_COMPONENTS = 6  # SVD components shown (P2P_SPEC §6)


@dataclass
class Shown:
    """One edit as the page shows it."""

    request: EditRequest
    result: EditResult
    baseline: np.ndarray  # uint8 (P, H, W, 3): every prompt sampled alone from the same start
    photo: Photo | None = None  # when editing a photo


def labels(prompts: list[str]) -> list[str]:
    return ["source: " + prompts[0]] + [f"edit: {p}" for p in prompts[1:]]


def grid(shown: Shown) -> Image.Image:
    """Source and edits, then the same-seed baseline (as scripts/edit.py's grid.png with baseline=true)."""
    prompts = shown.request.prompts
    rows = []
    if shown.photo is not None:
        rows.append(
            [
                views.captioned(shown.photo.original, "photo"),
                views.captioned(shown.photo.reconstruction, f"{shown.photo.method} reconstruction"),
            ]
        )
    rows.append([views.captioned(im, c) for im, c in zip(shown.result.images, labels(prompts))])
    rows.append([views.captioned(im, f"same start, no injection: {p}") for im, p in zip(shown.baseline, prompts)])
    return views.grid(rows)


def cross_attention(shown: Shown) -> Image.Image:
    """Per-token cross-attention maps of every prompt of the current edit (paper Fig. 4), one row per prompt."""
    prompts = shown.request.prompts
    return views.grid(
        [
            views.cross_attention_tiles(shown.result.store, p, i, grids=_cross_grids(shown))
            for i, p in enumerate(prompts)
        ]
    )


def _cross_grids(shown: Shown) -> list[tuple[int, int]]:
    store = shown.result.store
    return sorted({s.query_hw for s in store.sites.values() if s.kind == "cross"})


def blend_mask(shown: Shown) -> Image.Image | None:
    blend = shown.result.blend
    if blend is None or blend.last_mask is None:
        return None
    return views.grid([views.mask_tiles(blend.last_mask, ["source"] + shown.request.prompts[1:])])


def self_attention(shown: Shown) -> Image.Image:
    """Top SVD components of each prompt's self-attention at the finest recorded grid."""
    store = shown.result.store
    grid_hw = max({s.query_hw for s in store.sites.values() if s.kind == "self"}, key=lambda hw: hw[0] * hw[1])
    return views.grid(
        [
            [views.captioned(image, label)]
            + views.self_attention_components(store, i, grid_hw=grid_hw, count=SELF_COMPONENTS)
            for i, (image, label) in enumerate(zip(shown.result.images, labels(shown.request.prompts)))
        ]
    )


def save(shown: Shown, out: Path, *, model_config: dict) -> list[Path]:
    """The files scripts/edit.py writes (baseline=true attention=true) and a zip of them; returns the paths."""
    prompts = shown.request.prompts
    out.mkdir(parents=True, exist_ok=True)
    for i, (image, baseline, prompt) in enumerate(zip(shown.result.images, shown.baseline, prompts)):
        views.save_png(Image.fromarray(image), out / f"{i:02d}_{views_slug(prompt)}.png")
        views.save_png(Image.fromarray(baseline), out / "baseline" / f"{i:02d}_{views_slug(prompt)}.png")
        views.save_png(
            views.grid([views.cross_attention_tiles(shown.result.store, prompt, i, grids=_cross_grids(shown))]),
            out / "attention" / f"{i:02d}_{views_slug(prompt)}.png",
        )
    mask = blend_mask(shown)
    if mask is not None:
        views.save_png(mask, out / "blend_mask.png")
    config = shown.request.config(model_config)
    if shown.photo is not None:  # as scripts/edit_image.py: the photo and its inversion's settings
        views.save_png(Image.fromarray(shown.photo.original), out / "original.png")
        views.save_png(Image.fromarray(shown.photo.reconstruction), out / "inversion_reconstruction.png")
        config = shown.request.config(
            model_config, inversion=asdict(INVERSIONS[shown.photo.method]), image=str((out / "original.png").resolve())
        )
    views.save_png(grid(shown), out / "grid.png")
    write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    archive = Path(shutil.make_archive(str(out), "zip", root_dir=out))
    return [archive, out / "grid.png", out / "config.yaml"]


def views_slug(prompt: str) -> str:
    """The file-name form of a prompt, as scripts/_common.slug makes it (scripts/ is not importable from p2p/)."""
    return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:60] or "prompt"
