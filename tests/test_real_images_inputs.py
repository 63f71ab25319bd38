"""Real-image inputs nobody drew with the shapes world: odd files, odd modes, odd sizes, bad settings (issue 4)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.errors import UserError
from p2p.real.images import load_image


def halves(height=40, width=60) -> np.ndarray:
    """Left half black, right half white: orientation and crops are visible in the result."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, width // 2 :] = 255
    return image


def test_exif_orientation_is_applied(tmp_path):
    # Orientation 6: the viewer turns the stored pixels 90° clockwise, so the black left half ends up on top.
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    Image.fromarray(halves()).save(path, exif=exif, quality=95)
    loaded = load_image(path, height=32, width=32).astype(int)
    assert loaded[:8].mean() < 30 and loaded[-8:].mean() > 225, "the top must be black, the bottom white"


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "P", "1", "CMYK", "I;16", "F"])
def test_every_mode_gives_the_same_picture(tmp_path, mode):
    """A black/white image saved in any mode loads as the same black/white RGB picture."""
    source = Image.fromarray(halves())
    if mode == "I;16":  # 16-bit grayscale: white is 65535, which must become 255, not clip every gray to white
        values = np.asarray(source.convert("L")).astype(np.uint16) * 257
        values[:, :10] = 128 * 257  # a mid gray stays mid gray
        converted, suffix = Image.fromarray(values), ".png"
    elif mode == "F":  # float TIFF in [0, 1]
        converted, suffix = Image.fromarray(np.asarray(source.convert("L")).astype(np.float32) / 255), ".tif"
    else:
        converted, suffix = source.convert(mode), (".jpg" if mode == "CMYK" else ".png")
    path = tmp_path / f"image{suffix}"
    converted.save(path)
    loaded = load_image(path, height=40, width=60).astype(int)
    assert loaded.shape == (40, 60, 3)
    assert loaded[:, 12:26].mean() < 20 and loaded[:, 34:].mean() > 235, mode
    if mode == "I;16":
        assert abs(loaded[:, 2:8].mean() - 128) < 3


def test_transparency_is_composited_on_white(tmp_path):
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    palette.putpalette([10, 20, 30, 200, 100, 50])
    path = tmp_path / "palette.png"
    palette.save(path, transparency=1)  # index 1 transparent
    loaded = load_image(path, height=2, width=2)
    assert (loaded[0, 0] == (10, 20, 30)).all() and (loaded[0, 1] == 255).all() and (loaded[1, 0] == 255).all()
    gray_alpha = np.zeros((4, 4, 2), np.uint8)
    gray_alpha[0, 0] = (0, 255)  # one opaque black pixel, the rest transparent
    loaded = load_image(Image.fromarray(gray_alpha, "LA"), height=4, width=4)
    assert (loaded[0, 0] == 0).all() and (loaded.reshape(-1, 3)[1:] == 255).all()


def test_arrays_and_pil_images_are_accepted():
    rgb = halves()
    from_array = load_image(rgb, height=40, width=60)
    assert (from_array == rgb).all()
    assert (load_image(Image.fromarray(rgb), height=40, width=60) == rgb).all()
    assert (load_image(rgb[..., 0].astype(np.float32) / 255, height=40, width=60) == rgb).all()
    with pytest.raises(ValueError, match=r"shape \(40, 60, 2\).*\(H, W, 3\)"):
        load_image(np.zeros((40, 60, 2), np.uint8), height=32, width=32)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        load_image(np.full((4, 4, 3), 2.0), height=32, width=32)
    with pytest.raises(ValueError, match="int64"):
        load_image(np.zeros((4, 4, 3), np.int64), height=32, width=32)


@pytest.mark.parametrize(
    "shape, size", [((1, 1, 3), (32, 64)), ((1, 3, 3), (64, 32)), ((3, 2000, 3), (16, 16)), ((2000, 2, 3), (8, 64))]
)
def test_tiny_and_extreme_aspect_images_fill_the_requested_size(shape, size):
    height, width = size
    assert load_image(np.full(shape, 7, np.uint8), height=height, width=width).shape == (height, width, 3)


def test_non_square_output_keeps_the_centre():
    image = np.zeros((100, 100, 3), np.uint8)
    image[:, 40:60] = 255  # a white vertical stripe in the middle
    wide = load_image(image, height=16, width=64)  # crops top and bottom, keeps the full width
    assert wide.shape == (16, 64, 3) and wide[:, 30:34].min() > 200 and wide[:, :20].max() < 30


def test_margins_are_cut_before_the_centre_crop():
    image = halves(40, 80)
    # cutting the 40 white columns leaves a black 40×40 square
    assert load_image(image, height=8, width=8, margins=(0, 0, 40, 0)).max() == 0
    assert load_image(image, height=8, width=8, margins=[40, 0, 0, 0]).min() == 255  # any sequence


@pytest.mark.parametrize(
    "margins", [(-1, 0, 0, 0), (0, 0, 0), (0, 0, 0, 0, 0), (1.5, 0, 0, 0), "0000", 5, (0, 0, True, 0), None]
)
def test_invalid_margins_are_named(margins):
    with pytest.raises(ValueError, match=r"margins=.*four whole numbers.*\(left, top, right, bottom\)"):
        load_image(halves(), height=32, width=32, margins=margins)


@pytest.mark.parametrize("margins", [(30, 0, 30, 0), (0, 40, 0, 0), (0, 0, 100, 0)])
def test_margins_that_leave_nothing_are_named(margins):
    with pytest.raises(ValueError, match=r"leave nothing of a 60×40 image"):
        load_image(halves(), height=32, width=32, margins=margins)


