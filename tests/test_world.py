"""The shapes world: determinism, geometry, layout rules and the caption grammar."""

import numpy as np
import pytest
import torch

from p2p.shapes.world import (
    SHAPES,
    WorldConfig,
    all_captions,
    caption_set,
    held_out_scenes,
    make_caption,
    parse_caption,
    rasterize,
    render,
    sample_batch,
    sample_scene,
)

CONFIG = WorldConfig()


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Chebyshev dilation: every pixel within `radius` of the mask along both axes."""
    h, w = mask.shape
    padded = np.pad(mask, radius)
    out = np.zeros_like(mask)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            out |= padded[radius + dy : radius + dy + h, radius + dx : radius + dx + w]
    return out


def test_same_seed_gives_the_same_batch_and_another_seed_does_not():
    images_a, captions_a, _ = sample_batch(np.random.default_rng(5), 16)
    images_b, captions_b, _ = sample_batch(np.random.default_rng(5), 16)
    images_c, captions_c, _ = sample_batch(np.random.default_rng(6), 16)
    assert torch.equal(images_a, images_b) and captions_a == captions_b
    assert not torch.equal(images_a, images_c)
    assert [s.caption for s in held_out_scenes(seed=1, n=8)] == [s.caption for s in held_out_scenes(seed=1, n=8)]


def test_batch_tensor_is_the_rendered_scene_in_minus_one_to_one():
    images, captions, scenes = sample_batch(np.random.default_rng(0), 64)
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    for tensor, caption, scene in zip(images, captions, scenes):
        assert caption == scene.caption
        np.testing.assert_array_equal(render(scene.objects, background=scene.background), scene.image)
        expected = torch.from_numpy(scene.image).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.allclose(tensor, expected)


def test_two_objects_never_overlap_and_keep_the_gap_and_the_margin():
    scenes = held_out_scenes(seed=2, n=400, num_objects=2)
    for scene in scenes:
        first, second = (obj.mask for obj in scene.objects)
        assert not (_dilate(first, CONFIG.min_gap) & second).any(), scene.caption
        assert (scene.objects[0].color, scene.objects[0].shape) != (scene.objects[1].color, scene.objects[1].shape)
        border = np.concatenate([scene.image[0], scene.image[-1], scene.image[:, 0], scene.image[:, -1]])
        assert (border == CONFIG.backgrounds[scene.background]).all()


def test_every_shape_fills_its_box_and_triangles_point_up():
    for shape in SHAPES:
        for size in range(CONFIG.size_range[0], CONFIG.size_range[1] + 1):
            mask = rasterize(shape, size=size, top=2, left=3, image_size=32)
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            assert (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) == (2, 2 + size, 3, 3 + size), (shape, size)
            widths = mask.sum(axis=1)[rows]
            if shape == "triangle":
                assert widths[0] <= 2 and widths[-1] == size and (np.diff(widths) >= 0).all()
            if shape == "square":
                assert mask.sum() == size * size
    big_circle = rasterize("circle", size=60, top=0, left=0, image_size=64)
    assert abs(big_circle.sum() / 60**2 - np.pi / 4) < 0.01


def test_truth_records_what_was_drawn():
    for scene in held_out_scenes(seed=3, n=100):
        for obj in scene.objects:
            ys, xs = np.nonzero(obj.mask)
            assert obj.centroid == pytest.approx((ys.mean(), xs.mean()))
            assert obj.bbox == (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
            assert obj.bbox[2] - obj.bbox[0] == obj.size == obj.bbox[3] - obj.bbox[1]
            assert CONFIG.size_range[0] <= obj.size <= CONFIG.size_range[1]
            assert (scene.image[obj.mask] == CONFIG.colors[obj.color]).all()


def test_captions_parse_back_to_the_scene():
    for scene in held_out_scenes(seed=4, n=300):
        spec = parse_caption(scene.caption)
        assert spec.objects == [(obj.color, obj.shape) for obj in scene.objects]
        assert spec.background in (None, scene.background)
    assert parse_caption("An orange triangle and a red circle on a gray background.").objects == [
        ("orange", "triangle"),
        ("red", "circle"),
    ]


def test_captions_follow_the_templates():
    assert make_caption([("red", "circle")]) == "a red circle"
    assert (
        make_caption([("red", "circle"), ("blue", "square")], background="white")
        == "a red circle and a blue square on a white background"
    )
    # Swapping a color word changes exactly one word, as word-swap edits require.
    assert make_caption([("orange", "circle")]).split()[0] == "a"


def test_layout_is_random_and_not_in_the_caption():
    scenes = [
        sample_scene(
            np.random.default_rng(seed), objects=[("red", "circle")], background="black", mention_background=True
        )
        for seed in range(20)
    ]
    assert {scene.caption for scene in scenes} == {"a red circle on a black background"}
    assert len({scene.objects[0].centroid for scene in scenes}) >= 15
    assert len({scene.objects[0].size for scene in scenes}) >= 4


def test_sampling_covers_the_vocabulary_at_the_configured_rates():
    _, captions, scenes = sample_batch(np.random.default_rng(0), 2000)
    two = np.mean([len(scene.objects) == 2 for scene in scenes])
    named = np.mean([parse_caption(caption).background is not None for caption in captions])
    assert abs(two - CONFIG.p_two_objects) < 0.05 and abs(named - CONFIG.p_mention_background) < 0.05
    seen = {(obj.color, obj.shape) for scene in scenes for obj in scene.objects}
    assert seen == set(CONFIG.pairs) and {scene.background for scene in scenes} == set(CONFIG.backgrounds)


def test_unknown_word_is_named_with_the_vocabulary():
    with pytest.raises(ValueError, match=r"word 'cat' in caption 'a red cat'.*circle"):
        parse_caption("a red cat")
    with pytest.raises(ValueError, match=r"expected a shape"):
        parse_caption("a red blue circle")
    with pytest.raises(ValueError, match=r"expected 'a'"):
        parse_caption("red circle")


def test_caption_sets_are_fixed_and_distinct():
    captions = caption_set(num_objects=2, seed=0, n=50)
    assert captions == caption_set(num_objects=2, seed=0, n=50) != caption_set(num_objects=2, seed=1, n=50)
    assert len(set(captions)) == 50
    assert all(len(parse_caption(caption).objects) == 2 for caption in captions)
    # 18 (color, shape) pairs x (no background + 3 backgrounds)
    assert len(all_captions(num_objects=1)) == 72
    with pytest.raises(ValueError, match="only 72 distinct captions"):
        caption_set(num_objects=1, seed=0, n=100)


def test_object_size_scales_with_image_size():
    config = WorldConfig(image_size=64)
    assert config.size_range == (18, 30)
    scene = sample_scene(np.random.default_rng(0), config=config, num_objects=2)
    assert scene.image.shape == (64, 64, 3)
    assert all(18 <= obj.size <= 30 for obj in scene.objects)


def test_bad_configs_and_arguments_are_named():
    with pytest.raises(ValueError, match="'hexagon'"):
        WorldConfig(shapes=("circle", "hexagon"))
    with pytest.raises(ValueError, match="do not fit"):
        WorldConfig(image_size=16, object_size=(8, 10))
    with pytest.raises(ValueError, match="'pink', 'circle'"):
        sample_scene(np.random.default_rng(0), objects=[("pink", "circle")])
    with pytest.raises(ValueError, match="'violet'"):
        sample_scene(np.random.default_rng(0), background="violet")
