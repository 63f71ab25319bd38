"""The paper's figures as functions of a model and a few prompts (Hertz et al. 2022, Figs. 2, 4-10, 12).

Each builder runs the edits a figure needs and returns a `Figure`: rows of captioned tiles with a label
on the left of each row, like the paper's layouts. `Figure.save(out)` writes `figure.png`, every tile as
its own PNG under `images/`, and `figure.json` (captions, files, numbers such as reconstruction PSNRs).

    rows_figure            Figs. 2, 5, 7, 8: one row per edit variant (no injection, replace, refine, preserve, blend)
    attention_figure       Fig. 4: per-word cross-attention averaged over steps, and chosen words step by step
    injection_sweep_figure Fig. 6: one row per word swap, one column per injected fraction of the steps
    fader_figure           Fig. 9: one row per (prompt, word), one column per reweight scale c
    real_image_figure      Figs. 10-12: inversion, reconstruction, edits, attention mask restoring the photo

`build(kind, model, params, ...)` picks the builder by name and checks `params` against its arguments.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from models.stable_diffusion import StableDiffusion
from p2p import views
from p2p.controllers import grid_at
from p2p.edit import BlendSpec, EditSpec, StoreSpec, edit
from p2p.inversion import psnr, restore_outside_mask, vae_reconstruction
from p2p.inversion_cache import cached_invert
from p2p.pipeline import SamplerSettings, decode, sample
from p2p.tokens import word_token_positions, words
from p2p.world import WorldConfig, sample_scene

LABEL_WIDTH = 170  # px of the row-label column on the left
TITLE_HEIGHT = 28  # px of the title strip on top
GAP = 4  # px between tiles and rows (as views.grid)
FRAME_GRAY = (190, 190, 190)  # 1 px tile frame: white attention maps and white backgrounds stay visible
NO_INJECTION = "none"  # a row's `edit: none` = same-seed sampling without any attention edit


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

    def add_row(self, label: str, tiles: Sequence[Tile]) -> None:
        self.rows.append(list(tiles))
        self.row_labels.append(label)

    def render(self, *, tile_size: int) -> Image.Image:
        """Title on top; per row: its label on the left, then the captioned tiles."""
        strips = []
        for label, row in zip(self.row_labels, self.rows):
            tiles = views.grid([[views.captioned(_framed(t.image, tile_size), t.caption) for t in row]], gap=GAP)
            strip = Image.new("RGB", (LABEL_WIDTH + tiles.width, tiles.height), "white")
            _draw_text(strip, label, box=(4, 0, LABEL_WIDTH - 8, tiles.height), size=13)
            strip.paste(tiles, (LABEL_WIDTH, 0))
            strips.append(strip)
        width = max(s.width for s in strips)
        height = TITLE_HEIGHT + sum(s.height for s in strips) + GAP * (len(strips) - 1)
        canvas = Image.new("RGB", (width, height), "white")
        _draw_text(canvas, self.title, box=(4, 0, width - 8, TITLE_HEIGHT), size=15)
        y = TITLE_HEIGHT
        for strip in strips:
            canvas.paste(strip, (0, y))
            y += strip.height + GAP
        return canvas

    def save(self, out: str | Path, *, tile_size: int) -> Path:
        """figure.png + images/RR_CC_name.png + figure.json into `out`; never overwrites a file."""
        out = Path(out)
        manifest_path = out / "figure.json"
        if manifest_path.exists():
            raise FileExistsError(f"{manifest_path} exists; refusing to overwrite it")
        manifest = {"title": self.title, "metrics": self.metrics, "tile_size": tile_size, "rows": []}
        for r, (label, row) in enumerate(zip(self.row_labels, self.rows)):
            entries = []
            for c, tile in enumerate(row):
                path = views.save_png(Image.fromarray(tile.image), out / "images" / f"{r:02d}_{c:02d}_{_slug(tile.name)}.png")
                entries.append({"caption": tile.caption, "file": str(path.relative_to(out))})
            manifest["rows"].append({"label": label, "tiles": entries})
        figure_path = views.save_png(self.render(tile_size=tile_size), out / "figure.png")
        manifest["size"] = list(Image.open(figure_path).size)
        manifest_path.write_text(json.dumps(manifest, indent=2))
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


def _draw_text(canvas: Image.Image, text: str, *, box: tuple[int, int, int, int], size: int) -> None:
    """`text` wrapped to the box's width and centred vertically in it (left-aligned)."""
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has a single bitmap size
        font = ImageFont.load_default()
    left, top, right, bottom = box
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > right - left:
            lines.append(line)
            line = word
        else:
            line = candidate
    lines += [line] if line else []
    line_height = font.getbbox("Ag")[3] + 2
    y = top + max(0, (bottom - top - line_height * len(lines)) // 2)
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((left, y + i * line_height), line, fill="black", font=font)


def _image_tiles(images: np.ndarray, prompts: Sequence[str]) -> list[Tile]:
    return [Tile(image, prompt, prompt) for image, prompt in zip(images, prompts)]


def _blend_spec(blend: Sequence | dict | None) -> BlendSpec | None:
    """A row's `blend`: BlendSpec.words forms (a word list, or one list per prompt), or a dict of BlendSpec fields."""
    if not blend:
        return None
    return BlendSpec(**blend) if isinstance(blend, dict) else BlendSpec(words=list(blend))


def _spec_with(spec: EditSpec, overrides: dict | str | None) -> EditSpec | None:
    """`spec` with a row's overrides; `"none"` = no edit (same-seed sampling)."""
    if overrides == NO_INJECTION:
        return None
    overrides = dict(overrides or {})
    unknown = set(overrides) - {f.name for f in dataclasses.fields(EditSpec)}
    if unknown:
        raise ValueError(f"edit overrides {sorted(unknown)} are not EditSpec fields; "
                         f"accepted: {[f.name for f in dataclasses.fields(EditSpec)]}")
    return dataclasses.replace(spec, **overrides)


# ----------------------------------------------------------------------------- builders


def rows_figure(model: StableDiffusion, *, title: str, spec: EditSpec, settings: SamplerSettings, seed: int,
                rows: Sequence[dict], source: str | None = None, targets: Sequence[str] = ()) -> Figure:
    """Figs. 2, 5, 7, 8: each row is one `edit` run of its source and targets (defaults: the figure's).

    A row is `{label, source?, targets?, seed?, edit?: {EditSpec field: value} | "none", blend?}`; `blend` is
    a word list in BlendSpec.words forms (one list for all prompts, or one per prompt) or a dict of BlendSpec fields.
    """
    figure = Figure(title)
    for row in rows:
        row = dict(row)
        label, row_source, row_targets = row.pop("label"), row.pop("source", source), row.pop("targets", targets)
        row_spec, blend = _spec_with(spec, row.pop("edit", None)), _blend_spec(row.pop("blend", None))
        row_seed = row.pop("seed", seed)
        if row:
            raise ValueError(f"row {label!r} has unknown keys {sorted(row)}; accepted: label, source, targets, "
                             "seed, edit, blend")
        if row_source is None or not row_targets:
            raise ValueError(f"row {label!r} needs a source and at least one target prompt")
        prompts = [row_source, *row_targets]
        result = edit(model, prompts, seed=row_seed, spec=row_spec, blend=blend, settings=settings, progress=False)
        figure.add_row(label, _image_tiles(result.images, prompts))
    return figure


def word_map(maps: torch.Tensor, prompt: str, word: str) -> torch.Tensor:
    """(h, w): a word's tokens summed from per-token maps (L, h, w) — a word may be several tokens."""
    return maps[word_token_positions(prompt, word)].sum(dim=0)


def attention_figure(model: StableDiffusion, *, title: str, spec: EditSpec, settings: SamplerSettings, seed: int,
                     prompt: str, words_over_steps: Sequence[str], steps_shown: int = 6,
                     downsamplings: Sequence[int] | None = None, store_max_fraction: float = 0.5,
                     tile_size: int = 128) -> Figure:
    """Fig. 4: the image and every word's cross-attention map averaged over steps, then chosen words' maps at
    `steps_shown` evenly spaced steps. `downsamplings` = which layers to average, as latent side / 2^d (SD at
    512 px: [2] = the reference's 16×16 view; None: every recorded layer, upsampled to the largest); the store
    records layers up to latent side × `store_max_fraction`."""
    del spec  # no edit: the maps of plain sampling
    store = StoreSpec(kinds=("cross", "hybrid"), max_fraction=store_max_fraction, per_step=True)
    result = edit(model, [prompt], seed=seed, store=store, settings=settings, progress=False)
    latent_hw = tuple(result.latents.shape[-2:])
    grids = [grid_at(latent_hw, d) for d in downsamplings] if downsamplings is not None else None
    average = views.token_maps(result.store, 0, grids=grids)
    figure = Figure(title)
    tiles = [Tile(result.images[0], prompt, prompt)]
    tiles += [Tile(views.heat(word_map(average, prompt, w), size=tile_size), w, f"average_{w}") for w in words(prompt)]
    figure.add_row("image; each word's map averaged over all steps", tiles)
    count = min(steps_shown, settings.steps)
    shown = sorted({round(i * (settings.steps - 1) / max(count - 1, 1)) for i in range(count)})
    per_step = {s: views.token_maps(result.store, 0, grids=grids, step=s) for s in shown}
    for w in words_over_steps:
        figure.add_row(f"'{w}' over the steps (first to last)",
                       [Tile(views.heat(word_map(per_step[s], prompt, w), size=tile_size),
                             f"step {s + 1}/{settings.steps}", f"{w}_step{s + 1:03d}") for s in shown])
    return figure


def injection_sweep_figure(model: StableDiffusion, *, title: str, spec: EditSpec, settings: SamplerSettings,
                           seed: int, source: str, targets: Sequence[str], fractions: Sequence[float]) -> Figure:
    """Fig. 6: columns inject the source's cross-attention maps during the first f of the steps (0: none)."""
    prompts = [source, *targets]
    columns = [edit(model, prompts, seed=seed, spec=dataclasses.replace(spec, cross_replace_steps=float(f)),
                    settings=settings, progress=False).images for f in fractions]
    figure = Figure(title)
    figure.add_row("source", [Tile(columns[0][0], source, source)])
    for t, target in enumerate(targets, start=1):
        figure.add_row(target, [Tile(images[t], f"cross {f:.0%}", f"{target}_cross{f:.2f}")
                                for f, images in zip(fractions, columns)])
    return figure


def fader_figure(model: StableDiffusion, *, title: str, spec: EditSpec, settings: SamplerSettings, seed: int,
                 rows: Sequence[dict], values: Sequence[float]) -> Figure:
    """Fig. 9: per row `{prompt, word}`, the prompt regenerated with the word's attention scaled by each c."""
    figure = Figure(title)
    for row in rows:
        prompt, word = row["prompt"], row["word"]
        row_spec = dataclasses.replace(spec, reweight={word: [float(c) for c in values]})
        result = edit(model, [prompt] * (1 + len(values)), seed=row.get("seed", seed), spec=row_spec,
                      settings=settings, progress=False)
        tiles = [Tile(result.images[0], "source", f"{prompt}_source")]
        tiles += [Tile(image, f"{word}: c = {c:g}", f"{prompt}_{word}_c{c:g}") for image, c in zip(result.images[1:], values)]
        figure.add_row(f"{prompt}: reweight '{word}'", tiles)
    return figure


def render_scene(*, seed: int, objects: Sequence[Sequence[str]], background: str) -> tuple[np.ndarray, str]:
    """A shapes-world 'photo' with a random layout and its caption (the background always named)."""
    scene = sample_scene(np.random.default_rng(seed), objects=[tuple(o) for o in objects], background=background,
                         mention_background=True, config=WorldConfig())
    return scene.image, scene.caption


def real_image_figure(model: StableDiffusion, *, title: str, spec: EditSpec, settings: SamplerSettings,
                      photo: np.ndarray, source: str, targets: Sequence[str], methods: Sequence[str] = ("null_text", "ddim"),
                      blend: Sequence | dict | None = None, inner_steps: int = 10, null_init: str = "empty",
                      cache_dir: str | None = None, tile_size: int = 128) -> Figure:
    """Figs. 10-12: invert the photo with each method, reconstruct it, edit it; with `blend` words, the Fig. 12
    path: the LocalBlend mask of the first method's edit and the photo restored outside that mask. `blend` takes
    the forms of a `rows_figure` row's."""
    prompts = [source, *targets]
    figure = Figure(title)
    vae = vae_reconstruction(model, photo)
    reconstruction_tiles = [Tile(photo, "photo", "photo"),
                            Tile(vae, f"VAE only: {psnr(vae, photo):.1f} dB", "vae_reconstruction")]
    figure.metrics["psnr_vae"] = round(psnr(vae, photo), 3)
    inversions = {}
    for method in methods:
        inversion, _ = cached_invert(model, photo, source, cache_dir=cache_dir, method=method, settings=settings,
                                     inner_steps=inner_steps, null_init=null_init, progress=False)
        inversions[method] = inversion
        image = decode(model, sample(model, [source], latent=inversion.x_T, settings=settings,
                                     uncond_embeddings=inversion.uncond_embeddings, progress=False))[0]
        figure.metrics[f"psnr_{method}"] = round(psnr(image, photo), 3)
        reconstruction_tiles.append(Tile(image, f"{method}: {psnr(image, photo):.1f} dB", f"{method}_reconstruction"))
    figure.add_row("reconstruction (PSNR to the photo)", reconstruction_tiles)
    for method, inversion in inversions.items():
        result = edit(model, prompts, latent=inversion.x_T, spec=spec, settings=settings,
                      uncond_embeddings=inversion.uncond_embeddings, progress=False)
        figure.add_row(f"{method} inversion + P2P", _image_tiles(result.images, prompts))
    if blend:
        inversion = inversions[methods[0]]
        result = edit(model, prompts, latent=inversion.x_T, spec=spec, settings=settings, blend=_blend_spec(blend),
                      uncond_embeddings=inversion.uncond_embeddings, progress=False)
        masks = result.blend.last_mask  # (P, 1, h, w); row 0 (the source) is unused
        figure.add_row("LocalBlend mask: the edited words' attention",
                       [Tile(views.heat(masks[t, 0], size=tile_size), f"mask: {target}", f"mask_{target}")
                        for t, target in enumerate(targets, start=1)])
        figure.add_row("edit inside the mask, photo restored outside (Fig. 12)",
                       [Tile(restore_outside_mask(result.images[t], photo, masks[t]), target, f"restored_{target}")
                        for t, target in enumerate(targets, start=1)])
    return figure


FIGURE_KINDS = {
    "rows": rows_figure,
    "attention": attention_figure,
    "injection_sweep": injection_sweep_figure,
    "fader": fader_figure,
    "real": real_image_figure,
}


def build(kind: str, model: StableDiffusion, params: dict[str, Any], **common) -> Figure:
    """Run the builder `kind` with a prompt set's `params` plus `common` (title, spec, settings, …).

    Only the arguments a builder declares are passed from `common`; unknown `params` raise with the accepted names.
    """
    if kind not in FIGURE_KINDS:
        raise ValueError(f"figure kind {kind!r} is not known; choose one of {sorted(FIGURE_KINDS)}")
    builder = FIGURE_KINDS[kind]
    accepted = [name for name in inspect.signature(builder).parameters if name != "model"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"figure {kind!r} does not take {unknown}; it takes {accepted}")
    passed = {k: v for k, v in common.items() if k in accepted}
    return builder(model, **passed, **params)
