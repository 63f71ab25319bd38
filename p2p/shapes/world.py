"""The shapes world: procedurally generated flat-color scenes with known ground truth.

A scene is one or two objects (a colored circle, square or triangle) on a plain
background, plus a caption such as "a red circle and a blue square on a white
background". The caption names colors, shapes and (sometimes) the background; the
layout -- positions and sizes -- is decided by randomness only and never appears in
the caption. That split is what makes Prompt-to-Prompt edits measurable here: an edit
of the caption should change the named attribute while keeping the random layout.

Coordinates are (y, x) = (row, column) pixel indices: centroids and bboxes count in
whole pixels, and a shape covers the pixels whose centers fall inside it.
`p2p/shapes/reader.py` recovers the same attributes from any image.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from models.errors import UserError

# rasterize() implements exactly these shapes; a config may use a subset.
SHAPES = ("circle", "square", "triangle")
# A caption names one or two objects.
MAX_OBJECTS = 2
# Rejection sampling of layouts gives up after this many rounds; the config checks
# make a valid layout likely, so hitting this means the config is too tight.
MAX_LAYOUT_ROUNDS = 1000
# Layouts proposed per scene per rejection round; more means fewer Python-level rounds.
LAYOUT_PROPOSALS = 16
# Object size range at 32 px, scaled linearly with image_size when not given.
DEFAULT_SIZE_AT_32 = (9, 15)


def _default_colors() -> dict[str, tuple[int, int, int]]:
    # Chosen so that every pair is >= 105 apart in RGB and every color is >= 134 from
    # every background: the reader can tell them apart after blur and noise.
    return {
        "red": (220, 30, 30),
        "green": (20, 180, 40),
        "blue": (40, 70, 230),
        "yellow": (240, 230, 30),
        "purple": (170, 40, 220),
        "orange": (250, 130, 0),
    }


def _default_backgrounds() -> dict[str, tuple[int, int, int]]:
    return {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}


@dataclass(frozen=True)
class WorldConfig:
    image_size: int = 32  # side of the square image in pixels
    # object color name -> RGB (uint8); the names are the caption words
    colors: dict[str, tuple[int, int, int]] = field(default_factory=_default_colors)
    # background name -> RGB (uint8); disjoint from the object colors
    backgrounds: dict[str, tuple[int, int, int]] = field(default_factory=_default_backgrounds)
    shapes: tuple[str, ...] = SHAPES  # subset of SHAPES; triangle is upright, apex at the top
    # (min, max) side of an object's square box in pixels, inclusive;
    # None = 9..15 at 32 px, scaled with image_size
    object_size: tuple[int, int] | None = None
    min_gap: int = 3  # bounding boxes of two objects are >= this many px apart, so blur cannot merge them
    margin: int = 1  # free pixels between an object and the border; the reader reads the background there
    p_mention_background: float = 0.7  # probability that a caption names the background
    p_two_objects: float = 0.5  # probability that a scene has two objects instead of one

    def __post_init__(self):
        for shape in self.shapes:
            if shape not in SHAPES:
                raise UserError(f"shape {shape!r} is not drawable; shapes must be a subset of {SHAPES}")
        overlap = set(self.colors) & set(self.backgrounds)
        if overlap:
            raise UserError(f"names {sorted(overlap)} are both object colors and backgrounds; they must be disjoint")
        for name, rgb in {**self.colors, **self.backgrounds}.items():
            if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
                raise UserError(f"color {name!r} = {rgb!r} is not an RGB triple of ints in 0..255")
        for name in ("p_mention_background", "p_two_objects"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"{name} = {getattr(self, name)!r} is not a probability in [0, 1]")
        lo, hi = self.size_range
        if not 1 <= lo <= hi or 2 * self.margin + hi > self.image_size:
            raise UserError(
                f"object_size {(lo, hi)} does not fit image_size {self.image_size} with margin {self.margin}; "
                f"need 1 <= min <= max and max + 2*margin <= image_size"
            )
        if self.p_two_objects > 0 and 2 * self.margin + 2 * lo + self.min_gap > self.image_size:
            raise UserError(
                f"two objects of min size {lo} with gap {self.min_gap} and margin {self.margin} "
                f"do not fit image_size {self.image_size}; shrink object_size or set p_two_objects=0"
            )

    @property
    def size_range(self) -> tuple[int, int]:
        """(min, max) object side in pixels, resolving the image_size-scaled default."""
        if self.object_size is not None:
            return tuple(self.object_size)
        scale = self.image_size / 32
        return round(DEFAULT_SIZE_AT_32[0] * scale), round(DEFAULT_SIZE_AT_32[1] * scale)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """Every (color, shape) an object can be; scenes index objects into this list."""
        return list(itertools.product(self.colors, self.shapes))


@dataclass
class ObjectTruth:
    shape: str  # one of config.shapes
    color: str  # one of config.colors
    mask: np.ndarray  # bool (H, W), True where the object is drawn
    centroid: tuple[float, float]  # (y, x) mean pixel coordinate of the mask
    size: int  # side of the square box the shape was drawn in, pixels
    bbox: tuple[int, int, int, int]  # (top, left, bottom, right) of the mask, bottom/right exclusive


@dataclass
class Scene:
    objects: list[ObjectTruth]  # in caption order
    background: str  # one of config.backgrounds
    caption: str
    image: np.ndarray  # uint8 (H, W, 3)


@dataclass
class CaptionSpec:
    objects: list[tuple[str, str]]  # (color, shape) in caption order
    background: str | None  # None when the caption does not name it


# ----------------------------------------------------------------------------- captions


def make_caption(objects: Sequence[tuple[str, str]], *, background: str | None = None) -> str:
    """'a red circle and a blue square on a white background'.

    Always "a", never "an": swapping one color word for another must change exactly
    one word, which word-swap edits (Replace) rely on.
    """
    caption = " and ".join(f"a {color} {shape}" for color, shape in objects)
    return caption if background is None else f"{caption} on a {background} background"


def parse_caption(caption: str, *, config: WorldConfig = WorldConfig()) -> CaptionSpec:
    """Inverse of make_caption; grammar `a C S [and a C S] [on a B background]`."""
    words = caption.lower().strip().rstrip(".").split()
    vocabulary = {"a", "an", "and", "on", "background", *config.colors, *config.shapes, *config.backgrounds}
    for word in words:
        if word not in vocabulary:
            raise UserError(
                f"word {word!r} in caption {caption!r} is not in the vocabulary; colors: {list(config.colors)}, "
                f"shapes: {list(config.shapes)}, backgrounds: {list(config.backgrounds)}; "
                f"captions read 'a <color> <shape> [and a <color> <shape>] [on a <background> background]'"
            )

    def expect(position: int, accepted, what: str) -> str:
        found = words[position] if position < len(words) else "<end>"
        if found not in accepted:
            raise UserError(f"caption {caption!r}: expected {what} at word {position}, found {found!r}")
        return found

    objects, i = [], 0
    while True:
        expect(i, ("a", "an"), "'a'")
        color = expect(i + 1, config.colors, f"a color {list(config.colors)}")
        shape = expect(i + 2, config.shapes, f"a shape {list(config.shapes)}")
        objects.append((color, shape))
        i += 3
        if i < len(words) and words[i] == "and":
            i += 1
            continue
        break
    background = None
    if i < len(words):
        expect(i, ("on",), "'and', 'on' or the end")
        expect(i + 1, ("a",), "'a'")
        background = expect(i + 2, config.backgrounds, f"a background {list(config.backgrounds)}")
        expect(i + 3, ("background",), "'background'")
        if i + 4 != len(words):
            raise UserError(f"caption {caption!r}: unexpected words after 'background': {words[i + 4 :]}")
    return CaptionSpec(objects=objects, background=background)


def all_captions(
    *, num_objects: int, config: WorldConfig = WorldConfig(), mention_background: bool | None = None
) -> list[str]:
    """Every caption with `num_objects` distinct objects, in a fixed order."""
    if num_objects not in range(1, MAX_OBJECTS + 1):
        raise UserError(f"num_objects={num_objects!r}; scenes have 1..{MAX_OBJECTS} objects")
    backgrounds = {None: [None, *config.backgrounds], True: list(config.backgrounds), False: [None]}[mention_background]
    return [
        make_caption(objects, background=bg)
        for objects in itertools.permutations(config.pairs, num_objects)
        for bg in backgrounds
    ]


def caption_set(
    *, num_objects: int, seed: int, n: int, config: WorldConfig = WorldConfig(), mention_background: bool | None = None
) -> list[str]:
    """`n` distinct captions drawn without replacement; the same for the same arguments."""
    captions = all_captions(num_objects=num_objects, config=config, mention_background=mention_background)
    if n > len(captions):
        raise UserError(f"n={n} but only {len(captions)} distinct captions exist for num_objects={num_objects}")
    order = np.random.default_rng(seed).permutation(len(captions))[:n]
    return [captions[i] for i in order]


# ----------------------------------------------------------------------------- geometry


def _rasterize_many(
    shape_ids: np.ndarray, sizes: np.ndarray, tops: np.ndarray, lefts: np.ndarray, *, image_size: int
) -> np.ndarray:
    """Masks (M, H, W) for M objects; shape_ids index SHAPES. Each object fills a size x size box."""
    s, top, left = (np.asarray(a, dtype=np.float64)[:, None, None] for a in (sizes, tops, lefts))
    ys = np.arange(image_size, dtype=np.float64)[None, :, None]
    xs = np.arange(image_size, dtype=np.float64)[None, None, :]
    in_box = (ys >= top) & (ys < top + s) & (xs >= left) & (xs < left + s)
    # Offsets of the pixel center from the box center.
    dy, dx = ys + 0.5 - (top + s / 2), xs + 0.5 - (left + s / 2)
    circle = dy**2 + dx**2 <= (s / 2) ** 2
    # Row r below the apex (r = 0 at the top) spans half-width (r + 1) / 2, so the
    # triangle is exactly s tall and s wide at its base for odd and even s alike.
    triangle = in_box & (np.abs(dx) <= (ys - top + 1) / 2)
    masks = np.stack([circle, in_box, triangle])  # (len(SHAPES), M, H, W), order = SHAPES
    return masks[np.asarray(shape_ids), np.arange(len(shape_ids))]


def rasterize(shape: str, *, size: int, top: int, left: int, image_size: int) -> np.ndarray:
    """Bool (H, W) mask of one shape drawn in the size x size box at (top, left)."""
    if shape not in SHAPES:
        raise UserError(f"shape {shape!r} is not one of {SHAPES}")
    return _rasterize_many(
        np.array([SHAPES.index(shape)]), np.array([size]), np.array([top]), np.array([left]), image_size=image_size
    )[0]


def render(objects: Sequence[ObjectTruth], *, background: str, config: WorldConfig = WorldConfig()) -> np.ndarray:
    """Paint the object masks in flat colors over a flat background; uint8 (H, W, 3)."""
    if background not in config.backgrounds:
        raise UserError(f"background {background!r} is not one of {list(config.backgrounds)}")
    image = np.empty((config.image_size, config.image_size, 3), dtype=np.uint8)
    image[:] = config.backgrounds[background]
    for obj in objects:
        image[obj.mask] = config.colors[obj.color]
    return image


def _boxes_apart(sizes, tops, lefts, gap: int) -> np.ndarray:
    """True where the two boxes (last axis) are >= gap apart along y or x; shape (...)."""
    (s0, s1), (t0, t1), (l0, l1) = (np.moveaxis(a, -1, 0) for a in (sizes, tops, lefts))
    gap_y = np.maximum(t1 - (t0 + s0), t0 - (t1 + s1))
    gap_x = np.maximum(l1 - (l0 + s0), l0 - (l1 + s1))
    return np.maximum(gap_y, gap_x) >= gap


def _sample_boxes(rng: np.random.Generator, counts: np.ndarray, config: WorldConfig):
    """Sizes, tops, lefts, each (N, MAX_OBJECTS): uniform over non-touching layouts.

    Rejection sampling, vectorised: each round proposes LAYOUT_PROPOSALS i.i.d. layouts
    per unfinished scene and keeps the first valid one, which is still uniform.
    """
    n, (lo, hi), limit = len(counts), config.size_range, config.image_size - config.margin
    sizes, tops, lefts = (np.zeros((n, MAX_OBJECTS), dtype=np.int64) for _ in range(3))
    todo = np.arange(n)
    for _ in range(MAX_LAYOUT_ROUNDS):
        shape = (len(todo), LAYOUT_PROPOSALS, MAX_OBJECTS)
        proposed_sizes = rng.integers(lo, hi + 1, size=shape)
        proposed_tops = rng.integers(config.margin, limit - proposed_sizes + 1)
        proposed_lefts = rng.integers(config.margin, limit - proposed_sizes + 1)
        valid = (counts[todo, None] == 1) | _boxes_apart(
            proposed_sizes, proposed_tops, proposed_lefts, config.min_gap
        )  # (k, proposals)
        found, first = valid.any(axis=1), valid.argmax(axis=1)
        for out, proposed in ((sizes, proposed_sizes), (tops, proposed_tops), (lefts, proposed_lefts)):
            out[todo[found]] = proposed[found, first[found]]
        todo = todo[~found]
        if len(todo) == 0:
            return sizes, tops, lefts
    raise RuntimeError(f"no valid layout after {MAX_LAYOUT_ROUNDS} rounds; config {config} is too tight")


def _choose_objects(
    rng: np.random.Generator,
    n: int,
    *,
    config: WorldConfig,
    num_objects: int | None,
    objects: Sequence[tuple[str, str]] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Object counts (N,) and indices into config.pairs (N, MAX_OBJECTS); unused slots hold 0."""
    pairs = config.pairs
    if objects is not None:
        objects = [tuple(obj) for obj in objects]
        if num_objects is not None and num_objects != len(objects):
            raise UserError(f"num_objects={num_objects} contradicts the {len(objects)} objects {objects!r}")
        for obj in objects:
            if obj not in pairs:
                raise UserError(
                    f"object {obj!r} is not a (color, shape) of this world; colors: "
                    f"{list(config.colors)}, shapes: {list(config.shapes)}"
                )
        if not 1 <= len(objects) <= MAX_OBJECTS or len(set(objects)) != len(objects):
            raise UserError(f"objects {objects!r} must be 1..{MAX_OBJECTS} distinct (color, shape) pairs")
        ids = [pairs.index(obj) for obj in objects] + [0] * (MAX_OBJECTS - len(objects))
        return np.full(n, len(objects)), np.tile(ids, (n, 1))
    if num_objects is not None and num_objects not in range(1, MAX_OBJECTS + 1):
        raise UserError(f"num_objects={num_objects!r}; scenes have 1..{MAX_OBJECTS} objects")
    counts = 1 + (rng.random(n) < config.p_two_objects) if num_objects is None else np.full(n, num_objects)
    if (counts == 2).any() and len(pairs) < 2:
        raise UserError(f"two distinct objects need >= 2 (color, shape) pairs; this world has {pairs}")
    first = rng.integers(len(pairs), size=n)
    # An offset in 1..len-1 makes the second object always differ from the first.
    second = (first + 1 + rng.integers(max(len(pairs) - 1, 1), size=n)) % len(pairs)
    return counts, np.stack([first, second], axis=1)


