"""Pictures of the mechanism: captioned grids, per-token cross-attention tiles (paper Fig. 4),
self-attention SVD components (P2P_SPEC §6) and LocalBlend masks. Everything returns PIL images.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from models.errors import UserError
from models.files import atomic_path
from p2p.controllers import AttentionStore
from p2p.schedules import WordLookup
from p2p.tokens import decode_tokens, word_token_positions, words

CAPTION_HEIGHT_FRACTION = 0.2  # caption strip height relative to the tile (the reference: 0.2)
MIN_TILE = 96  # tiles are upscaled (nearest) to at least this many pixels so 32 px images stay readable


# A caption may hold any text a prompt can (accents, dashes, symbols): Pillow's built-in font has glyphs for ASCII
# only, so captions use DejaVu Sans (Latin, Greek, Cyrillic, most symbols), which matplotlib — a dependency of the
# package — ships with its data. Characters DejaVu lacks (CJK, emoji) still draw as boxes.
CAPTION_FONT = "DejaVuSans.ttf"


@functools.cache
def _font_file() -> str | None:
    spec = importlib.util.find_spec("matplotlib")  # located, not imported: views stays quick to import
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / CAPTION_FONT
    return str(path) if path.is_file() else None


@functools.cache
def font(size: int) -> ImageFont.ImageFont:
    """The caption font at `size` px: DejaVu Sans when matplotlib's copy is there, else Pillow's default."""
    if _font_file() is not None:
        try:
            return ImageFont.truetype(_font_file(), size)
        except (OSError, ImportError):  # a Pillow built without FreeType
            pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has a single bitmap size
        return ImageFont.load_default()


def wrap(text: str, width_px: float, typeface: ImageFont.ImageFont) -> list[str]:
    """`text` as lines no wider than `width_px`: broken at spaces, and inside a word only when the word alone
    is wider than the line (a long word or a 300-character token would otherwise run off the tile)."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if typeface.getlength(candidate) <= width_px:
            line = candidate
            continue
        if line:
            lines.append(line)
        while len(word) > 1 and typeface.getlength(word) > width_px:  # the longest head that fits, at least a letter
            cut = 1
            while cut < len(word) and typeface.getlength(word[: cut + 1]) <= width_px:
                cut += 1
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    return lines + ([line] if line else [])


