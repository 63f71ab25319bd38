"""Figures and views on inputs the shipped configs never use: long and non-ASCII captions, wrapped titles and
labels, odd tile shapes, multi-token and missing words, overrides of scripts/figure.py (seed, size, tile size),
bad rows that must fail before anything is sampled, and run folders that must not be overwritten."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from p2p import views
from p2p.experiments import figure_canvas, figures  # noqa: E402
from p2p.experiments.figure_canvas import Figure, Tile  # noqa: E402
from scripts import figure as figure_script  # noqa: E402

GRAY = np.full((32, 32, 3), 128, np.uint8)


def compose_figure(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("figure", overrides=overrides)


def caption_strip(tile: Image.Image, image_height: int) -> np.ndarray:
    return np.asarray(tile.convert("L"))[image_height:]


# ----------------------------------------------------------------------------- views: captions and grids


def test_a_long_word_is_broken_instead_of_running_off_the_tile():
    tile = views.captioned(GRAY, "x" * 300)
    strip = caption_strip(tile, tile.width)  # the 32 px image is upscaled to a square of the tile's width
    assert strip[:, 0].min() == 255 and strip[:, -1].min() == 255, "caption text reaches the tile's edges"
    inked_rows = np.flatnonzero((strip < 128).any(axis=1))
    assert inked_rows.size and inked_rows.max() - inked_rows.min() > 30, "300 letters should need several lines"


def test_accented_letters_and_symbols_are_drawn_not_boxes():
    missing = caption_strip(views.captioned(GRAY, "\U0010fffd"), 96)  # a private-use character no font has
    for text in ("ü", "é", "—", "✓"):
        assert not np.array_equal(caption_strip(views.captioned(GRAY, text), 96), missing), f"{text!r} drew as a box"


@pytest.mark.parametrize("shape", [(20, 600), (200, 20), (32, 48)])
def test_non_square_tiles_keep_their_aspect_and_a_readable_caption(shape):
    image = np.zeros((*shape, 3), np.uint8)
    tile = views.captioned(image, "a caption")
    width = max(views.MIN_TILE, shape[1])
    assert tile.width == width
    height = round(shape[0] * width / shape[1])
    strip = caption_strip(tile, height)
    assert (strip < 128).any(), "caption missing"
    assert strip.shape[0] < 40, f"a {shape} tile got a {strip.shape[0]} px caption strip"  # not scaled by the width


def test_grid_of_one_tile_and_of_different_tile_sizes():
    one = views.image_grid(GRAY[None], ["one"])
    assert one.size == views.captioned(GRAY, "one").size
    small, large = views.captioned(GRAY, "small"), views.captioned(GRAY, "large", size=200)
    canvas = views.grid([[small, large], [large]], gap=4)
    assert canvas.size == (small.width + 4 + large.width, 2 * large.height + 4)


def test_grid_inputs_are_named_when_wrong():
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        views.image_grid(np.stack([GRAY, GRAY]), ["only one"])
    with pytest.raises(ValueError, match="at least one row"):
        views.image_grid(np.zeros((0, 32, 32, 3), np.uint8), [])
    with pytest.raises(ValueError, match="tile in every row"):
        views.grid([[views.captioned(GRAY, "a")], []])
    with pytest.raises(ValueError, match="uint8"):
        views.captioned(GRAY.astype(np.float32) / 255, "float")


# ----------------------------------------------------------------------------- views: word maps


def test_word_map_sums_the_tokens_of_a_split_word_and_names_a_missing_word():
    prompt = "a photo of a hovercraft"  # hovercraft → hover, craft (positions 5, 6; start token is 0)
    maps = torch.zeros(16, 2, 2)
    maps[5, 0, 0], maps[6, 1, 1], maps[2, 0, 1] = 1.0, 2.0, 7.0
    assert torch.equal(views.word_map(maps, prompt, "hovercraft"), torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    assert torch.equal(views.word_map(maps, prompt, "photo"), torch.tensor([[0.0, 7.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="'boat' is not in prompt"):
        views.word_map(maps, prompt, "boat")


def test_word_map_tells_two_occurrences_of_a_word_apart_by_index():
    prompt = "a cat and a dog"
    maps = torch.arange(16 * 4, dtype=torch.float32).reshape(16, 2, 2)
    first, second = views.word_map(maps, prompt, 0), views.word_map(maps, prompt, 3)
    assert not torch.equal(first, second)
    assert torch.equal(views.word_map(maps, prompt, "a"), first + second)


# ----------------------------------------------------------------------------- the figure layout


def test_a_long_title_and_label_wrap_and_get_the_room_they_need():
    def rendered(title: str, label: str) -> Image.Image:
        figure = Figure(title)
        figure.add_row(label, [Tile(GRAY, "tile", "tile")])
        return figure.render(tile_size=32)

    short = rendered("Fig.", "row")
    long_title = rendered("Figs. 10-12: real-image editing: inversion, reconstruction, P2P edits, restore " * 2, "row")
    long_label = rendered("Fig.", "a row label long enough to need many lines in the label column " * 3)
    assert long_title.height > short.height  # the title's extra lines are drawn, not covered by the first row
    assert long_label.height > short.height  # the row grows to hold every line of its label
    label_ink = np.flatnonzero((np.asarray(long_label.convert("L"))[:, : figure_canvas.LABEL_WIDTH] < 128).any(axis=1))
    assert label_ink.max() < long_label.height - 1  # and the last line is inside the figure


def test_a_figure_without_rows_is_named():
    with pytest.raises(ValueError, match="no rows"):
        Figure("empty").render(tile_size=32)


# ----------------------------------------------------------------------------- scripts/figure.py


@pytest.fixture
def no_sampling(monkeypatch):
    """Any sampling fails the test: the errors below must come before the model draws anything."""

    def refuse(*args, **kwargs):
        raise AssertionError("sampled before the inputs were checked")

    monkeypatch.setattr(figures, "edit", refuse)


def test_a_bad_last_row_fails_before_the_first_row_is_sampled(no_sampling, tmp_path):
    cfg = compose_figure(
        ["experiment=fig2_content", "steps=2", "+prompt_sets.shapes.rows.1.edit={cross_replace_steps: 1.5}"]
    )
    with pytest.raises(ValueError, match="cross_replace_steps"):
        figure_script.make_figure(cfg, tmp_path / "run")


def test_a_word_missing_from_the_attention_prompt_fails_before_sampling(no_sampling, tmp_path):
    cfg = compose_figure(["experiment=fig4_attention", "steps=2", "prompt_sets.shapes.words_over_steps=[circle,cat]"])
    with pytest.raises(ValueError, match="'cat' is not in prompt"):
        figure_script.make_figure(cfg, tmp_path / "run")


@pytest.mark.parametrize(
    "override, message",
    [
        ("seed=abc", "seed='abc' is not an integer"),
        ("tile_size=0", "tile_size=0"),
        ("height=-32", "height=-32"),
        ("width=abc", "width='abc' is not an integer"),
    ],
)
def test_bad_overrides_are_named(override, message, tmp_path):
    cfg = compose_figure(["experiment=fig2_content", "steps=2", override])
    with pytest.raises(ValueError, match=message):
        figure_script.make_figure(cfg, tmp_path / "run")


def test_a_used_run_folder_is_refused_before_any_work(monkeypatch, tmp_path):
    (tmp_path / "figure.png").write_bytes(b"an earlier run")
    monkeypatch.setattr(figure_script, "load_model", lambda cfg, **options: pytest.fail("loaded the model"))
    with pytest.raises(FileExistsError, match="already holds a figure"):
        figure_script.make_figure(compose_figure(["experiment=fig2_content", "steps=2"]), tmp_path)
    assert (tmp_path / "figure.png").read_bytes() == b"an earlier run"


def test_seed_and_size_overrides_reach_every_tile(tmp_path):
    cfg = compose_figure(
        [
            "experiment=fig9_fader",
            "steps=2",
            "seed=5",
            "height=48",
            "width=64",
            "tile_size=32",
            "prompt_sets.shapes.values=[0,2]",
            "prompt_sets.shapes.rows=[{prompt: a red circle, word: red, seed: 3}]",
        ]
    )
    figure_script.make_figure(cfg, tmp_path)
    manifest = json.loads((tmp_path / "figure.json").read_text())
    assert manifest["settings"]["seed"] == 5 and manifest["settings"]["steps"] == 2
    tiles = [np.asarray(Image.open(tmp_path / t["file"])) for row in manifest["rows"] for t in row["tiles"]]
    assert [t.shape for t in tiles] == [(48, 64, 3)] * 3

    reference = compose_figure(
        [
            "experiment=fig9_fader",
            "steps=2",
            "seed=5",
            "height=48",
            "width=64",
            "tile_size=32",
            "prompt_sets.shapes.values=[0,2]",
            "prompt_sets.shapes.rows=[{prompt: a red circle, word: red}]",
        ]
    )
    figure_script.make_figure(reference, tmp_path / "reference")  # the row's own seed 3 gave way to seed=5
    reference_tile = np.asarray(Image.open(tmp_path / "reference" / manifest["rows"][0]["tiles"][0]["file"]))
    assert np.array_equal(tiles[0], reference_tile)


def test_repeated_words_get_their_own_averaged_maps(tmp_path):
    cfg = compose_figure(["experiment=fig4_attention", "steps=2", "tile_size=32"])
    figure_script.make_figure(cfg, tmp_path)
    row = json.loads((tmp_path / "figure.json").read_text())["rows"][0]["tiles"]
    a_tiles = [np.asarray(Image.open(tmp_path / t["file"])) for t in row if t["caption"] == "a"]
    assert len(a_tiles) == 3  # 'a red circle and a blue square on a black background'
    assert not np.array_equal(a_tiles[0], a_tiles[1])


def test_the_real_image_figure_names_a_missing_photo_before_loading_the_model(monkeypatch, tmp_path):
    monkeypatch.setattr(figure_script, "load_model", lambda cfg, **options: pytest.fail("loaded the model"))
    cfg = compose_figure(["experiment=fig10_12_real", "prompt_set=paper", "check_model=false"])
    with pytest.raises(ValueError, match="needs a photo: pass image=PATH"):
        figure_script.make_figure(cfg, tmp_path)


def test_a_real_photo_is_loaded_at_height_and_width(tmp_path):
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.full((90, 60, 3), 200, np.uint8)).save(photo)
    cfg = compose_figure(
        [
            "experiment=fig10_12_real",
            "steps=2",
            f"image={photo}",
            "height=48",
            "width=32",
            "cache_dir=null",
            "inversion.inner_steps=1",
            "tile_size=32",
            "+prompt_sets.shapes.source=a gray background",
            "prompt_sets.shapes.methods=[ddim]",
            "prompt_sets.shapes.targets=[a white background]",
            "prompt_sets.shapes.blend=null",
        ]
    )
    figure_script.make_figure(cfg, tmp_path / "run")
    assert np.asarray(Image.open(tmp_path / "run" / "photo.png")).shape == (48, 32, 3)
    assert json.loads((tmp_path / "run" / "figure.json").read_text())["settings"]["height"] == 48


@pytest.fixture(scope="module")
def recorded():
    """One prompt sampled for 2 steps on the built-in model, its text attention recorded."""
    from models.loader import load_checkpoint
    from p2p.edit import StoreSpec, edit
    from p2p.pipeline import SamplerSettings

    model = load_checkpoint(REPO / "models" / "weights" / "tiny.safetensors")
    prompt = "a red circle on a hovercraft"
    result = edit(
        model,
        [prompt],
        seed=0,
        store=StoreSpec(max_fraction=1.0),
        progress=False,
        settings=SamplerSettings(steps=2, guidance=model.config.guidance),
    )
    return prompt, result.store


def test_attention_tiles_of_a_split_word_and_wrong_inputs(recorded):
    prompt, store = recorded
    tiles = views.cross_attention_tiles(store, prompt, 0)
    assert len(tiles) == len(views.decode_tokens(prompt)) + 2  # hovercraft's two tokens each get a tile
    maps = views.token_maps(store, 0)
    assert torch.allclose(views.word_map(maps, prompt, "hovercraft"), maps[6] + maps[7])  # hover, craft
    with pytest.raises(ValueError, match="'boat' is not in prompt"):
        views.word_map(maps, prompt, "boat")
    with pytest.raises(ValueError, match="prompt_index=1 is out of range"):
        views.token_maps(store, 1)
    with pytest.raises(ValueError, match="text positions; pass the prompt the store recorded"):
        views.cross_attention_tiles(
            store, "a red circle and a blue square and a green triangle on a white background", 0
        )


def test_a_prompt_set_missing_a_builder_argument_is_named(no_sampling, tmp_path):
    cfg = compose_figure(["experiment=fig6_injection_steps", "steps=2", "~prompt_sets.shapes.fractions"])
    with pytest.raises(ValueError, match=r"'injection_sweep' needs \['fractions'\]"):
        figure_script.make_figure(cfg, tmp_path / "run")


@pytest.mark.parametrize("tile_size", [48, 128])
def test_tiles_are_drawn_at_tile_size(tile_size):
    figure = Figure("t")
    figure.add_row("row", [Tile(GRAY, "one", "one"), Tile(np.zeros((16, 32, 3), np.uint8), "two", "two")])
    rendered = figure.render(tile_size=tile_size)
    assert rendered.width == figure_canvas.LABEL_WIDTH + 2 * tile_size + figure_canvas.GAP


def test_heat_names_a_map_with_nan():
    import torch

    from p2p import views

    with pytest.raises(ValueError, match="holds NaN or inf"):
        views.heat(torch.tensor([[0.5, float("nan")], [0.1, 0.2]]))
    assert views.heat(torch.tensor([[0.5, 1.0], [0.1, 0.2]])).shape == (96, 96, 3)
