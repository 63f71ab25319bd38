"""shapes-PIE: a PIE-Bench-format editing benchmark drawn from the shapes world, with exact masks (issue 27).

PIE-Bench (Ju et al. 2023, "Direct Inversion", §5) is a folder with `mapping_file.json` and
`annotation_images/`. The JSON maps a 12-digit key to:
- `image_path`: relative to annotation_images/;
- `original_prompt`, `editing_prompt`: the edited words in [brackets], which are not part of the prompt;
- `editing_instruction`: the edit in words;
- `editing_type_id`: "0" … "9" (EDIT_TYPES);
- `blended_word`: "source_word target_word" (LocalBlend's words), may be "";
- `mask`: the edit region as run-length pairs [start, length, …] over the row-major flattened image.
The benchmark's images are 512×512 and so are its masks; here both are the world's size (32 px for the built-in
model): a mask always has its image's size. Its evaluation sets the border pixels of every mask to 1
(`decode_mask(border=True)`), so the unedited region never includes the border.

The world can do five of the ten edit types, each measurable exactly: change object (shape swap, "1"), add object
("2"), delete object ("3"), change color ("6"), change background ("8"). Masks come from the world's ground truth:
the edited object (for a shape swap: the old shape ∪ the new one drawn in the same box), the background (all but
the objects), the deleted object; for an added object, where it can go: everything farther than the world's gap
from the existing object (the model, not the data, decides the place, as with PIE-Bench's hand-drawn regions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from models.errors import UserError
from models.files import atomic_path, write_text
from p2p.shapes.metrics import far_from
from p2p.shapes.world import WorldConfig, make_caption, rasterize, sample_scene

# PIE-Bench's ten edit types (the paper's Table 1 order; `editing_type_id` is the index as a string)
EDIT_TYPES = {
    "0": "random",
    "1": "change object",
    "2": "add object",
    "3": "delete object",
    "4": "change content",
    "5": "change pose",
    "6": "change color",
    "7": "change material",
    "8": "change background",
    "9": "change style",
}
SHAPES_PIE_TYPES = ("6", "1", "8", "2", "3")  # what the shapes world can do, cycled in this order
MAPPING_FILE = "mapping_file.json"
IMAGES_DIR = "annotation_images"
KEY_DIGITS = 12  # PIE-Bench keys: "000000000000" … (first digit = the edit type)


@dataclass
class PieEntry:
    key: str
    image_path: str  # relative to annotation_images/
    original_prompt: str  # with [brackets] around the edited words
    editing_prompt: str
    editing_instruction: str
    editing_type_id: str
    blended_word: str  # "source_word target_word" or ""
    mask: list  # run-length pairs [start, length, …], row-major over the image

    @property
    def source(self) -> str:
        return strip_brackets(self.original_prompt)

    @property
    def target(self) -> str:
        return strip_brackets(self.editing_prompt)

    def to_json(self) -> dict:
        return {
            "image_path": self.image_path,
            "original_prompt": self.original_prompt,
            "editing_prompt": self.editing_prompt,
            "editing_instruction": self.editing_instruction,
            "editing_type_id": self.editing_type_id,
            "blended_word": self.blended_word,
            "mask": self.mask,
        }


def strip_brackets(prompt: str) -> str:
    """The prompt the model sees: PIE-Bench's [brackets] mark the edited words and are dropped (its evaluate.py)."""
    return " ".join(prompt.replace("[", "").replace("]", "").split())


def encode_mask(mask: np.ndarray) -> list[int]:
    """Bool (H, W) → PIE-Bench's run-length pairs [start, length, …] over the row-major flattened mask."""
    flat = np.concatenate([[0], np.asarray(mask, dtype=bool).reshape(-1).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))  # run starts at even positions, run ends at odd ones
    starts, ends = edges[0::2], edges[1::2]
    return [int(v) for pair in zip(starts, ends - starts) for v in pair]


def decode_mask(runs, shape: tuple[int, int], *, border: bool = True) -> np.ndarray:
    """PIE-Bench's run-length pairs → float (H, W) mask, 1 = edited region; runs past the end are clipped.

    border=True sets the outermost pixels to 1 as the benchmark's evaluation does ("to avoid annotation errors
    in boundary"), so they never count as unedited.
    """
    height, width = shape
    if len(runs) % 2:
        raise UserError(f"a PIE-Bench mask is [start, length, …] pairs; got {len(runs)} numbers")
    flat = np.zeros(height * width)
    for start, length in zip(runs[0::2], runs[1::2]):
        if start < 0 or length < 0:
            raise UserError(f"mask run ({start}, {length}) is negative; runs are [start, length] with both ≥ 0")
        flat[start : start + length] = 1
    mask = flat.reshape(height, width)
    if border:
        mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1
    return mask


def read_mapping(data_dir: str | Path) -> dict[str, PieEntry]:
    """A PIE-Bench folder's entries, keyed as in its mapping file (PIE-Bench proper or shapes-PIE)."""
    data_dir = Path(data_dir)
    path = data_dir / MAPPING_FILE
    if not path.is_file():
        raise UserError(
            f"data={str(data_dir)!r} has no {MAPPING_FILE}; pass a PIE-Bench folder (mapping_file.json "
            "and annotation_images/), or make one: python scripts/make_shapes_pie.py out=DIR"
        )
    raw = json.loads(path.read_text())
    fields = PieEntry.__dataclass_fields__
    entries = {}
    for key, item in raw.items():
        missing = [f for f in fields if f != "key" and f not in item]
        if missing:
            raise UserError(f"{path}: entry {key!r} lacks {missing}; PIE-Bench entries have {list(fields)[1:]}")
        entries[key] = PieEntry(key=key, **{f: item[f] for f in fields if f != "key"})
    return entries


