"""Issue 27: shapes-PIE is PIE-Bench's format exactly, its masks are the world's ground truth, and our mask decoding
is the benchmark's (pinned against an independent decoding written the way its evaluate.py reads the masks)."""

import json

import numpy as np
import pytest

from models.errors import UserError
from p2p.shapes.pie import (
    EDIT_TYPES,
    SHAPES_PIE_TYPES,
    decode_mask,
    encode_mask,
    make_entry,
    read_mapping,
    strip_brackets,
    write_shapes_pie,
)
from p2p.shapes.reader import matches_caption, read_image
from p2p.shapes.world import WorldConfig, parse_caption

PIE_FIELDS = {
    "image_path",
    "original_prompt",
    "editing_prompt",
    "editing_instruction",
    "editing_type_id",
    "blended_word",
    "mask",
}


def decode_like_the_benchmark(runs, height, width):
    """Independent decoding: every run pixel by pixel over the flattened image, then the border set to 1."""
    flat = [0.0] * (height * width)
    for i in range(0, len(runs), 2):
        for j in range(min(runs[i + 1], height * width - runs[i])):
            flat[runs[i] + j] = 1.0
    mask = np.array(flat).reshape(height, width)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1
    return mask


def test_mask_runs_round_trip_and_decode_as_the_benchmark_does():
    rng = np.random.default_rng(0)
    for height, width in ((32, 32), (7, 13), (512, 512)):
        mask = rng.random((height, width)) < 0.3
        runs = encode_mask(mask)
        assert decode_mask(runs, (height, width), border=False).astype(bool).tolist() == mask.tolist()
        assert np.array_equal(decode_mask(runs, (height, width)), decode_like_the_benchmark(runs, height, width))
    # a run past the end is clipped, as the benchmark clips it; pairs are [start, length]
    assert decode_mask([10, 100], (4, 4), border=False).reshape(-1).tolist() == [0] * 10 + [1] * 6
    assert encode_mask(np.array([[0, 1, 1], [1, 0, 1]], bool)) == [1, 3, 5, 1]
    with pytest.raises(UserError, match="pairs"):
        decode_mask([1, 2, 3], (4, 4))


@pytest.fixture(scope="module")
def shapes_pie(tmp_path_factory):
    return write_shapes_pie(tmp_path_factory.mktemp("pie") / "shapes_pie", n=5, seed=0)


def test_shapes_pie_is_pie_bench_format(shapes_pie):
    raw = json.loads((shapes_pie / "mapping_file.json").read_text())
    assert len(raw) == 5 and {item["editing_type_id"] for item in raw.values()} == set(SHAPES_PIE_TYPES)
    for key, item in raw.items():
        assert set(item) == PIE_FIELDS and len(key) == 12 and key[0] == item["editing_type_id"]
        assert item["editing_type_id"] in EDIT_TYPES
        assert (shapes_pie / "annotation_images" / item["image_path"]).is_file()
        assert "[" in item["original_prompt"] + item["editing_prompt"]  # the edited words are marked
        assert len(item["blended_word"].split()) == 2
        assert all(isinstance(v, int) for v in item["mask"]) and len(item["mask"]) % 2 == 0
        parse_caption(strip_brackets(item["original_prompt"]))  # both prompts are the world's captions
        parse_caption(strip_brackets(item["editing_prompt"]))


def test_masks_are_the_worlds_ground_truth_and_the_source_reads_as_its_prompt(shapes_pie):
    for key, entry in read_mapping(shapes_pie).items():
        again, image = make_entry(int(key[1:]), seed=0)  # a pure function of (index, seed)
        assert again == entry
        assert matches_caption(read_image(image), entry.source)["all"]
        mask = decode_mask(entry.mask, image.shape[:2], border=False).astype(bool)
        background = np.all(image == image[0, 0], axis=-1)  # margin ≥ 1: the corner is background
        if entry.editing_type_id == "8":  # change background: every background pixel, nothing else
            assert np.array_equal(mask, background)
        elif entry.editing_type_id in ("6", "3", "1"):  # one object's pixels (objects have distinct colors)
            color = image[mask & ~background][0]
            the_object = np.all(image == color, axis=-1)
            if entry.editing_type_id == "1":  # change shape: the old shape ∪ the new one in the same box
                assert np.all(mask[the_object]) and mask.sum() >= the_object.sum()
            else:  # change color / delete: exactly the object
                assert np.array_equal(mask, the_object)
        else:  # add: where the new object can go, never on the existing one
            assert mask.any() and not np.any(mask & ~background)


def test_mask_size_follows_the_image_size(tmp_path):
    entry, image = make_entry(0, seed=1, config=WorldConfig(image_size=64))
    assert image.shape[:2] == (64, 64)
    assert decode_mask(entry.mask, (64, 64), border=False).sum() > 0
    assert max(s + n for s, n in zip(entry.mask[0::2], entry.mask[1::2])) <= 64 * 64


def test_refuses_an_existing_set_and_a_bad_count(shapes_pie, tmp_path):
    with pytest.raises(UserError, match="already holds"):
        write_shapes_pie(shapes_pie, n=2)
    with pytest.raises(UserError, match="n=0"):
        write_shapes_pie(tmp_path / "x", n=0)
    with pytest.raises(UserError, match="mapping_file.json"):
        read_mapping(tmp_path)


def test_benchmark_script_names_a_missing_data_folder_and_a_bad_shard_in_one_line(shapes_pie, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"

    def run(*args):
        result = subprocess.run(
            [sys.executable, str(script), *args, f"hydra.run.dir={tmp_path / 'run'}"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        lines = [line for line in result.stderr.splitlines() if line.strip() and "WARNING" not in line]
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
        return lines[0]

    assert "mapping_file.json" in run(f"data={tmp_path}")
    assert "shard=3 is out of range for n_shards=3" in run(f"data={shapes_pie}", "shard=3", "n_shards=3")