@pytest.mark.parametrize("height, width", [(0, 32), (-8, 32), (32.5, 32), (32, None)])
def test_invalid_sizes_are_named(height, width):
    with pytest.raises(ValueError, match=r"(height|width)=.* positive whole number"):
        load_image(halves(), height=height, width=width)


def test_unreadable_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png' does not exist"):
        load_image(tmp_path / "missing.png", height=32, width=32)
    with pytest.raises(UserError, match="is a directory"):
        load_image(tmp_path, height=32, width=32)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="cannot read .*notes.png"):
        load_image(text, height=32, width=32)
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ValueError, match="cannot read .*truncated.png"):
        load_image(truncated, height=32, width=32)
    with pytest.raises(TypeError, match="file path, a PIL image or a numpy array"):
        load_image(42, height=32, width=32)


# --- scripts/edit_image.py: the config as Hydra composes it, checked before the model is loaded -----------

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = '["a red circle on a black background","a blue circle on a black background"]'


def compose_edit_image(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="edit_image", overrides=list(overrides))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([f"prompts={CAPTIONS}"], "image is required: pass image=PATH"),
        (["image=photo.png"], "prompts is required"),
        (["image=photo.png", "prompts=a red circle"], "prompts must be a list of strings"),  # not 12 one-letter prompts
        (["image=photo.png", "prompts=[1,2]"], "prompts must be a list of strings"),
        (["image=photo.png", 'prompts=["a red circle"]'], "needs a source and at least one target prompt"),
        (["image=photo.png", "prompts=[]", "edit=store"], "prompts needs at least 1 prompt, got 0"),
        (
            ["image=photo.png", f"prompts={CAPTIONS}", "negative_prompt=blurry"],
            "negative_prompt='blurry' has no effect",
        ),
        (["image=photo.png", f"prompts={CAPTIONS}", "restore_unedited=true"], "restore_unedited=true needs a mask"),
        (["image=photo.png", f"prompts={CAPTIONS}", "blend=local"], "LocalBlend needs its words"),
        (["image=photo.png", f"prompts={CAPTIONS}", "edit.kind=swap"], "edit.kind='swap' is not supported"),
        (
            ["image=photo.png", f"prompts={CAPTIONS}", "inversion.tolerance_scale=fast"],
            "inversion.tolerance_scale='fast' is not a number",
        ),
        (["image=photo.png", f"prompts={CAPTIONS}", "inversion.tolerance_scale=-1"], "tolerance_scale=-1.0: .*≥ 0"),
    ],
)
def test_edit_image_refuses_bad_overrides_before_loading_the_model(overrides, message):
    from scripts.edit_image import check_request

    with pytest.raises(ValueError, match=message):
        check_request(compose_edit_image(*overrides))


def test_edit_image_accepts_every_inversion_and_a_caption_alone_without_an_edit():
    from scripts.edit_image import check_request

    for name, method in (
        ("ddim", "ddim"),
        ("negative_prompt", "negative_prompt"),
        ("null_text", "null_text"),
        ("null_text_fast", "null_text"),
    ):
        cfg = compose_edit_image("image=photo.png", f"prompts={CAPTIONS}", f"inversion={name}")
        assert cfg.inversion.method == method and cfg.inversion.guidance == 1.0
        assert check_request(cfg)[0] == json.loads(CAPTIONS)
    prompts, spec, blend, _ = check_request(
        compose_edit_image("image=photo.png", 'prompts=["a red circle"]', "edit=store")
    )
    assert prompts == ["a red circle"] and spec.kind == "none" and blend is None
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="null_text"):  # Hydra lists the inversions there are
        compose_edit_image("image=photo.png", f"prompts={CAPTIONS}", "inversion=nulltext")


def test_edit_image_writes_everything_and_never_overwrites_a_run(tmp_path):
    photo = tmp_path / "photo.png"
    Image.fromarray(halves(48, 40)).save(photo)
    prompts = CAPTIONS[:-1] + ',"a green circle on a black background"]'
    overrides = [
        f"image={photo}",
        f"prompts={prompts}",
        "steps=3",
        "inversion.inner_steps=1",
        "progress=false",
        f"cache_dir={tmp_path / 'cache'}",
        "blend=local",
        "blend.words=[circle]",
        "restore_unedited=true",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "edit_image.py"), *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "run"
    for name in (
        "original.png",
        "vae_reconstruction.png",
        "inversion_reconstruction.png",
        "grid.png",
        "00_a_red_circle_on_a_black_background.png",
        "01_a_blue_circle_on_a_black_background.png",
        "02_a_green_circle_on_a_black_background.png",
    ):
        assert np.asarray(Image.open(out / name)).shape == (32, 32, 3) or name == "grid.png", name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["inversion_seconds"] > 0 and np.isfinite(metrics["psnr_vae_reconstruction"])
    assert np.isfinite(metrics["psnr_inversion_reconstruction"]) and len(metrics["null_text_final_losses"]) == 3
    config = (out / "config.yaml").read_text()
    assert "method: null_text" in config and str(photo) in config and "kind: replace" in config
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    again = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "edit_image.py"), *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr
    assert "previous run's" in again.stderr and "metrics.json" in again.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.suffix != ".log"} == {
        name: data for name, data in before.items() if not name.endswith(".log")
    }


def test_a_home_relative_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    Image.fromarray(halves()).save(tmp_path / "photo.png")
    assert (load_image("~/photo.png", height=40, width=60) == halves()).all()
