"""p2p.shapes.metrics on rendered scenes, where the right answer is known exactly (issues 5 and 7)."""

import dataclasses

import numpy as np
import pytest

from p2p.shapes.metrics import far_from, layout_commit_step, score_edit, summarize, unchanged_pixels
from p2p.shapes.world import make_caption, rasterize, render, sample_scene

BACKGROUND = "black"


def _scene(color="red", shape="circle", background=BACKGROUND):
    return sample_scene(
        np.random.default_rng(7), objects=[(color, shape)], background=background, mention_background=True
    )


def _moved(scene, *, dy, dx):
    """The scene's object shifted by (dy, dx) pixels (same color, shape and size)."""
    obj = scene.objects[0]
    top, left = obj.bbox[0] + dy, obj.bbox[1] + dx
    mask = rasterize(obj.shape, size=obj.size, top=top, left=left, image_size=scene.image.shape[0])
    return render([dataclasses.replace(obj, mask=mask)], background=scene.background)


def test_a_color_swap_in_place_succeeds_and_keeps_the_layout():
    scene = _scene()
    recolored = render([dataclasses.replace(scene.objects[0], color="blue")], background=BACKGROUND)
    score = score_edit(
        scene.image,
        recolored,
        source_caption=scene.caption,
        target_caption=make_caption([("blue", "circle")], background=BACKGROUND),
    )
    assert score.source_correct and score.target_correct and score.target_colors
    assert score.iou == 1.0 and score.centroid_shift == 0.0 and score.background_changed == 0.0


def test_a_moved_object_loses_the_layout_and_a_wrong_color_fails():
    scene = _scene()
    moved = _moved(scene, dy=0, dx=-6)
    score = score_edit(
        scene.image,
        moved,
        source_caption=scene.caption,
        target_caption=make_caption([("blue", "circle")], background=BACKGROUND),
    )
    assert not score.target_correct and not score.target_colors  # still red
    assert score.iou < 0.8 and score.centroid_shift == pytest.approx(6.0, abs=0.5)


def test_summarize_counts_only_edits_of_correct_sources():
    rows = [
        {
            "edit_source_correct": True,
            "edit_target_correct": True,
            "edit_target_colors": True,
            "edit_iou": 0.9,
            "edit_centroid_shift": 0.5,
        },
        {
            "edit_source_correct": True,
            "edit_target_correct": False,
            "edit_target_colors": True,
            "edit_iou": 0.5,
            "edit_centroid_shift": 3.0,
        },
        {
            "edit_source_correct": False,
            "edit_target_correct": True,
            "edit_target_colors": True,
            "edit_iou": 1.0,
            "edit_centroid_shift": 0.0,
        },
    ]
    summary = summarize(rows, prefix="edit")
    assert summary["n"] == 2 and summary["success"] == 0.5 and summary["target_colors"] == 1.0
    assert summary["kept_layout"] == 0.5 and summary["success_and_kept"] == 0.5
    assert summary["mean_iou"] == pytest.approx(0.7) and summary["median_centroid_shift"] == pytest.approx(1.75)
    assert summarize(rows[2:], prefix="edit") == {"n": 0}


def test_colors_and_kept_needs_the_target_colors_and_the_layout_in_the_same_edit():
    row = {
        "edit_source_correct": True,
        "edit_target_correct": False,
        "edit_target_colors": True,
        "edit_iou": 0.85,
        "edit_centroid_shift": 0.5,
    }
    wrong_color = dict(row, edit_target_colors=False)
    moved = dict(row, edit_iou=0.5)
    summary = summarize([row, wrong_color, moved], prefix="edit")
    assert summary["colors_and_kept"] == pytest.approx(1 / 3) and summary["success_and_kept"] == 0.0
    assert summary["target_colors"] == pytest.approx(2 / 3) and summary["kept_layout"] == pytest.approx(2 / 3)


def test_unchanged_pixels_uses_its_tolerance_and_refuses_an_empty_mask():
    a = np.zeros((4, 4, 3), dtype=np.uint8)
    b = a.copy()
    b[0, 0] = 9  # over the default tolerance of 8
    b[0, 1] = 8  # within it
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, :2] = True
    assert unchanged_pixels(a, b, mask) == 0.5
    assert unchanged_pixels(a, b, mask, tolerance=9) == 1.0
    with pytest.raises(ValueError, match="no pixels"):
        unchanged_pixels(a, b, np.zeros((4, 4), dtype=bool))


def test_layout_commit_step_is_where_the_mask_stops_moving():
    scene = _scene()
    empty = render([], background=BACKGROUND)
    far, near = _moved(scene, dy=0, dx=-6), _moved(scene, dy=0, dx=1)  # IoU with the scene < 0.8, ≥ 0.8
    assert layout_commit_step([empty, far, scene.image, near, scene.image]) == 2
    assert layout_commit_step([scene.image, far, scene.image]) == 2  # a layout that comes back was not decided
    assert layout_commit_step([scene.image, near, scene.image]) == 0
    assert layout_commit_step([scene.image, near, scene.image], iou_threshold=1.0) == 2
    assert layout_commit_step([far]) == 0 and layout_commit_step([empty, empty]) == 0
    with pytest.raises(ValueError, match="at least one frame"):
        layout_commit_step([])


def test_far_from_keeps_exactly_the_pixels_beyond_the_margin():
    mask = np.zeros((9, 9), dtype=bool)
    mask[4, 4] = True
    far = far_from(mask, pixels=2)
    assert not far[2:7, 2:7].any() and far.sum() == 81 - 25  # the 5×5 box around the pixel is near
    assert np.array_equal(far_from(mask, pixels=0), ~mask)
    with pytest.raises(ValueError, match="pixels=-1 must be an integer ≥ 0"):
        far_from(mask, pixels=-1)
