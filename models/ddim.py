"""DDIM (Song et al. 2021) as Stable Diffusion uses it: the noise schedule, timesteps, and plain step functions.

Every function is pure: it takes the model output and the current latent and returns the next latent.
Notation: `a_t` = ᾱ_t (alphas_cumprod[t]); ε-prediction `x_t = sqrt(a_t)·x0 + sqrt(1−a_t)·ε`;
v-prediction (Salimans & Ho 2022, §4) `v = sqrt(a_t)·ε − sqrt(1−a_t)·x0`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.errors import UserError

SD_BETA_START = 0.00085  # SD's "scaled_linear" schedule (LDM configs: linear_start)
SD_BETA_END = 0.012  # (linear_end)
NUM_TRAIN_TIMESTEPS = 1000
# DDIM "leading" timesteps with +1: 981, 961, …, 1 for 50 steps, as the original LDM sampler and
# every diffusers SD pipeline (`steps_offset=1`) do. 0 gives 980, …, 0 (the null-text notebook).
SD_TIMESTEP_OFFSET = 1
PREDICTIONS = ("epsilon", "v")


@dataclass(frozen=True)
class Schedule:
    """ᾱ over the training timesteps, and ᾱ used after the last step (SD: ᾱ_0, `set_alpha_to_one=False`)."""

    alphas_cumprod: torch.Tensor  # (num_train_timesteps,) float64

    @property
    def final_alpha_cumprod(self) -> float:
        return float(self.alphas_cumprod[0])  # 0.99915 for SD, not 1

    def alpha(self, t: int) -> float:
        """ᾱ_t; negative t (the step after the last) gives the final ᾱ."""
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha_cumprod


def scaled_linear_schedule(
    *, beta_start: float = SD_BETA_START, beta_end: float = SD_BETA_END, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> Schedule:
    """betas = linspace(sqrt(β_start), sqrt(β_end), T)², ᾱ = cumprod(1 − β)  (LDM `make_beta_schedule`)."""
    betas = (
        torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64, device="cpu") ** 2
    )  # on the CPU even while a model is being built on "meta"
    return Schedule(torch.cumprod(1.0 - betas, dim=0))


def ddim_timesteps(
    num_steps: int, *, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, offset: int = SD_TIMESTEP_OFFSET
) -> list[int]:
    """Descending sampling timesteps, evenly spaced ("leading"): [(n−1)·k + offset, …, offset], k = T // n.

    As diffusers' DDIMScheduler (`timestep_spacing="leading"`, `steps_offset`): with offset 1, 2…999 steps
    all work (999 steps: 999, 998, …, 1) and 1000 steps would need timestep 1000, which does not exist.
    The offset may equal the stride (the last step then goes to ᾱ_0, the same ᾱ as "after the last step").
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= num_train_timesteps:
        raise UserError(f"steps={num_steps!r} is out of range; use an integer in 1…{num_train_timesteps}")
    stride = num_train_timesteps // num_steps
    if not 0 <= offset <= stride:
        raise UserError(f"timestep offset {offset} must be in [0, {stride}] for {num_steps} steps")
    first = (num_steps - 1) * stride + offset
    if first >= num_train_timesteps:
        raise UserError(
            f"steps={num_steps} with timestep offset {offset} would start at timestep {first}, past the "
            f"schedule's last ({num_train_timesteps - 1}); use at most {num_train_timesteps - offset} "
            "steps or offset 0"
        )
    return [i * stride + offset for i in reversed(range(num_steps))]


def previous_timestep(t: int, *, num_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> int:
    """The timestep after `t` in the sampling order (negative after the last one)."""
    return t - num_train_timesteps // num_steps


def eps_and_x0(
    model_output: torch.Tensor, x_t: torch.Tensor, alpha_t: float, *, prediction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε, x0) from the model output, for ε- or v-prediction."""
    a, s = alpha_t**0.5, (1.0 - alpha_t) ** 0.5
    if prediction == "epsilon":
        eps = model_output
        return eps, (x_t - s * eps) / a
    if prediction == "v":
        return a * model_output + s * x_t, a * x_t - s * model_output
    raise UserError(f"prediction {prediction!r} is not supported; use one of {PREDICTIONS}")


def ddim_step(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    *,
    t: int,
    t_prev: int,
    schedule: Schedule,
    prediction: str = "epsilon",
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """x_t → x_{t_prev}, DDIM Eq. 12: sqrt(a_prev)·x0 + sqrt(1 − a_prev − σ²)·ε + σ·z.

    σ = η·sqrt((1 − a_prev)/(1 − a_t))·sqrt(1 − a_t/a_prev) (Eq. 16); η = 0 is deterministic DDIM, η = 1 DDPM-like.
    `noise` (same shape as x_t) is required when η > 0 so that randomness stays explicit and seedable.
    """
    alpha_t, alpha_prev = schedule.alpha(t), schedule.alpha(t_prev)
    eps, x0 = eps_and_x0(model_output, x_t, alpha_t, prediction=prediction)
    if eta < 0:
        raise UserError(f"eta={eta} must be ≥ 0")
    sigma = eta * ((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)) ** 0.5
    x_prev = alpha_prev**0.5 * x0 + (1 - alpha_prev - sigma**2) ** 0.5 * eps
    if sigma > 0:
        if noise is None:
            raise UserError("ddim_step with eta > 0 needs `noise` (draw it from a seeded generator)")
        x_prev = x_prev + sigma * noise
    return x_prev


def ddim_inverse_step(
    model_output: torch.Tensor,
    x_prev: torch.Tensor,
    *,
    t_prev: int,
    t: int,
    schedule: Schedule,
    prediction: str = "epsilon",
) -> torch.Tensor:
    """x_{t_prev} → x_t (t > t_prev), the inversion step (P2P_SPEC §7; Mokady et al. 2023, Eq. 3).

    x0 = (x − sqrt(1 − a_prev)·ε)/sqrt(a_prev),  x_t = sqrt(a_t)·x0 + sqrt(1 − a_t)·ε,
    with ε evaluated at `t` on the current latent (the usual approximation ε(x_t, t) ≈ ε(x_{t_prev}, t)).
    For v-prediction ε comes from v with ᾱ_t, the level the model was told (diffusers' DDIMInverseScheduler
    converts with the sample's own level ᾱ_{t_prev} instead; the two agree for ε-prediction, and neither is
    exact, since the model never sees x_t).
    """
    alpha_prev, alpha_t = schedule.alpha(t_prev), schedule.alpha(t)
    eps, _ = eps_and_x0(model_output, x_prev, alpha_t, prediction=prediction)
    x0 = (x_prev - (1 - alpha_prev) ** 0.5 * eps) / alpha_prev**0.5
    return alpha_t**0.5 * x0 + (1 - alpha_t) ** 0.5 * eps


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Forward process q(x_t | x0) for training: sqrt(a_t)·x0 + sqrt(1 − a_t)·ε, t of shape (b,)."""
    a = schedule.alphas_cumprod.to(x0.device)[t].to(x0.dtype).view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def v_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """The v-prediction training target sqrt(a_t)·ε − sqrt(1 − a_t)·x0."""
    a = schedule.alphas_cumprod.to(x0.device)[t].to(x0.dtype).view(-1, 1, 1, 1)
    return a.sqrt() * noise - (1 - a).sqrt() * x0
