"""The page's controls → edit settings (p2p/app/requests.py): the kind chosen from the prompts, the forms of
per-word windows and blend words, and every mistake named in one line. No model, no server."""

import pytest
from omegaconf import OmegaConf

from models.errors import UserError
from p2p.app.requests import choose_kind, edit_request
from scripts._common import edit_inputs

SOURCE = "a red circle on a black background"
PAGE = dict(
    source=SOURCE,
    targets="a blue circle on a black background",
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
    steps=25,
    guidance=5.0,
)


@pytest.mark.parametrize(
    "targets, kind, reason",
    [
        (["a blue circle on a black background"], "replace", "swapped: red → blue"),
        (["a red circle on a black background with a square"], "refine", "new words: with, square"),
        ([SOURCE], "reweight", "identical"),
    ],
)
def test_the_kind_follows_the_word_alignment_with_its_reason(targets, kind, reason):
    chosen, why = choose_kind(SOURCE, targets, "auto")
    assert chosen == kind and reason in why


def test_controls_become_the_edit():
    request = edit_request(
        **dict(
            PAGE, windows="blue: 0-0.5\ncircle: 0.2, 0.9", blend="red | blue", reweight_word="blue", reweight_scale=-1.5
        )
    )
    assert request.spec.kind == "replace"
    assert request.spec.cross_replace_steps == {"default_": (0.0, 0.8), "blue": (0.0, 0.5), "circle": (0.2, 0.9)}
    assert request.spec.reweight == {"blue": [-1.5]}
    assert request.blend.words == [["red"], ["blue"]]
    assert (request.settings.steps, request.seed) == (25, 3)


def test_the_download_config_is_what_scripts_edit_reads():
    request = edit_request(
        **dict(PAGE, windows="blue: 0-0.5", blend="circle", reweight_word="blue", reweight_scale=2.0)
    )
    cfg = OmegaConf.create(request.config({"name": "tiny", "checkpoint": None, "guidance": None}))
    prompts, spec, blend = edit_inputs(cfg)
    assert prompts == request.prompts and blend.words == ["circle"]
    assert spec.cross_replace_steps == {"default_": [0.0, 0.8], "blue": [0.0, 0.5]}
    assert spec.reweight == request.spec.reweight


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(targets="  \n"), "no target prompt"),
        (dict(source=""), "source prompt is empty"),
        (dict(reweight_word="cat"), "'cat' is not in any target prompt"),
        (dict(reweight_word="blue", reweight_scale=9), "outside the fader's range"),
        (dict(windows="blue 0.5"), "is not 'word: start-end'"),
        (dict(blend="red | blue | green"), "3 groups for 2 prompts"),
        (dict(steps=0), "steps=0 is out of range"),
        (dict(steps="many"), "steps='many' is not an integer"),
        (dict(kind="swap"), "edit kind 'swap'"),
    ],
)
def test_each_mistake_is_named(change, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("|", r"\|")):
        edit_request(**dict(PAGE, **change))


def test_a_photo_edit_config_is_what_scripts_edit_image_reads():
    from dataclasses import asdict

    from p2p.app.photos import INVERSIONS
    from scripts.edit_image import check_request

    request = edit_request(**PAGE)
    cfg = OmegaConf.create(
        request.config(
            {"name": "tiny", "checkpoint": None, "guidance": None},
            inversion=asdict(INVERSIONS["null_text_fast"]),
            image="/photos/original.png",
        )
    )
    prompts, spec, blend, inversion = check_request(cfg)
    assert prompts == request.prompts and inversion == INVERSIONS["null_text_fast"] and cfg.image.endswith(".png")
