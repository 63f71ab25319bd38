"""Rectified-flow sampling as SD3 / SD3.5 and FLUX.1 use it: σ schedules with their shifts, and the Euler step.

Every function is pure. Convention (diffusers, Esser et al. 2024 §2): `x_σ = (1 − σ)·x0 + σ·ε` for σ from 1
(noise) to 0 (data); the model predicts the velocity `v ≈ ε − x0`; one Euler step to σ_next is
`x ← x + (σ_next − σ)·v`. SD3's transformer takes `timesteps = 1000·σ`, FLUX's takes σ itself.

Schedules reproduce diffusers' `FlowMatchEulerDiscreteScheduler.set_timesteps` as the pipelines call it,
quirks included, so seeds and step counts carry over:
- SD3/SD3.5 (`shift=3`): N values evenly spaced from σ_max = 1 to σ_min = shift(1/1000) (the smallest training
  σ, already shifted), then shifted again: σ' = s·σ / (1 + (s − 1)·σ) (Esser et al. 2024, Eq. 23).
- FLUX-dev: `linspace(1, 1/N, N)`, shifted by resolution: σ' = e^μ / (e^μ + 1/σ − 1), μ linear in the number
  of image tokens from 0.5 at 256 to 1.15 at 4096 (diffusers `calculate_shift`). FLUX-schnell: no shift.
A final σ = 0 is appended: `sigmas` has N + 1 entries, step i goes from sigmas[i] to sigmas[i + 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from models.errors import UserError

NUM_TRAIN_TIMESTEPS = 1000  # σ = t / 1000 for the training timesteps t = 1 … 1000
SD3_SHIFT = 3.0  # SD3 / SD3.5 scheduler configs (`shift`), chosen for 1024² in Esser et al. 2024 §5.3.2
# FLUX-dev's resolution-dependent shift (scheduler config of black-forest-labs/FLUX.1-dev)
FLUX_BASE_SEQ_LEN, FLUX_MAX_SEQ_LEN = 256, 4096  # image tokens (packed 2×2) at 256² and 1024²
FLUX_BASE_SHIFT, FLUX_MAX_SHIFT = 0.5, 1.15  # μ at those lengths


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Static shift σ' = s·σ / (1 + (s − 1)·σ): more steps at high noise for s > 1."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """Exponential (resolution) shift σ' = e^μ / (e^μ + 1/σ − 1) (diffusers `_time_shift_exponential`, exponent 1)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def flux_mu(
    image_seq_len: int,
    *,
    base_seq_len: int = FLUX_BASE_SEQ_LEN,
    max_seq_len: int = FLUX_MAX_SEQ_LEN,
    base_shift: float = FLUX_BASE_SHIFT,
    max_shift: float = FLUX_MAX_SHIFT,
) -> float:
    """μ for `image_seq_len` packed image tokens: the line through (256, 0.5) and (4096, 1.15), extrapolated."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def _check_steps(num_steps) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise UserError(f"steps={num_steps!r} must be a positive integer")


def sd3_sigmas(num_steps: int, *, shift: float = SD3_SHIFT) -> torch.Tensor:
    """(N + 1,) float32 σ's of the SD3 pipelines, the last one 0."""
    _check_steps(num_steps)
    train_sigmas = torch.arange(NUM_TRAIN_TIMESTEPS, 0, -1, dtype=torch.float32) / NUM_TRAIN_TIMESTEPS
    train_sigmas = shift_sigmas(train_sigmas, shift)  # float32, as the scheduler builds them
    sigma_max, sigma_min = train_sigmas[0].item(), train_sigmas[-1].item()
    sigmas = (
        torch.linspace(sigma_max * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, num_steps, dtype=torch.float64)
        / NUM_TRAIN_TIMESTEPS
    )
    return torch.cat([shift_sigmas(sigmas, shift).float(), torch.zeros(1)])


def flux_sigmas(num_steps: int, *, image_seq_len: int | None = None) -> torch.Tensor:
    """(N + 1,) float32 σ's of the FLUX pipelines: resolution-shifted for dev (give `image_seq_len`, the number of
    packed image tokens, (H/16)·(W/16)), unshifted for schnell (`image_seq_len=None`)."""
    _check_steps(num_steps)
    sigmas = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64).float()
    if image_seq_len is not None:
        sigmas = time_shift(sigmas, flux_mu(image_seq_len))
    return torch.cat([sigmas.float(), torch.zeros(1)])


def sd3_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """What SD3's transformer is given at each step: 1000·σ (without the final 0)."""
    return sigmas[:-1] * NUM_TRAIN_TIMESTEPS


def noise_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε: the straight path between data and noise."""
    return (1.0 - sigma) * x0 + sigma * noise


def x0_from_velocity(x: torch.Tensor, velocity: torch.Tensor, sigma: float) -> torch.Tensor:
    """The clean latent the velocity points to: x0 = x_σ − σ·v."""
    return x - sigma * velocity


def euler_step(x: torch.Tensor, velocity: torch.Tensor, *, sigma: float, sigma_next: float) -> torch.Tensor:
    """x_{σ_next} = x_σ + (σ_next − σ)·v, in float32 and returned in the velocity's dtype (as diffusers)."""
    return (x.float() + (sigma_next - sigma) * velocity.float()).to(velocity.dtype)


def sample_euler(
    velocity_fn: Callable[[torch.Tensor, int, float], torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor
) -> torch.Tensor:
    """Integrate from sigmas[0] to sigmas[-1]; `velocity_fn(x, step, sigma)` is the (guided) model."""
    for step in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[step]), float(sigmas[step + 1])
        x = euler_step(x, velocity_fn(x, step, sigma), sigma=sigma, sigma_next=sigma_next)
    return x