def _centroids_and_boxes(masks: np.ndarray):
    """Centroid y, x (...) and bbox (..., 4) = (top, left, bottom, right) of masks (..., H, W)."""
    size = masks.shape[-1]
    area = np.maximum(masks.sum(axis=(-2, -1)), 1)
    rows, cols = masks.any(axis=-1), masks.any(axis=-2)  # (..., H), (..., W)
    cy = masks.sum(axis=-1) @ np.arange(size) / area
    cx = masks.sum(axis=-2) @ np.arange(size) / area
    box = np.stack(
        [rows.argmax(-1), cols.argmax(-1), size - rows[..., ::-1].argmax(-1), size - cols[..., ::-1].argmax(-1)],
        axis=-1,
    )
    return cy, cx, box


def _draw(
    rng: np.random.Generator,
    n: int,
    *,
    config: WorldConfig,
    num_objects: int | None,
    mention_background: bool | None,
    objects: Sequence[tuple[str, str]] | None,
    background: str | None,
) -> tuple[np.ndarray, list[Scene]]:
    """The shared sampler behind sample_scene and sample_batch: uint8 images (N, H, W, 3) and scenes."""
    pairs, backgrounds = config.pairs, list(config.backgrounds)
    counts, pair_ids = _choose_objects(rng, n, config=config, num_objects=num_objects, objects=objects)
    if background is not None and background not in backgrounds:
        raise UserError(f"background {background!r} is not one of {backgrounds}")
    bg_ids = (
        np.full(n, backgrounds.index(background)) if background is not None else rng.integers(len(backgrounds), size=n)
    )
    mention = (
        np.full(n, mention_background)
        if mention_background is not None
        else rng.random(n) < config.p_mention_background
    )
    sizes, tops, lefts = _sample_boxes(rng, counts, config)

    shape_ids = np.array([SHAPES.index(shape) for _, shape in pairs])[pair_ids]  # (N, 2)
    size = config.image_size
    masks = _rasterize_many(shape_ids.ravel(), sizes.ravel(), tops.ravel(), lefts.ravel(), image_size=size).reshape(
        n, MAX_OBJECTS, size, size
    )
    masks &= (np.arange(MAX_OBJECTS) < counts[:, None])[:, :, None, None]  # unused slots draw nothing

    # Paint by lookup: each pixel indexes its scene's table [background, object 1, object 2].
    palette = np.array(list(config.colors.values()), dtype=np.uint8)
    color_ids = np.array([list(config.colors).index(color) for color, _ in pairs])[pair_ids]
    bg_rgb = np.array(list(config.backgrounds.values()), dtype=np.uint8)[bg_ids]
    table = np.concatenate([bg_rgb[:, None], palette[color_ids]], axis=1)  # (N, 1 + MAX_OBJECTS, 3)
    slot = (masks * np.arange(1, MAX_OBJECTS + 1)[:, None, None]).sum(axis=1)  # (N, H, W), 0 = background
    images = table[np.arange(n)[:, None, None], slot]  # (N, H, W, 3)

    cy, cx, box = _centroids_and_boxes(masks)
    scenes = []
    for i in range(n):
        truths = [
            ObjectTruth(
                shape=pairs[pair_ids[i, j]][1],
                color=pairs[pair_ids[i, j]][0],
                mask=masks[i, j],
                centroid=(float(cy[i, j]), float(cx[i, j])),
                size=int(sizes[i, j]),
                bbox=tuple(int(v) for v in box[i, j]),
            )
            for j in range(counts[i])
        ]
        bg = backgrounds[bg_ids[i]]
        caption = make_caption([(t.color, t.shape) for t in truths], background=bg if mention[i] else None)
        scenes.append(Scene(objects=truths, background=bg, caption=caption, image=images[i]))
    return images, scenes