def captioned(image: np.ndarray | Image.Image, caption: str, *, size: int | None = None) -> Image.Image:
    """The image (upscaled with nearest to `size` px wide) with `caption` centred underneath, wrapped to the
    tile's width. Font and strip scale with the tile's shorter side, so a wide tile gets no giant caption."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise UserError(
                f"images are uint8 (H, W) or (H, W, 3) arrays (or PIL images), got dtype {image.dtype}; "
                "convert with (255 * image).round().clip(0, 255).astype(np.uint8)"
            )
        image = Image.fromarray(image)
    size = size or max(MIN_TILE, image.width)
    scale = size / image.width
    image = image.convert("RGB").resize((size, max(1, round(image.height * scale))), Image.NEAREST)
    side = min(image.width, image.height)
    caption_font = font(max(10, side // 10))
    lines = wrap(str(caption), image.width - 4, caption_font)
    line_height = caption_font.getbbox("Ag")[3] + 2
    strip = max(int(side * CAPTION_HEIGHT_FRACTION), line_height * len(lines) + 4)
    canvas = Image.new("RGB", (image.width, image.height + strip), "white")
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text(
            ((image.width - caption_font.getlength(line)) / 2, image.height + 2 + i * line_height),
            line,
            fill="black",
            font=caption_font,
        )
    return canvas


def grid(tiles: Sequence[Sequence[Image.Image]], *, gap: int = 4) -> Image.Image:
    """Rows of tiles (each row may have its own length and its tiles their own sizes) on a white canvas;
    a row is as tall as its tallest tile, tiles sit at the top left of their cell."""
    rows = [list(row) for row in tiles]
    if not rows or not all(rows):
        raise UserError(
            f"grid needs at least one row and a tile in every row; got rows of {[len(row) for row in rows]} tiles"
        )
    width = max(sum(t.width for t in row) + gap * (len(row) - 1) for row in rows)
    heights = [max(t.height for t in row) for row in rows]
    canvas = Image.new("RGB", (width, sum(heights) + gap * (len(rows) - 1)), "white")
    y = 0
    for row, height in zip(rows, heights):
        x = 0
        for tile in row:
            canvas.paste(tile, (x, y))
            x += tile.width + gap
        y += height + gap
    return canvas


def image_grid(
    images: np.ndarray | Sequence[np.ndarray], captions: Sequence[str], *, columns: int | None = None
) -> Image.Image:
    """uint8 (N, H, W, 3) images with one caption each, `columns` per row (default: all in one row)."""
    if len(images) != len(captions):
        raise UserError(f"{len(images)} images but {len(captions)} captions; give one caption per image")
    if columns is not None and columns < 1:
        raise UserError(f"columns={columns!r}; use a positive number of tiles per row (or None: one row)")
    tiles = [captioned(im, c) for im, c in zip(images, captions)]
    columns = columns or max(len(tiles), 1)  # no images: grid names the problem
    return grid([tiles[i : i + columns] for i in range(0, len(tiles), columns)])


def token_maps(
    store: AttentionStore, prompt_index: int, *, grids: Sequence[tuple[int, int]] | None = None, step: int | None = None
) -> torch.Tensor:
    """(L, h, w) cross-attention per token (L = the model's text positions, 77 for SD) for one prompt: averaged over heads (done by the store), over
    the recorded text layers whose grid is in `grids` (None: all), and over steps (or one `step`).
    Layers of different grids are upsampled (nearest) to the largest before averaging.
    Each pixel's maps sum to 1 over the tokens when only cross layers are averaged; a hybrid layer contributes
    its text columns as the model computed them, which sum to the share of attention that went to text (< 1)."""
    if not 0 <= prompt_index < store.num_prompts:
        raise UserError(
            f"prompt_index={prompt_index} is out of range: the store recorded {store.num_prompts} "
            f"prompt{'s' if store.num_prompts != 1 else ''} (0 = the source)"
        )
    source = store.steps.get(step) if step is not None else None
    if step is not None and source is None:
        raise UserError(
            f"step {step} was not recorded; build the store with per_step=True (recorded steps: {sorted(store.steps)})"
        )
    names = [n for n, s in store.sites.items() if s.kind != "self" and (grids is None or s.query_hw in grids)]
    if not names:
        available = sorted({s.query_hw for s in store.sites.values() if s.kind != "self"})
        raise UserError(f"no recorded text-attention layers at {grids}; recorded grids: {available}")
    target = max((store.sites[n].query_hw for n in names), key=lambda hw: hw[0] * hw[1])
    maps = []
    for name in names:
        site = store.sites[name]
        m = source[name] if source is not None else store.average(name)
        m = m[prompt_index, :, : site.num_text_keys].T.reshape(1, -1, *site.query_hw)  # (1, L, h, w)
        maps.append(F.interpolate(m, size=target, mode="nearest")[0])
    return torch.stack(maps).mean(dim=0)


def word_map(maps: torch.Tensor, prompt: str, word: str | int, *, lookup: WordLookup | None = None) -> torch.Tensor:
    """(h, w): one word's map from per-token maps (L, h, w) of `prompt` (`token_maps`): the sum over the word's
    tokens, since a word may be split into several ("hovercraft" → hover, craft). `word` is a word of the prompt
    (every occurrence: "a" in "a cat and a dog" is two) or a word index (one occurrence); a word the prompt lacks
    raises, naming the prompt's words. `lookup`: where words are among another model's text columns (an MM-DiT's
    CLIP and T5 columns, `p2p.joint_tokens.JointWords`): the word's tokens in every segment are summed."""
    if lookup is not None:
        return maps[lookup.positions(prompt, word)].sum(dim=0)
    return maps[word_token_positions(prompt, word, context_length=maps.shape[0])].sum(dim=0)


def word_tiles(store: AttentionStore, prompt: str, prompt_index: int, *, lookup: WordLookup) -> list[Image.Image]:
    """One captioned tile per word of `prompt` (its tokens in every text segment summed): Fig. 4 for models whose
    words sit in several token spaces (SD3: CLIP and T5; FLUX: T5), where one tile per token would mix them."""
    maps = token_maps(store, prompt_index)
    return [captioned(heat(word_map(maps, prompt, i, lookup=lookup)), w) for i, w in enumerate(words(prompt))]


def heat(map_2d: torch.Tensor, *, size: int = MIN_TILE) -> np.ndarray:
    """A map normalised to its own max → uint8 RGB tile (grayscale), as in the reference's `show_cross_attention`."""
    if not torch.isfinite(map_2d).all():  # NaN would turn into arbitrary gray levels, not an error
        raise UserError(
            f"attention map of shape {tuple(map_2d.shape)} holds NaN or inf values; was the model run "
            "in a dtype that overflowed (try dtype=fp32)?"
        )
    m = map_2d.float().clamp_min(0)
    m = (255 * m / m.max().clamp_min(1e-12)).round().to(torch.uint8).numpy()
    return np.asarray(
        Image.fromarray(m).resize((size, round(size * m.shape[0] / m.shape[1])), Image.BILINEAR).convert("RGB")
    )


def cross_attention_tiles(
    store: AttentionStore,
    prompt: str,
    prompt_index: int,
    *,
    grids: Sequence[tuple[int, int]] | None = None,
    step: int | None = None,
) -> list[Image.Image]:
    """One captioned tile per token of `prompt` (start and end tokens included, as in Fig. 4)."""
    maps = token_maps(store, prompt_index, grids=grids, step=step)
    tokens = ["<start>", *decode_tokens(prompt), "<end>"]
    if len(tokens) > maps.shape[0]:
        raise UserError(
            f"prompt {prompt!r} has {len(tokens)} tokens with start and end, but the recorded maps have "
            f"{maps.shape[0]} text positions; pass the prompt the store recorded at index {prompt_index}"
        )
    return [captioned(heat(maps[i]), token) for i, token in enumerate(tokens)]


def self_attention_components(
    store: AttentionStore, prompt_index: int, *, grid_hw: tuple[int, int], count: int = 6
) -> list[Image.Image]:
    """Top SVD components of the (res², res²) self-attention map with row means removed (P2P_SPEC §6).
    Hybrid layers contribute their pixel columns."""
    names = store.names(kinds=("self", "hybrid"), grid=grid_hw)
    if not names:
        raise UserError(
            f"no self-attention layers recorded at {grid_hw}; build the store with kinds including "
            f"'self' (recorded: {sorted({s.query_hw for s in store.sites.values() if s.kind != 'cross'})})"
        )
    maps = [store.average(n)[prompt_index, :, store.sites[n].num_text_keys :] for n in names]
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
    with atomic_path(path) as partial:
        image.save(partial)
    return Path(path)


def changed_words(prompts: list[str]) -> list[list[str]]:
    """Per prompt, the words that are not shared with the source (for the source: those missing in a target)."""
    source = set(w.lower() for w in words(prompts[0]))
    per_target = [[w for w in words(p) if w.lower() not in source] for p in prompts[1:]]
    in_targets = set(w.lower() for p in prompts[1:] for w in words(p))
    return [[w for w in words(prompts[0]) if w.lower() not in in_targets]] + per_target


def attention_row(
    store: AttentionStore, prompts: list[str], focus: list[list[str]], *, lookup: WordLookup | None = None
) -> list[Image.Image]:
    """One tile per prompt: the summed maps of its changed words (or of the whole prompt's last word)."""
    tiles = []
    for i, (prompt, chosen) in enumerate(zip(prompts, focus)):
        chosen = chosen or words(prompt)[-1:]
        maps = token_maps(store, i)
        summed = sum(word_map(maps, prompt, w, lookup=lookup) for w in chosen)
        tiles.append(captioned(heat(summed), "attention: " + " ".join(chosen)))
    return tiles
