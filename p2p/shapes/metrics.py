"""Edit success and preservation, measured with the shapes world's reader (issues 5 and 7).

A word-swap edit succeeds when the target image reads as the target caption; it preserves the layout
when the objects stay where they were: IoU of the source's and the target's object masks, and the
shift of their centroids. Same-seed sampling without injection is the baseline that loses the layout.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from models.errors import UserError
from models.stable_diffusion import StableDiffusion
from p2p.edit import BlendSpec, EditSpec, edit
from p2p.pipeline import SamplerSettings
from p2p.shapes.reader import mask_iou, matches_caption, read_image


@dataclass
class EditScore:
    source_correct: bool  # the source image reads as the source caption
    target_correct: bool  # the edited image reads as the target caption (edit success)
    target_colors: bool  # the edited image's object colors are the target caption's (shape and background aside)
    iou: float  # IoU of the union of object masks, source vs target (layout preservation)
    centroid_shift: float  # px between the object centroids (mean over objects paired by order); nan if unpaired
    background_changed: float  # fraction of pixels outside both images' objects whose color changed by > 32


def _objects_mask(reading, shape) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for obj in reading.objects:
        mask |= obj.mask
    return mask


def score_edit(source: np.ndarray, target: np.ndarray, *, source_caption: str, target_caption: str) -> EditScore:
    src, tgt = read_image(source), read_image(target)
    src_mask, tgt_mask = _objects_mask(src, source.shape[:2]), _objects_mask(tgt, target.shape[:2])
    if src.objects and len(src.objects) == len(tgt.objects):
        pairs = zip(sorted(src.objects, key=lambda o: o.centroid), sorted(tgt.objects, key=lambda o: o.centroid))
        shift = float(
            np.mean([np.hypot(a.centroid[0] - b.centroid[0], a.centroid[1] - b.centroid[1]) for a, b in pairs])
        )
    else:
        shift = float("nan")
    outside = ~(src_mask | tgt_mask)
    changed = np.abs(source.astype(int) - target.astype(int)).max(axis=-1) > 32
    target_match = matches_caption(tgt, target_caption)
    return EditScore(
        source_correct=bool(matches_caption(src, source_caption)["all"]),
        target_correct=bool(target_match["all"]),
        target_colors=bool(target_match["colors"]),
        iou=mask_iou(src_mask, tgt_mask) if (src_mask.any() or tgt_mask.any()) else 1.0,
        centroid_shift=shift,
        background_changed=float(changed[outside].mean()) if outside.any() else 0.0,
    )


def far_from(mask: np.ndarray, *, pixels: int) -> np.ndarray:
    """Bool (H, W): the pixels more than `pixels` px (Chebyshev) from every True pixel of `mask` — the
    background away from an object's outline, where a pixel of outline change does not reach."""
    if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 0:
        raise UserError(f"far_from: pixels={pixels!r} must be an integer ≥ 0")
    h, w = mask.shape
    padded = np.pad(mask.astype(bool), pixels)
    near = np.zeros((h, w), dtype=bool)
    for dy in range(2 * pixels + 1):
        for dx in range(2 * pixels + 1):
            near |= padded[dy : dy + h, dx : dx + w]
    return ~near


def unchanged_pixels(source: np.ndarray, target: np.ndarray, mask: np.ndarray, *, tolerance: int = 8) -> float:
    """Fraction of the pixels under `mask` whose every channel differs by at most `tolerance` (of 255)."""
    if not mask.any():
        raise UserError("unchanged_pixels: the mask selects no pixels")
    diff = np.abs(source.astype(int) - target.astype(int)).max(axis=-1)
    return float((diff[mask] <= tolerance).mean())


def edit_study(
    model: StableDiffusion,
    cases: Iterable[tuple[str, str]],
    *,
    seeds: Sequence[int],
    spec: EditSpec,
    settings: SamplerSettings,
    blend: BlendSpec | None = None,
    baseline: bool = True,
) -> list[dict]:
    """For each (source, target) caption pair and seed: scores of the edit and of same-seed sampling."""
    rows = []
    for source, target in cases:
        for seed in seeds:
            result = edit(model, [source, target], seed=seed, spec=spec, blend=blend, settings=settings, progress=False)
            row = {
                "source": source,
                "target": target,
                "seed": seed,
                **{
                    f"edit_{k}": v
                    for k, v in asdict(
                        score_edit(result.images[0], result.images[1], source_caption=source, target_caption=target)
                    ).items()
                },
            }
            if baseline:
                plain = edit(model, [source, target], seed=seed, spec=None, settings=settings, progress=False)
                row.update(
                    {
                        f"baseline_{k}": v
                        for k, v in asdict(
                            score_edit(plain.images[0], plain.images[1], source_caption=source, target_caption=target)
                        ).items()
                    }
                )
            rows.append(row)
    return rows


def layout_commit_step(frames: Sequence[np.ndarray], *, iou_threshold: float = 0.8) -> int:
    """When sampling decided the layout: the first step from which every later frame's object mask (the
    reader's) overlaps the last frame's with IoU ≥ `iou_threshold`. `frames`: uint8 (H, W, 3) images of one
    prompt's predicted x0, one per step, the last the final image. len(frames) − 1 means only the last.

    P2P keeps a layout only if its self-attention window reaches past this step (the paper's 40% on SD)."""
    if len(frames) == 0:
        raise UserError("layout_commit_step needs at least one frame")
    masks = [_objects_mask(read_image(frame), frame.shape[:2]) for frame in frames]
    final = masks[-1]
    step = len(masks) - 1
    while step > 0:
        if mask_iou(masks[step - 1], final) < iou_threshold:
            break
        step -= 1
    return step


def summarize(rows: Sequence[dict], *, prefix: str, iou_threshold: float = 0.8) -> dict:
    """Rates over a study: success, target colors reached, layout kept (IoU ≥ threshold), success and kept,
    target colors and kept (issue 7's bar, read per edit), mean IoU, median centroid shift."""
    ok = [r for r in rows if r[f"{prefix}_source_correct"]]  # judge edits of sources the model drew right
    if not ok:
        return {"n": 0}
    success = np.array([r[f"{prefix}_target_correct"] for r in ok])
    iou = np.array([r[f"{prefix}_iou"] for r in ok])
    shift = np.array([r[f"{prefix}_centroid_shift"] for r in ok], dtype=float)
    colors = np.array([r.get(f"{prefix}_target_colors", False) for r in ok])
    kept = iou >= iou_threshold
    return {
        "n": len(ok),
        "success": float(success.mean()),
        "target_colors": float(colors.mean()),
        "mean_iou": float(iou.mean()),
        "kept_layout": float(kept.mean()),
        "success_and_kept": float((success & kept).mean()),
        "colors_and_kept": float((colors & kept).mean()),
        "median_centroid_shift": float(np.nanmedian(shift)) if np.isfinite(shift).any() else float("nan"),
    }
