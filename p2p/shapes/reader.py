"""Ground-truth reader for the shapes world: which objects, colors, shapes and background
does an image show, and where are the objects?

It works on any RGB image -- a render from `p2p/shapes/world.py` or a sample from the diffusion
model -- so it must survive blurry edges, noise and slightly-off colors:

1. background = the palette background nearest the median border color (renders keep a
   free margin, so the border is background);
2. each pixel is explained as a mix `background + alpha * (color - background)` of the
   measured background and each object palette color; it takes the color whose mixing
   line passes closest, and is foreground when its alpha >= FOREGROUND_ALPHA -- a blurred
   edge is exactly such a mix, so its 0.5 level stays on the original edge;
3. inside one foreground blob, stray minority colors are voted into the majority color;
4. 8-connected components of equal color are objects; tiny ones are noise;
5. the shape follows from the component's geometry (taper, then fill ratio).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from models.errors import UserError
from p2p.shapes.world import CaptionSpec, Scene, WorldConfig, parse_caption

# Step 2: foreground is at least half-way from the background to the object color.
FOREGROUND_ALPHA = 0.5
# Step 3-4: components (and minority colors inside a blob) smaller than this fraction of
# the image are noise. 12 px at 32x32; the smallest object (a 9 px triangle) has 49 px.
MIN_AREA_FRACTION = 12 / 1024
# Step 5: taper = mean row width of the top third / of the bottom third of the bbox.
# Measured on renders with 3x3 blur and noise: triangles (apex up) 0.25-0.48,
# circles and squares 0.86-1.24; the threshold sits in the middle of the gap.
TRIANGLE_MAX_TAPER = 0.65
# Step 5: fill = area / bbox area of the majority-filtered mask. Measured as above:
# squares 0.95-0.98 (the filter trims their corners), discrete circles 0.73-0.85
# (the continuous value is pi/4 = 0.785; small circles fill more of their box).
SQUARE_MIN_FILL = 0.9
# Step 5: masks whose bbox is narrower or shorter than this are classified unfiltered: the 3x3 majority vote
# trims every corner pixel, which a 4-7 px square (a 16 px world's objects) cannot spare — its fill drops to
# a circle's. Masks of that size are also too small for the filter's noise cleaning to matter.
FILTER_MIN_SIDE = 8
# Default tolerances of compare_to_scene.
CENTROID_TOLERANCE_PX = 1.0
MIN_MASK_IOU = 0.9

_NEIGHBORS_8 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


@dataclass
class ObjectReading:
    color: str  # nearest object palette color
    shape: str  # "circle", "square" or "triangle"
    mask: np.ndarray  # bool (H, W)
    centroid: tuple[float, float]  # (y, x) mean pixel coordinate of the mask
    size: int  # longer side of the mask's bounding box, pixels

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass
class Reading:
    background: str  # nearest background palette name
    background_rgb: tuple[float, float, float]  # the measured (median border) color, 0..255
    objects: list[ObjectReading]  # sorted by centroid, top-left first


def as_rgb_array(image) -> np.ndarray:
    """float64 (H, W, 3) in 0..255 from uint8 HxWx3, float HxWx3 in [0, 1], or a tensor 3xHxW in [-1, 1]."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise UserError(f"tensor image has shape {tuple(image.shape)}; expected (3, H, W) in [-1, 1]")
        image = ((image.detach().cpu().double().permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).numpy()
        return image
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise UserError(f"array image has shape {image.shape}; expected (H, W, 3) uint8 or float in [0, 1]")
    if image.dtype == np.uint8:
        return image.astype(np.float64)
    if np.issubdtype(image.dtype, np.floating):
        return np.clip(image.astype(np.float64), 0.0, 1.0) * 255.0
    raise UserError(f"array image has dtype {image.dtype}; expected uint8 or a float dtype in [0, 1]")


def label_components(classes: np.ndarray) -> np.ndarray:
    """8-connected components of pixels with equal class id >= 0; labels 0..K-1, -1 elsewhere.

    Min-label propagation with pointer jumping: every pixel starts as its own flat index
    and repeatedly takes the smallest label among same-class neighbors.
    """
    h, w = classes.shape
    big = h * w
    padded_classes = np.pad(classes, 1, constant_values=-1)
    labels = np.where(classes >= 0, np.arange(big).reshape(h, w), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        new = labels.copy()
        for dy, dx in _NEIGHBORS_8:
            neighbor = padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
            same = padded_classes[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] == classes
            new = np.where(same & (classes >= 0), np.minimum(new, neighbor), new)
        # Pointer jumping: a label is a pixel of the same component, so adopt that pixel's label.
        flat = np.append(new.ravel(), big)
        new = np.where(classes >= 0, flat[new], big)
        if np.array_equal(new, labels):
            break
        labels = new
    _, dense = np.unique(labels, return_inverse=True)
    dense = dense.reshape(h, w)
    return np.where(classes >= 0, dense, -1)


def _majority_filter(mask: np.ndarray) -> np.ndarray:
    """3x3 majority vote: drops single stray pixels and fills single holes (noise)."""
    h, w = mask.shape
    padded = np.pad(mask, 1).astype(np.int64)
    votes = sum(padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    return votes >= 5


def classify_shape(mask: np.ndarray) -> str:
    """circle / square / triangle from a component mask; see TRIANGLE_MAX_TAPER, SQUARE_MIN_FILL.

    Measured on the majority-filtered mask, so one noisy pixel cannot stretch the bbox — unless the mask's
    bbox is smaller than FILTER_MIN_SIDE, where the filter would trim the shape itself.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or not mask.any():
        raise UserError(
            f"classify_shape needs a non-empty 2-D mask, got shape {mask.shape} with {int(mask.sum())} pixels set"
        )
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if min(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 >= FILTER_MIN_SIDE:
        filtered = _majority_filter(mask)
        mask = filtered if filtered.any() else mask
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    crop = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    widths = crop.sum(axis=1)
    third = max(1, len(widths) // 3)
    taper = widths[:third].mean() / max(widths[-third:].mean(), 1e-6)
    if taper < TRIANGLE_MAX_TAPER:
        return "triangle"
    return "square" if crop.mean() >= SQUARE_MIN_FILL else "circle"


def _nearest_name(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = np.linalg.norm(np.array(list(palette.values()), dtype=np.float64) - rgb, axis=1)
    return names[int(distances.argmin())]


def _explain_pixels(pixels: np.ndarray, background: np.ndarray, palette: np.ndarray):
    """Per pixel: index of the best-fitting palette color and its alpha (step 2)."""
    directions = palette - background  # (K, 3)
    offsets = pixels - background  # (H, W, 3)
    alpha = offsets @ directions.T / (directions**2).sum(axis=1)  # (H, W, K)
    on_line = np.clip(alpha, 0.0, 1.0)[..., None] * directions  # (H, W, K, 3)
    residual = np.linalg.norm(offsets[:, :, None, :] - on_line, axis=-1)  # (H, W, K)
    best = residual.argmin(axis=-1)
    return best, np.take_along_axis(alpha, best[..., None], axis=-1)[..., 0]


def read_image(image, *, config: WorldConfig = WorldConfig()) -> Reading:
    """Read background and objects from one image (see the module docstring for the steps)."""
    pixels = as_rgb_array(image)
    h, w, _ = pixels.shape
    min_area = max(1, round(MIN_AREA_FRACTION * h * w))
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background_rgb = np.median(border, axis=0)

    palette_names = list(config.colors)
    palette = np.array(list(config.colors.values()), dtype=np.float64)
    color_ids, alpha = _explain_pixels(pixels, background_rgb, palette)
    color_ids = np.where(alpha >= FOREGROUND_ALPHA, color_ids, -1)

    blobs = label_components(np.where(color_ids >= 0, 0, -1))
    for blob in range(blobs.max() + 1):
        inside = blobs == blob
        votes = np.bincount(color_ids[inside], minlength=len(palette_names))
        minority = inside & (votes[np.maximum(color_ids, 0)] < min_area)
        color_ids[minority] = votes.argmax()

    components = label_components(color_ids)
    objects = []
    for component in range(components.max() + 1):
        mask = components == component
        if mask.sum() < min_area:
            continue
        ys, xs = np.nonzero(mask)
        size = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
        objects.append(
            ObjectReading(
                color=palette_names[color_ids[mask][0]],
                shape=classify_shape(mask),
                mask=mask,
                centroid=(float(ys.mean()), float(xs.mean())),
                size=int(size),
            )
        )
    objects.sort(key=lambda obj: obj.centroid)
    return Reading(
        background=_nearest_name(background_rgb, config.backgrounds),
        background_rgb=tuple(float(v) for v in background_rgb),
        objects=objects,
    )


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks; 1.0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def matches_caption(reading: Reading, caption: str | CaptionSpec, *, config: WorldConfig = WorldConfig()) -> dict:
    """Per-attribute agreement of a reading with a caption.

    Returns count (as many objects as named), colors / shapes (the multisets agree),
    found (per named object: an unused read object has its color and shape), objects
    (all found and the count right), background (None when the caption does not name it),
    all (everything checked is right).
    """
    spec = caption if isinstance(caption, CaptionSpec) else parse_caption(caption, config=config)
    read = [(obj.color, obj.shape) for obj in reading.objects]
    unused, found = Counter(read), []
    for pair in spec.objects:
        found.append(unused[pair] > 0)
        unused[pair] -= 1
    result = {
        "count": len(read) == len(spec.objects),
        "colors": Counter(c for c, _ in read) == Counter(c for c, _ in spec.objects),
        "shapes": Counter(s for _, s in read) == Counter(s for _, s in spec.objects),
        "found": found,
        "objects": all(found) and len(read) == len(spec.objects),
        "background": None if spec.background is None else reading.background == spec.background,
    }
    result["all"] = result["objects"] and result["background"] is not False
    return result


def compare_to_scene(
    reading: Reading,
    scene: Scene,
    *,
    centroid_tolerance_px: float = CENTROID_TOLERANCE_PX,
    min_mask_iou: float = MIN_MASK_IOU,
) -> dict:
    """Agreement of a reading with a scene's full ground truth, layout included.

    Each true object is paired with the read object of the same color and shape; located
    means its centroid is within the tolerance and its mask IoU at least min_mask_iou.
    Returns count, objects (all named attributes found), background, located, all.
    """
    attributes = matches_caption(
        reading, CaptionSpec(objects=[(o.color, o.shape) for o in scene.objects], background=scene.background)
    )
    located = attributes["objects"]
    if located:
        for truth in scene.objects:
            read = next(o for o in reading.objects if (o.color, o.shape) == (truth.color, truth.shape))
            error = np.hypot(read.centroid[0] - truth.centroid[0], read.centroid[1] - truth.centroid[1])
            located = located and error <= centroid_tolerance_px and mask_iou(read.mask, truth.mask) >= min_mask_iou
    return {
        "count": attributes["count"],
        "objects": attributes["objects"],
        "background": attributes["background"],
        "located": bool(located),
        "all": bool(located and attributes["background"]),
    }