def sample_scene(
    rng: np.random.Generator,
    *,
    config: WorldConfig = WorldConfig(),
    num_objects: int | None = None,
    mention_background: bool | None = None,
    objects: Sequence[tuple[str, str]] | None = None,
    background: str | None = None,
) -> Scene:
    """One random scene. Any of num_objects, mention_background, objects (a list of
    (color, shape)) and background may be fixed; the layout is always random."""
    return _draw(
        rng,
        1,
        config=config,
        num_objects=num_objects,
        mention_background=mention_background,
        objects=objects,
        background=background,
    )[1][0]


def sample_batch(
    rng: np.random.Generator,
    n: int,
    *,
    config: WorldConfig = WorldConfig(),
    num_objects: int | None = None,
    mention_background: bool | None = None,
) -> tuple[torch.Tensor, list[str], list[Scene]]:
    """A training batch: float32 images (N, 3, H, W) in [-1, 1], captions, scenes.

    Vectorised over the batch (no per-pixel Python), since it runs every training step.
    """
    images, scenes = _draw(
        rng,
        n,
        config=config,
        num_objects=num_objects,
        mention_background=mention_background,
        objects=None,
        background=None,
    )
    # Converted in numpy: no torch intra-op threads contend with the training step.
    pixels = images.transpose(0, 3, 1, 2).astype(np.float32, order="C") / np.float32(127.5) - np.float32(
        1.0
    )  # (N, 3, H, W)
    return torch.from_numpy(pixels), [scene.caption for scene in scenes], scenes


def held_out_scenes(
    *, seed: int, n: int, config: WorldConfig = WorldConfig(), num_objects: int | None = None
) -> list[Scene]:
    """A fixed evaluation set: the same `n` scenes for the same seed and config."""
    return _draw(
        np.random.default_rng(seed),
        n,
        config=config,
        num_objects=num_objects,
        mention_background=None,
        objects=None,
        background=None,
    )[1]
