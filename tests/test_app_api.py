"""The app through its API (issue 28): a real server on a free local port, driven with gradio_client — an edit, a
slider change, the attention views, a photo round trip, a download, and each mistake as one line while the server
keeps serving."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import yaml
from PIL import Image

pytest.importorskip("gradio", reason="the app extra is not installed: pip install -e '.[app]'")
gradio_client = pytest.importorskip("gradio_client", reason="the app extra is not installed: pip install -e '.[app]'")

from app_server import TEST_STEPS, app_server
from gradio_client import handle_file
from gradio_client.exceptions import AppError

SOURCE, TARGET = "a red circle on a black background", "a blue circle on a black background"
PAGE = dict(
    source=SOURCE,
    targets=TARGET,
    kind="auto",
    reweight_word="",
    reweight_scale=1.0,
    cross_start=0.0,
    cross_end=0.8,
    self_fraction=0.4,
    windows="",
    blend="",
    blend_threshold=0.4,
    restore_pixels=True,
    seed=3,
    steps=TEST_STEPS,
    guidance=5.0,
    photo_id="",
)
TILE = 96  # views.MIN_TILE: the 32 px images are shown as 96 px tiles, 4 px apart


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("app")
    with app_server(tmp) as url:
        yield gradio_client.Client(url, verbose=False, download_files=str(tmp / "client"))


def edit(client, **change):
    grid, reason = client.predict(*dict(PAGE, **change).values(), api_name="/edit")
    return np.asarray(Image.open(grid).convert("RGB")), reason


def tile(grid: np.ndarray, column: int) -> np.ndarray:
    """The image of the first row's tile `column` (0: the source)."""
    return grid[:TILE, column * (TILE + 4) : column * (TILE + 4) + TILE]


def test_the_api_has_the_named_endpoints(client):
    assert {"/edit", "/attention", "/invert"} <= set(
        client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    )


def test_an_edit_and_a_slider_change(client):
    grid, reason = edit(client)
    assert reason.startswith("replace") and "red → blue" in reason
    assert grid.std() > 10  # a picture, not a blank
    moved, _ = edit(client, cross_end=0.1)  # the cross-injection slider
    assert np.array_equal(tile(moved, 0), tile(grid, 0))  # the source, from the cache
    assert not np.array_equal(tile(moved, 1), tile(grid, 1))  # the edit follows the slider


def test_attention_views_and_the_blend_mask(client):
    cross, mask, components = client.predict(*dict(PAGE, blend="circle").values(), api_name="/attention")
    for path in (cross, mask, components):
        assert np.asarray(Image.open(path)).std() > 10
    assert client.predict(*PAGE.values(), api_name="/attention")[1] is None  # no blend words, no mask


def test_a_photo_round_trip(client, tmp_path):
    photo = tmp_path / "photo.png"
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 16:48] = (220, 30, 30)  # a red square on black, bigger than the model's 32 px
    Image.fromarray(image).save(photo)
    photo_id, reconstruction, status, source = client.predict(
        handle_file(str(photo)),
        "a red square on a black background",
        "negative_prompt",
        TEST_STEPS,
        5.0,
        api_name="/invert",
    )
    assert photo_id and source == "a red square on a black background" and "PSNR" in status
    assert np.asarray(Image.open(reconstruction)).shape == (32, 32, 3)
    grid, _ = edit(client, source=source, targets="a blue square on a black background", photo_id=photo_id)
    assert grid.shape[0] > 2 * TILE * 1.2  # three rows: the photo, the edit, the baseline
    again = client.predict(handle_file(str(photo)), source, "negative_prompt", TEST_STEPS, 5.0, api_name="/invert")
    assert again[0] == photo_id  # inverted once, reused


def test_a_download_holds_the_files_of_scripts_edit(client):
    files = client.predict(*dict(PAGE, blend="circle").values(), api_name="/download")
    archive = next(p for p in files if p.endswith(".zip"))
    names = sorted(zipfile.ZipFile(archive).namelist())
    # the names tests/test_scripts.py checks in scripts/edit.py's run folder (baseline=true attention=true blend)
    for name in (
        "00_a_red_circle_on_a_black_background.png",
        "01_a_blue_circle_on_a_black_background.png",
        "grid.png",
        "blend_mask.png",
        "config.yaml",
        "baseline/00_a_red_circle_on_a_black_background.png",
        "attention/01_a_blue_circle_on_a_black_background.png",
    ):
        assert name in names, names
    config = yaml.safe_load(zipfile.ZipFile(archive).read("config.yaml"))
    assert config["blend"]["words"] == ["circle"] and config["seed"] == 3 and config["model"]["name"] == "tiny"


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(reweight_word="cat"), "'cat' is not in any target prompt"),
        (dict(blend="square"), "'square' is not in prompt"),
        (dict(kind="replace", targets="a blue circle on a black background at night"), "same number of words"),
        (dict(source="a red circle " * 30), "tokens, but at most"),
        (dict(photo_id="nope"), "photo id 'nope' is unknown"),
    ],
)
def test_a_mistake_is_one_line_and_the_server_keeps_serving(client, change, message):
    with pytest.raises(AppError, match=message) as error:
        edit(client, **change)
    assert "Traceback" not in str(error.value) and "\n" not in str(error.value)
    assert edit(client)[0].std() > 10


@pytest.mark.parametrize(
    "content, name, message",
    [
        (b"not an image", "photo.png", "cannot read .* as an image"),
        (b"not an image", "notes.txt", "Invalid file type"),
    ],
)
def test_an_unreadable_upload_is_one_line(client, tmp_path, content, name, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(AppError, match=message):
        client.predict(handle_file(str(path)), "a red square", "null_text_fast", TEST_STEPS, 5.0, api_name="/invert")
