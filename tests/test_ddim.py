"""models/ddim.py against diffusers' DDIMScheduler as SD pipelines configure it, for step counts that divide 1000
and ones that do not, 1 and 999 steps, both offsets, η = 0 and η > 0, ε and v; the inverse step; seeded η > 0."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from models.ddim import (
    SD_BETA_END,
    SD_BETA_START,
    ddim_inverse_step,
    ddim_step,
    ddim_timesteps,
    previous_timestep,
    scaled_linear_schedule,
)
from models.stable_diffusion import StableDiffusion, preset
from p2p.pipeline import SamplerSettings, generate

STEP_COUNTS = [1, 2, 3, 7, 50, 333, 501, 999]


def diffusers_ddim(*, offset: int, prediction: str = "epsilon") -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=SD_BETA_START,
        beta_end=SD_BETA_END,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=offset,
        prediction_type={"epsilon": "epsilon", "v": "v_prediction"}[prediction],
    )


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_timesteps_equal_diffusers(steps, offset):
    scheduler = diffusers_ddim(offset=offset)
    scheduler.set_timesteps(steps)
    assert ddim_timesteps(steps, offset=offset) == scheduler.timesteps.tolist()


def test_a_thousand_steps():
    assert ddim_timesteps(1000, offset=0) == list(range(999, -1, -1))
    with pytest.raises(
        ValueError,
        match=r"would start at timestep 1000, past the schedule's last \(999\); "
        r"use at most 999 steps or offset 0",
    ):
        ddim_timesteps(1000, offset=1)  # diffusers returns 1000 here, and then fails indexing ᾱ


@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5, True, "50"])
def test_steps_out_of_range_are_named(steps):
    with pytest.raises(ValueError, match=rf"steps={steps!r} is out of range; use an integer in 1…1000"):
        ddim_timesteps(steps)


def test_offset_out_of_range_is_named():
    with pytest.raises(ValueError, match=r"timestep offset 21 must be in \[0, 20\] for 50 steps"):
        ddim_timesteps(50, offset=21)
    with pytest.raises(ValueError, match=r"timestep offset -1 must be in"):
        ddim_timesteps(50, offset=-1)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("steps, offset", [(1, 1), (3, 1), (7, 0), (999, 1)])
def test_steps_equal_diffusers(steps, offset, eta, prediction):
    """Five steps of a random 'model output', the same noise on both sides: x_t follows diffusers' to ≤ 1e-5
    (diffusers keeps ᾱ in float32, ours in float64)."""
    scheduler = diffusers_ddim(offset=offset, prediction=prediction)
    scheduler.set_timesteps(steps)
    schedule, generator = scaled_linear_schedule(), torch.Generator().manual_seed(steps)
    ours = theirs = torch.randn(1, 4, 4, 4, generator=generator, dtype=torch.float64)
    timesteps = ddim_timesteps(steps, offset=offset)[:5]
    for t in timesteps:
        output, noise = torch.randn(2, 1, 4, 4, 4, generator=generator, dtype=torch.float64)
        theirs = scheduler.step(output, t, theirs, eta=eta, variance_noise=noise).prev_sample
        ours = ddim_step(
            output,
            ours,
            t=t,
            t_prev=previous_timestep(t, num_steps=steps),
            schedule=schedule,
            prediction=prediction,
            eta=eta,
            noise=noise,
        )
        assert (ours - theirs).abs().max() <= 1e-5, t


@pytest.mark.parametrize("steps", [1, 3, 50, 999])
def test_inverse_step_undoes_a_step_for_the_same_epsilon(steps):
    schedule, generator = scaled_linear_schedule(), torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 1, 4, 8, 8, generator=generator, dtype=torch.float64)
    for t in ddim_timesteps(steps)[:3]:
        t_prev = previous_timestep(t, num_steps=steps)
        x_prev = ddim_step(eps, x, t=t, t_prev=t_prev, schedule=schedule)
        torch.testing.assert_close(ddim_inverse_step(eps, x_prev, t_prev=t_prev, t=t, schedule=schedule), x)


def test_stochastic_sampling_is_reproducible_by_seed(random_model):
    model = random_model(lambda: StableDiffusion(preset("tiny")), seed=2)
    run = lambda seed, eta: generate(
        model, ["a red circle"], seed=seed, settings=SamplerSettings(steps=3, guidance=5.0, eta=eta), progress=False
    )
    first = run(4, 1.0)
    assert (first == run(4, 1.0)).all()
    assert not (first == run(5, 1.0)).all() and not (first == run(4, 0.0)).all()
