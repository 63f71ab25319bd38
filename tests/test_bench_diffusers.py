"""The bench's side-by-side mode (issue 26) on a tiny SD-1.x-shaped random model: the four schemes run, each in its
own process; the printed ratios are the ratios of the measured numbers; and diffusers' pipeline and our plain
sampling draw the same image from the file (so the same weights and settings are what is being compared)."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("diffusers")

from models.loader import save_checkpoint  # noqa: E402
from models.stable_diffusion import ModelConfig, StableDiffusion  # noqa: E402
from models.text import TextConfig  # noqa: E402
from models.unet import UNetConfig  # noqa: E402
from models.vae import VAEConfig  # noqa: E402
from p2p.experiments.side_by_side import RATIOS, SIDE_BY_SIDE, ratios, report, side_by_side  # noqa: E402
from p2p.pipeline import SamplerSettings  # noqa: E402

MAX_PIXEL_DIFF = 2  # out of 255, as tests/test_parity_pipeline.py
PROMPTS = ["a red circle on a black background", "a blue circle on a black background"]
SIZE = 64


def tiny_sd1_config() -> ModelConfig:
    """SD 1.x's architecture (cross-attention at every attended level, HF-layout CLIP text, VAE factor 8) at toy
    widths: what diffusers' StableDiffusionPipeline can hold."""
    return ModelConfig(
        name="tiny-sd1",
        unet=UNetConfig(
            model_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(1, 2),
            num_heads=2,
            context_dim=32,
        ),
        vae=VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
        text=TextConfig(width=32, heads=2, layers=2, hf_layout=True),
        image_size=SIZE,
    )


def test_side_by_side_runs_four_schemes_and_reports_their_ratios(random_model, tmp_path):
    config = tiny_sd1_config()
    path = save_checkpoint(random_model(lambda: StableDiffusion(config), seed=5), tmp_path / "tiny-sd1.safetensors")
    rounds = side_by_side(
        path,
        config=config,
        prompts=PROMPTS,
        settings=SamplerSettings(steps=2, guidance=7.5),
        height=SIZE,
        width=SIZE,
        threads=1,
        repeats=1,
    )
    assert [run["scheme"] for run in rounds[0]] == list(SIDE_BY_SIDE)
    assert all(run["seconds"] > 0 and run["peak_extra_bytes"] >= 0 for run in rounds[0])
    theirs, ours = rounds[0][0]["images"], rounds[0][1]["images"]  # float in [0, 255]; uint8
    assert ours.shape == theirs.shape == (len(PROMPTS), SIZE, SIZE, 3)
    assert theirs.std() > 0.02 * 255, "degenerate image: the comparison would prove little"
    diff = abs(ours.astype("float64") - theirs).max()
    assert diff <= MAX_PIXEL_DIFF, f"our plain sampling differs from diffusers' by {diff:.2f}/255"

    text = report(rounds, header="tiny")
    print(text)
    printed = {line.split()[0]: line for line in text.splitlines() if re.match(r"\s+\(\d\)/\(\d\)", line)}
    assert len(printed) == len(RATIOS)
    for (numerator, denominator, _), line in zip(RATIOS, printed.values(), strict=True):
        numbers = [float(x) for x in re.findall(r"\d+\.\d+", line)[:6]]  # time min/median/max, memory min/median/max
        time_ratio = ratios(rounds, numerator, denominator, "seconds")[0]
        memory_ratio = ratios(rounds, numerator, denominator, "peak_extra_bytes")[0]
        assert numbers == pytest.approx([time_ratio] * 3 + [memory_ratio] * 3, abs=1e-3), line
    assert f"max pixel difference {diff:.2f}/255" in text
