"""The rectified-flow schedules and Euler step equal diffusers' `FlowMatchEulerDiscreteScheduler` as the SD3 and
FLUX pipelines configure and call it (static shift 3; FLUX-dev's resolution shift; schnell unshifted)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from models.flow import (
    SD3_SHIFT,
    euler_step,
    flux_mu,
    flux_sigmas,
    noise_latents,
    sample_euler,
    sd3_sigmas,
    sd3_timesteps,
    shift_sigmas,
    x0_from_velocity,
)

STEPS = [1, 4, 28, 50]


@pytest.mark.parametrize("num_steps", STEPS)
def test_sd3_schedule_equals_diffusers(num_steps):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=SD3_SHIFT)  # stabilityai/stable-diffusion-3-medium-diffusers
    scheduler.set_timesteps(num_steps)
    sigmas = sd3_sigmas(num_steps)
    assert torch.allclose(sigmas, scheduler.sigmas, rtol=1e-6, atol=0)
    assert torch.allclose(sd3_timesteps(sigmas), scheduler.timesteps, rtol=1e-6, atol=0)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096, 100])
def test_flux_dev_schedule_equals_diffusers(num_steps, image_seq_len):
    scheduler = FlowMatchEulerDiscreteScheduler(  # black-forest-labs/FLUX.1-dev scheduler_config.json
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    mu = calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
    assert flux_mu(image_seq_len) == pytest.approx(mu, abs=1e-12)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)  # as FluxPipeline does
    assert torch.allclose(flux_sigmas(num_steps, image_seq_len=image_seq_len), scheduler.sigmas, rtol=1e-6, atol=0)


def test_flux_mu_endpoints():
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)


@pytest.mark.parametrize("num_steps", [1, 4])
def test_flux_schnell_schedule_equals_diffusers(num_steps):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # FLUX.1-schnell: no shift
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=None)
    assert torch.allclose(flux_sigmas(num_steps), scheduler.sigmas, rtol=1e-6, atol=0)


def test_euler_steps_equal_diffusers():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=SD3_SHIFT)
    scheduler.set_timesteps(5)
    sigmas = sd3_sigmas(5)
    generator = torch.Generator().manual_seed(0)
    start = x = expected = torch.randn(1, 16, 4, 4, generator=generator)
    velocities = torch.randn(5, 1, 16, 4, 4, generator=generator)
    for i, t in enumerate(scheduler.timesteps):
        expected = scheduler.step(velocities[i], t, expected).prev_sample
        x = euler_step(x, velocities[i], sigma=float(sigmas[i]), sigma_next=float(sigmas[i + 1]))
    assert torch.allclose(x, expected, atol=1e-6)
    looped = sample_euler(lambda latents, step, sigma: velocities[step], start, sigmas)
    assert torch.allclose(looped, expected, atol=1e-6)


def test_the_straight_path_is_followed_exactly():
    """With the true velocity ε − x0, one Euler step from any σ lands on the path: x0 and ε are recovered."""
    generator = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 16, 4, 4, generator=generator), torch.randn(2, 16, 4, 4, generator=generator)
    x = noise_latents(x0, noise, 0.7)
    assert torch.allclose(noise_latents(x0, noise, 0.0), x0) and torch.allclose(noise_latents(x0, noise, 1.0), noise)
    assert torch.allclose(
        euler_step(x, noise - x0, sigma=0.7, sigma_next=0.2), noise_latents(x0, noise, 0.2), atol=1e-6
    )
    assert torch.allclose(x0_from_velocity(x, noise - x0, 0.7), x0, atol=1e-6)


def test_shift_keeps_the_ends_and_moves_the_middle_up():
    sigmas = torch.tensor([0.0, 0.5, 1.0])
    assert shift_sigmas(sigmas, 3.0).tolist() == [0.0, 0.75, 1.0]


def test_bad_step_counts_are_refused():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="steps="):
            sd3_sigmas(bad)


def test_sd3_denoising_loop_with_guidance_equals_diffusers(randomize):
    """Our tiny MM-DiT + our σ's + Euler + classifier-free guidance == diffusers' transformer + scheduler, as
    StableDiffusion3Pipeline's loop runs them (batch [uncond; cond], timestep expanded, guidance 7)."""
    from test_mmdit_sd3 import random_mmdit, reference_from_ours, tiny

    config, guidance, steps = tiny(), 7.0, 4
    ours = random_mmdit(config, randomize, seed=7)
    reference = reference_from_ours(ours)
    g = torch.Generator().manual_seed(0)
    start = torch.randn(1, 16, 8, 8, generator=g)
    context, pooled = (
        torch.randn(2, 12, config.context_dim, generator=g),
        torch.randn(2, config.pooled_dim, generator=g),
    )

    scheduler = FlowMatchEulerDiscreteScheduler(shift=SD3_SHIFT)
    scheduler.set_timesteps(steps)
    expected = start
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = reference(
                hidden_states=torch.cat([expected] * 2),
                timestep=t.expand(2),
                encoder_hidden_states=context,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
            v_uncond, v_cond = v.chunk(2)
            expected = scheduler.step(v_uncond + guidance * (v_cond - v_uncond), t, expected).prev_sample

        def velocity(x, step, sigma):
            v_uncond, v_cond = ours(
                torch.cat([x] * 2), timesteps=torch.full((2,), sigma * 1000), context=context, pooled=pooled
            ).chunk(2)
            return v_uncond + guidance * (v_cond - v_uncond)

        actual = sample_euler(velocity, start, sd3_sigmas(steps))
    assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max()