# ----------------------------------------------------------------------------- generating shapes-PIE


def _bracket(words: list[str], chosen: set[int]) -> str:
    """Words with runs of the `chosen` positions in [brackets]: "a red circle [and a blue square] on …"."""
    marked = [
        ("[" if i in chosen and i - 1 not in chosen else "") + w + ("]" if i in chosen and i + 1 not in chosen else "")
        for i, w in enumerate(words)
    ]
    return " ".join(marked)


def _other(rng: np.random.Generator, names, *exclude: str) -> str:
    return str(rng.choice([n for n in names if n not in exclude]))


def make_entry(index: int, *, seed: int, config: WorldConfig = WorldConfig()) -> tuple[PieEntry, np.ndarray]:
    """Entry `index` of the set `seed` and its source image; a pure function of (index, seed, config)."""
    rng = np.random.default_rng([seed, index])
    type_id = SHAPES_PIE_TYPES[index % len(SHAPES_PIE_TYPES)]
    num_objects = {"2": 1, "3": 2}.get(type_id, int(rng.integers(1, 3)))
    shapes = rng.choice(config.shapes, size=num_objects, replace=False)  # distinct shapes: a blend word is one object
    colors = rng.choice(list(config.colors), size=num_objects, replace=False)
    scene = sample_scene(
        rng, config=config, objects=list(zip(colors, shapes)), background=str(rng.choice(list(config.backgrounds)))
    )
    objects = [(o.color, o.shape) for o in scene.objects]
    source = make_caption(objects, background=scene.background).split()
    k = int(rng.integers(len(objects)))  # the edited object
    color, shape = objects[k]
    at = 4 * k  # "a C S and a C S on …": object k's color is word 4k + 1, its shape 4k + 2
    if type_id == "6":
        new = _other(rng, config.colors, *colors)
        target = source.copy()
        target[at + 1] = new
        original, editing = _bracket(source, {at + 1}), _bracket(target, {at + 1})
        instruction, blended = f"change the color of the {shape} from {color} to {new}", f"{shape} {shape}"
        mask = scene.objects[k].mask
    elif type_id == "1":
        new = _other(rng, config.shapes, *shapes)
        target = source.copy()
        target[at + 2] = new
        original, editing = _bracket(source, {at + 2}), _bracket(target, {at + 2})
        instruction, blended = f"change the {color} {shape} into a {color} {new}", f"{shape} {new}"
        obj = scene.objects[k]
        mask = obj.mask | rasterize(new, size=obj.size, top=obj.bbox[0], left=obj.bbox[1], image_size=config.image_size)
    elif type_id == "8":
        new = _other(rng, config.backgrounds, scene.background)
        target = source.copy()
        target[-2] = new
        original, editing = _bracket(source, {len(source) - 2}), _bracket(target, {len(source) - 2})
        instruction, blended = f"change the background from {scene.background} to {new}", "background background"
        mask = ~np.logical_or.reduce([o.mask for o in scene.objects])
    elif type_id == "2":
        added = (_other(rng, config.colors, color), _other(rng, config.shapes, shape))
        target = make_caption([objects[0], added], background=scene.background).split()
        new_words = set(range(3, 7))  # "and a C S"
        original, editing = " ".join(source), _bracket(target, new_words)
        instruction, blended = f"add a {added[0]} {added[1]}", f"{added[1]} {added[1]}"
        mask = far_from(scene.objects[0].mask, pixels=config.min_gap)
    else:  # "3": delete object k
        kept = objects[1 - k]
        target = make_caption([kept], background=scene.background).split()
        gone = set(range(3, 7)) if k == 1 else set(range(0, 4))  # "and a C S" / "a C S and"
        original, editing = _bracket(source, gone), " ".join(target)
        instruction, blended = f"remove the {color} {shape}", f"{shape} {shape}"
        mask = scene.objects[k].mask
    key = f"{type_id}{index:0{KEY_DIGITS - 1}d}"
    image_path = f"{type_id}_{EDIT_TYPES[type_id].replace(' ', '_')}/{key}.png"
    entry = PieEntry(
        key=key,
        image_path=image_path,
        original_prompt=original,
        editing_prompt=editing,
        editing_instruction=instruction,
        editing_type_id=type_id,
        blended_word=blended,
        mask=encode_mask(mask),
    )
    return entry, scene.image


def write_shapes_pie(out: str | Path, *, n: int, seed: int = 0, config: WorldConfig = WorldConfig()) -> Path:
    """Write `n` entries (the edit types in turn) to `out`: mapping_file.json (last) and annotation_images/."""
    out = Path(out)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"n={n!r}: the number of entries must be an integer ≥ 1")
    if (out / MAPPING_FILE).exists():
        raise UserError(f"{out} already holds a {MAPPING_FILE}; pick a new out= folder")
    mapping = {}
    for index in range(n):
        entry, image = make_entry(index, seed=seed, config=config)
        path = out / IMAGES_DIR / entry.image_path
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as partial:
            Image.fromarray(image).save(partial, format="PNG")  # lossless: the masks are exact to the pixel
        mapping[entry.key] = entry.to_json()
    write_text(out / MAPPING_FILE, json.dumps(mapping, indent=1))  # last: its presence means the set is complete
    return out
