"""Pictures of the mechanism: captioned grids, per-token cross-attention tiles (paper Fig. 4),
self-attention SVD components (P2P_SPEC §6) and LocalBlend masks. Everything returns PIL images.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from p2p.controllers import AttentionStore
from p2p.tokens import decode_tokens

CAPTION_HEIGHT_FRACTION = 0.2  # caption strip height relative to the tile (the reference: 0.2)
MIN_TILE = 96  # tiles are upscaled (nearest) to at least this many pixels so 32 px images stay readable


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has a single bitmap size
        return ImageFont.load_default()


def _wrap(text: str, width_px: int, font) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > width_px:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + ([line] if line else [])


def captioned(image: np.ndarray | Image.Image, caption: str, *, size: int | None = None) -> Image.Image:
    """The image (upscaled with nearest to `size`) with `caption` centred underneath."""
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    size = size or max(MIN_TILE, image.width)
    scale = size / image.width
    image = image.convert("RGB").resize((size, max(1, round(image.height * scale))), Image.NEAREST)
    font = _font(max(10, size // 10))
    lines = _wrap(caption, size - 4, font)
    line_height = font.getbbox("Ag")[3] + 2
    strip = max(int(size * CAPTION_HEIGHT_FRACTION), line_height * len(lines) + 4)
    canvas = Image.new("RGB", (image.width, image.height + strip), "white")
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text(((image.width - font.getlength(line)) / 2, image.height + 2 + i * line_height), line,
                  fill="black", font=font)
    return canvas


def grid(tiles: Sequence[Sequence[Image.Image]], *, gap: int = 4) -> Image.Image:
    """Rows of tiles (each row may have its own length) on a white canvas."""
    width = max(sum(t.width for t in row) + gap * (len(row) - 1) for row in tiles)
    heights = [max(t.height for t in row) for row in tiles]
    canvas = Image.new("RGB", (width, sum(heights) + gap * (len(tiles) - 1)), "white")
    y = 0
    for row, height in zip(tiles, heights):
        x = 0
        for tile in row:
            canvas.paste(tile, (x, y))
            x += tile.width + gap
        y += height + gap
    return canvas


def image_grid(images: np.ndarray, captions: Sequence[str], *, columns: int | None = None) -> Image.Image:
    """uint8 (N, H, W, 3) images with captions, `columns` per row (default: all in one row)."""
    tiles = [captioned(im, c) for im, c in zip(images, captions)]
    columns = columns or len(tiles)
    return grid([tiles[i:i + columns] for i in range(0, len(tiles), columns)])


def token_maps(store: AttentionStore, prompt_index: int, *, grids: Sequence[tuple[int, int]] | None = None,
               step: int | None = None) -> torch.Tensor:
    """(L, h, w) cross-attention per token (L = the model's text positions, 77 for SD) for one prompt: averaged over heads (done by the store), over
    the recorded text layers whose grid is in `grids` (None: all), and over steps (or one `step`).
    Layers of different grids are upsampled (nearest) to the largest before averaging.
    Each pixel's maps sum to 1 over the tokens when only cross layers are averaged; a hybrid layer contributes
    its text columns as the model computed them, which sum to the share of attention that went to text (< 1)."""
    source = store.steps.get(step) if step is not None else None
    if step is not None and source is None:
        raise ValueError(f"step {step} was not recorded; build the store with per_step=True "
                         f"(recorded steps: {sorted(store.steps)})")
    names = [n for n, s in store.sites.items() if s.kind != "self" and (grids is None or s.query_hw in grids)]
    if not names:
        available = sorted({s.query_hw for s in store.sites.values() if s.kind != "self"})
        raise ValueError(f"no recorded text-attention layers at {grids}; recorded grids: {available}")
    target = max((store.sites[n].query_hw for n in names), key=lambda hw: hw[0] * hw[1])
    maps = []
    for name in names:
        site = store.sites[name]
        m = source[name] if source is not None else store.average(name)
        m = m[prompt_index, :, :site.num_text_keys].T.reshape(1, -1, *site.query_hw)  # (1, L, h, w)
        maps.append(F.interpolate(m, size=target, mode="nearest")[0])
    return torch.stack(maps).mean(dim=0)


def heat(map_2d: torch.Tensor, *, size: int = MIN_TILE) -> np.ndarray:
    """A map normalised to its own max → uint8 RGB tile (grayscale), as in the reference's `show_cross_attention`."""
    m = map_2d.float().clamp_min(0)
    m = (255 * m / m.max().clamp_min(1e-12)).round().to(torch.uint8).numpy()
    return np.asarray(Image.fromarray(m).resize((size, round(size * m.shape[0] / m.shape[1])), Image.BILINEAR).convert("RGB"))


def cross_attention_tiles(store: AttentionStore, prompt: str, prompt_index: int, *,
                          grids: Sequence[tuple[int, int]] | None = None, step: int | None = None) -> list[Image.Image]:
    """One captioned tile per token of `prompt` (start and end tokens included, as in Fig. 4)."""
    maps = token_maps(store, prompt_index, grids=grids, step=step)
    tokens = ["<start>", *decode_tokens(prompt), "<end>"]
    return [captioned(heat(maps[i]), token) for i, token in enumerate(tokens)]


def self_attention_components(store: AttentionStore, prompt_index: int, *, grid_hw: tuple[int, int],
                              count: int = 6) -> list[Image.Image]:
    """Top SVD components of the (res², res²) self-attention map with row means removed (P2P_SPEC §6).
    Hybrid layers contribute their pixel columns."""
    names = store.names(kinds=("self", "hybrid"), grid=grid_hw)
    if not names:
        raise ValueError(f"no self-attention layers recorded at {grid_hw}; build the store with kinds including "
                         f"'self' (recorded: {sorted({s.query_hw for s in store.sites.values() if s.kind != 'cross'})})")
    maps = [store.average(n)[prompt_index, :, store.sites[n].num_text_keys:] for n in names]
    aggregate = torch.stack(maps).mean(dim=0).double().numpy()  # (res², res²)
    _, _, vh = np.linalg.svd(aggregate - aggregate.mean(axis=1, keepdims=True))
    tiles = []
    for k in range(min(count, vh.shape[0])):
        component = vh[k].reshape(grid_hw)
        component = component - component.min()
        tiles.append(captioned(heat(torch.from_numpy(component)), f"component {k}"))
    return tiles


def mask_tiles(mask: torch.Tensor, captions: Sequence[str]) -> list[Image.Image]:
    """LocalBlend masks (P, 1, h, w) as white-on-black tiles."""
    return [captioned(heat(m[0]), c) for m, c in zip(mask.float(), captions)]


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Save, refusing to overwrite: what a user made is never lost."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
