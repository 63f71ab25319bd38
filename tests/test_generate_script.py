"""scripts/generate.py as a user runs it: files, config, the same pixels as `p2p.pipeline.generate`, clear errors.

Runs on a random-weight checkpoint of the tiny architecture written to a temporary folder, 2 DDIM steps.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from models.loader import load_checkpoint, save_checkpoint
from models.stable_diffusion import StableDiffusion, preset
from p2p.pipeline import SamplerSettings, generate

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle on a black background", "a blue square on a white background"]
SEED, STEPS = 3, 2


@pytest.fixture(scope="module")
def tiny_checkpoint(random_model, tmp_path_factory) -> Path:
    model = random_model(lambda: StableDiffusion(preset("tiny")), seed=9)
    return save_checkpoint(model, tmp_path_factory.mktemp("weights") / "tiny-random.safetensors")


def run_script(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "generate.py"), *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
        # one thread, as the in-process comparison runs (conftest): on some CPUs (measured on an AMD
        # EPYC) a second thread changes the last bit of a reduction and so one pixel by one level
        env={**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"},
    )


def test_generate_writes_images_and_config(tiny_checkpoint, tmp_path):
    run = tmp_path / "run"
    result = run_script(
        f"model.checkpoint={tiny_checkpoint}",
        f"prompts={PROMPTS!r}".replace("'", '"'),
        f"seed={SEED}",
        f"steps={STEPS}",
        "progress=false",
        f"hydra.run.dir={run}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert str(run) in result.stdout  # the script says where the files are

    names = ["00_a_red_circle_on_a_black_background.png", "01_a_blue_square_on_a_white_background.png"]
    assert sorted(p.name for p in run.glob("*.png")) == names
    config = OmegaConf.load(run / "config.yaml")
    assert list(config.prompts) == PROMPTS and config.seed == SEED and config.steps == STEPS
    assert config.model.name == "tiny" and config.model.checkpoint == str(tiny_checkpoint)

    model = load_checkpoint(tiny_checkpoint)
    expected = generate(
        model, PROMPTS, seed=SEED, settings=SamplerSettings(steps=STEPS, guidance=model.config.guidance), progress=False
    )
    for name, image in zip(names, expected):
        saved = np.asarray(Image.open(run / name))
        assert saved.shape == (32, 32, 3)  # the tiny model's native size when height/width are null
        assert np.array_equal(saved, image), name

    # the same run folder again: nothing is overwritten
    again = run_script(
        f"model.checkpoint={tiny_checkpoint}",
        f"steps={STEPS}",
        "progress=false",
        f"hydra.run.dir={run}",
        f"prompts={PROMPTS[:1]!r}".replace("'", '"'),
    )
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr


def test_bad_size_is_named(tiny_checkpoint, tmp_path):
    result = run_script(
        f"model.checkpoint={tiny_checkpoint}", "height=30", f"steps={STEPS}", f"hydra.run.dir={tmp_path / 'run'}"
    )
    assert result.returncode != 0
    assert "height=30 is not a positive multiple of 4" in result.stderr
    assert not list((tmp_path / "run").glob("*.png"))


def compose_generate(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="generate", overrides=list(overrides))


def test_sd_preset_needs_a_checkpoint():
    sys.path.insert(0, str(REPO))
    from scripts._common import load_model

    with pytest.raises(ValueError, match="pass model.checkpoint=PATH"):
        load_model(compose_generate("model=sd15"))


def test_missing_builtin_weights_say_how_to_make_them(monkeypatch, tmp_path):
    sys.path.insert(0, str(REPO))
    from scripts import _common

    monkeypatch.setattr(_common, "TINY_WEIGHTS", tmp_path / "tiny.safetensors")
    with pytest.raises(FileNotFoundError, match="python scripts/train_tiny.py"):
        _common.load_model(compose_generate())


@pytest.mark.parametrize(
    "override, message",
    [
        ("prompts=a red circle", "prompts must be a list of strings, got 'a red circle'"),  # not one prompt per letter
        ("prompts=[]", "prompts needs at least 1 prompt, got 0"),
        ("prompts=[1,2]", "prompts must be a list of strings; [1, 2] are not strings"),
    ],
)
def test_bad_prompts_are_named(override, message):
    sys.path.insert(0, str(REPO))
    from scripts._common import prompt_list

    with pytest.raises(ValueError) as err:
        prompt_list(compose_generate(override).prompts)
    assert message in str(err.value)


def test_prompt_list_minimum_and_unconditional_prompt():
    sys.path.insert(0, str(REPO))
    from scripts._common import prompt_list

    assert prompt_list(compose_generate('prompts=["", "a red circle"]').prompts) == ["", "a red circle"]
    with pytest.raises(ValueError, match=r"needs at least 2 prompts, got 1 \(\['a red circle'\]\)"):
        prompt_list(["a red circle"], minimum=2)


@pytest.mark.parametrize(
    "device, message",
    [
        ("gpu", "device 'gpu' is not a torch device"),
        pytest.param(
            "cuda",
            "sees no CUDA GPU",
            marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU"),
        ),
    ],
)
def test_bad_device_is_named_before_reading_the_checkpoint(tiny_checkpoint, device, message):
    with pytest.raises(ValueError, match=message):
        load_checkpoint(tiny_checkpoint, device=device)


@pytest.mark.parametrize(
    "override, message",
    [
        ("steps=abc", "steps='abc' is not an integer"),
        ("steps=2.5", "steps=2.5 is not an integer"),
        ("guidance=x", "guidance='x' is not a number"),
    ],
)
def test_non_numbers_are_named(override, message):
    sys.path.insert(0, str(REPO))
    from scripts._common import sampler_settings

    model = StableDiffusion(preset("tiny"))
    with pytest.raises(ValueError) as err:
        sampler_settings(compose_generate(override), model)
    assert message in str(err.value)


def check_request(*overrides: str, config=None):
    sys.path.insert(0, str(REPO))
    from scripts.generate import check_request as check

    return check(compose_generate(*overrides), config or preset("sd15"))


def test_request_defaults_and_null_negative_prompt():
    request = check_request("model=sd15", "negative_prompt=null", 'prompts=["a cat", ""]')
    assert request == dict(prompts=["a cat", ""], negative_prompt="", height=512, width=512)
    assert check_request("height=64", "width=96") == dict(
        prompts=["a red circle on a black background"], negative_prompt="", height=64, width=96
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("height=0", "height=0 is not a positive multiple of 8"),  # used to fall back to the native size silently
        ("width=100", "width=100 is not a positive multiple of 8 (the VAE's downsampling factor); try 96"),
        (
            "negative_prompt=[ugly,blurry]",
            "negative_prompt must be one string (used with every prompt), got ['ugly', 'blurry']",
        ),
        ("steps=0", "steps=0 is out of range"),
        (f'prompts=["{"cat " * 76}"]', "has 76 tokens; at most 75 fit"),
        (f'negative_prompt="{"cat " * 76}"', "has 76 tokens; at most 75 fit"),
    ],
)
def test_bad_requests_are_named(override, message):
    with pytest.raises(ValueError) as err:
        check_request(override)
    assert message in str(err.value)


def test_prompt_length_follows_the_models_text_context():
    """The built-in model reads 16 text positions (its file's config), so 15 tokens already do not fit."""
    config = preset("tiny")
    config.text.context_length = 16
    with pytest.raises(ValueError, match="has 15 tokens; at most 14 fit"):
        check_request(f'prompts=["{"cat " * 15}"]', config=config)


def test_sd_size_is_checked_before_the_checkpoint_is_read(tmp_path):
    result = run_script(
        "model=sd15",
        f"model.checkpoint={tmp_path / 'not-read.safetensors'}",
        "height=500",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode != 0 and "height=500 is not a positive multiple of 8" in result.stderr


def test_library_size_zero_is_an_error_not_the_native_size():
    from p2p.edit import edit

    model = StableDiffusion(preset("tiny"))
    with pytest.raises(ValueError, match="height=0 is not a positive multiple"):
        generate(model, ["a red circle"], seed=0, height=0)
    with pytest.raises(ValueError, match="width=0 is not a positive multiple"):
        edit(model, ["a red circle"], seed=0, width=0)
