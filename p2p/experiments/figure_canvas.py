"""A figure's canvas: rows of captioned tiles, a label left of each row, a title on top (the paper's layouts).

`Figure.save(out)` writes `figure.png`, every tile as its own PNG under `images/`, and `figure.json` (captions,
files, numbers such as reconstruction PSNRs). The builders that fill a Figure are in `figures.py`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from models import files
from models.errors import OutputExistsError, UserError
from p2p import views

LABEL_WIDTH = 170  # px of the row-label column on the left
TITLE_HEIGHT = 28  # px of the title strip on top (at least: a title that wraps gets the lines it needs)
TITLE_FONT_SIZE = 15
LABEL_FONT_SIZE = 13
GAP = 4  # px between tiles and rows (as views.grid)
FRAME_GRAY = (190, 190, 190)  # 1 px tile frame: white attention maps and white backgrounds stay visible


@dataclass
class Tile:
    image: np.ndarray  # uint8 (H, W, 3): a generated image or an attention heat map
    caption: str  # text under the tile
    name: str  # file stem of the tile's own PNG


@dataclass
class Figure:
    title: str
    rows: list[list[Tile]] = field(default_factory=list)
    row_labels: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)  # numbers worth keeping beside the picture (PSNRs, …)
    settings: dict = field(default_factory=dict)  # how it was made, as used (seed, steps, guidance, size)

    def add_row(self, label: str, tiles: Sequence[Tile]) -> None:
        self.rows.append(list(tiles))
        self.row_labels.append(label)

    def render(self, *, tile_size: int) -> Image.Image:
        """Title on top; per row: its label on the left, then the captioned tiles. A title or label too long
        for its box wraps, and the box grows to hold every line."""
        if not self.rows:
            raise UserError(f"figure {self.title!r} has no rows to draw")
        strips = []
        for label, row in zip(self.row_labels, self.rows):
            tiles = views.grid(
                [[views.captioned(_framed(t.image, tile_size), t.caption, size=tile_size) for t in row]], gap=GAP
            )  # size: tile_size is honoured below views.MIN_TILE too
            text = _text_block(label, width=LABEL_WIDTH - 8, size=LABEL_FONT_SIZE)
            strip = Image.new("RGB", (LABEL_WIDTH + tiles.width, max(tiles.height, text.height)), "white")
            strip.paste(text, (4, (strip.height - text.height) // 2))
            strip.paste(tiles, (LABEL_WIDTH, 0))
            strips.append(strip)
        width = max(s.width for s in strips)
        title = _text_block(self.title, width=width - 8, size=TITLE_FONT_SIZE)
        title_height = max(TITLE_HEIGHT, title.height)
        canvas = Image.new(
            "RGB", (width, title_height + sum(s.height for s in strips) + GAP * (len(strips) - 1)), "white"
        )
        canvas.paste(title, (4, (title_height - title.height) // 2))
        y = title_height
        for strip in strips:
            canvas.paste(strip, (0, y))
            y += strip.height + GAP
        return canvas

    def save(self, out: str | Path, *, tile_size: int) -> Path:
        """figure.png + images/RR_CC_name.png + figure.json into `out`; never overwrites a file."""
        out = Path(out)
        manifest_path = out / "figure.json"
        if manifest_path.exists():
            raise OutputExistsError(f"{manifest_path} exists; refusing to overwrite it")
        manifest = {
            "title": self.title,
            "settings": self.settings,
            "metrics": self.metrics,
            "tile_size": tile_size,
            "rows": [],
        }
        for r, (label, row) in enumerate(zip(self.row_labels, self.rows)):
            entries = []
            for c, tile in enumerate(row):
                path = views.save_png(
                    Image.fromarray(tile.image), out / "images" / f"{r:02d}_{c:02d}_{_slug(tile.name)}.png"
                )
                entries.append({"caption": tile.caption, "file": str(path.relative_to(out))})
            manifest["rows"].append({"label": label, "tiles": entries})
        figure_path = views.save_png(self.render(tile_size=tile_size), out / "figure.png")
        manifest["size"] = list(Image.open(figure_path).size)
        files.write_text(manifest_path, json.dumps(manifest, indent=2))
        return figure_path


def _framed(image: np.ndarray, size: int) -> Image.Image:
    """The tile scaled to `size` wide (nearest when enlarging: 32 px pixels stay crisp; Lanczos when shrinking
    a 512 px photo) with a light gray frame."""
    resample = Image.NEAREST if size >= image.shape[1] else Image.LANCZOS
    tile = Image.fromarray(image).convert("RGB").resize((size, round(size * image.shape[0] / image.shape[1])), resample)
    ImageDraw.Draw(tile).rectangle((0, 0, tile.width - 1, tile.height - 1), outline=FRAME_GRAY)
    return tile


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.+-]+", "_", text.lower()).strip("_")[:60] or "tile"


def _text_block(text: str, *, width: int, size: int) -> Image.Image:
    """`text` wrapped to `width` px (views.wrap: long words are broken too), black on white, as tall as its lines."""
    font = views.font(size)
    lines = views.wrap(text, width, font)
    line_height = font.getbbox("Ag")[3] + 2
    block = Image.new("RGB", (width, line_height * len(lines) + 4), "white")
    draw = ImageDraw.Draw(block)
    for i, line in enumerate(lines):
        draw.text((0, 2 + i * line_height), line, fill="black", font=font)
    return block
