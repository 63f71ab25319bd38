"""The sampling loop of Prompt-to-Prompt (Hertz et al. 2022, Algorithm 1), also used for plain text-to-image.

One initial latent x_T, drawn on the CPU from the seed, is shared by every prompt of the batch
(source first, then targets). Each step runs the UNet once on `[uncond × P, cond × P]`, applies
classifier-free guidance (Ho & Salimans 2022) `ε = ε_u + w·(ε_c − ε_u)`, takes a DDIM step and lets an
optional latent callback (LocalBlend) rewrite the result. The loop — never a call counter — tells the
controller which step it is. An optional `on_prediction` hook sees each step's predicted clean latents
(x̂0 of the guided ε): where the image is heading, e.g. when its layout is decided.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from models.attention import AttentionController, attach_controller
from models.ddim import SD_TIMESTEP_OFFSET, ddim_step, ddim_timesteps, eps_and_x0, previous_timestep
from models.errors import UserError
from models.stable_diffusion import StableDiffusion

LATENT_CHANNELS = 4  # SD's VAE latent channels


class StepController(AttentionController, Protocol):
    def begin_step(self, step: int) -> None:
        """Called by the loop before the UNet runs for sampling step `step` (0 = noisiest)."""


LatentCallback = Callable[[int, torch.Tensor], torch.Tensor]  # (step, x_{t-1} of all prompts) -> x_{t-1}
PredictionHook = Callable[[int, torch.Tensor], None]  # (step, predicted x0 of all prompts (P, 4, h, w)); read only


def check_image_size(height: int, width: int, *, multiple: int) -> None:
    """Sizes must be positive multiples of `multiple`; prefer `model.config.check_image_size`, which says why."""
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
            nearest = (
                max(multiple, round(value / multiple) * multiple)
                if isinstance(value, (int, float)) and not isinstance(value, bool)
                else 512
            )
            raise UserError(f"{name}={value!r} is not a positive multiple of {multiple}; try {nearest}")


def initial_latent(
    seed: int, *, height: int, width: int, latent_factor: int = 8, multiple: int | None = None
) -> torch.Tensor:
    """x_T ~ N(0, I) of shape (1, 4, H/f, W/f) from `torch.Generator("cpu").manual_seed(seed)`.

    The convention of the official P2P notebooks and diffusers, so a seed gives the same x_T everywhere.
    `multiple`: the sizes the model takes (default: the VAE factor `latent_factor`).
    """
    check_image_size(height, width, multiple=multiple or latent_factor)
    generator = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn((1, LATENT_CHANNELS, height // latent_factor, width // latent_factor), generator=generator)


@dataclass
class Conditioning:
    """What the UNet is conditioned on, per batch row: the text context and, for SDXL, the vector y."""

    context: torch.Tensor  # (b, context_length, context_dim)
    y: torch.Tensor | None = None  # (b, adm_in_channels): SDXL's pooled text + size embeddings; None for SD 1.x/2.x

    def expand(self, batch: int) -> Conditioning:
        return Conditioning(self.context.expand(batch, -1, -1), None if self.y is None else self.y.expand(batch, -1))

    def with_context(self, context: torch.Tensor) -> Conditioning:
        """The same y with another context (null-text's ∅: the pooled vector stays the empty prompt's)."""
        return Conditioning(context, self.y)


def concat(*parts: Conditioning) -> Conditioning:
    ys = [p.y for p in parts]
    return Conditioning(torch.cat([p.context for p in parts]), None if ys[0] is None else torch.cat(ys))


def condition(model: StableDiffusion, prompts: Sequence[str], *, latent_hw: tuple[int, int]) -> Conditioning:
    """Prompts → the UNet's conditioning for images of `latent_hw` latents (SDXL's y embeds the image size)."""
    text = model.encode_text(list(prompts))
    height, width = (side * model.config.latent_factor for side in latent_hw)
    return Conditioning(text.context, model.added_conditioning(text.pooled, height=height, width=width))


def unet_output(model: StableDiffusion, x: torch.Tensor, t: int, conditioning: Conditioning) -> torch.Tensor:
    """The UNet's ε (or v) for latents `x` at timestep `t`, in float32 (computed in the model's dtype)."""
    y = None if conditioning.y is None else conditioning.y.to(model.dtype)
    return model.unet(
        x.to(model.dtype), torch.tensor(t, device=x.device), conditioning.context.to(model.dtype), y=y
    ).float()


@dataclass
class SamplerSettings:
    steps: int = 50  # DDIM steps
    guidance: float = 7.5  # classifier-free guidance scale w
    eta: float = 0.0  # DDIM stochasticity; 0 = deterministic
    offset: int = SD_TIMESTEP_OFFSET  # timestep offset: 1 → 981 … 1 (SD), 0 → 980 … 0


@torch.no_grad()
def sample(
    model: StableDiffusion,
    prompts: Sequence[str],
    *,
    latent: torch.Tensor,
    settings: SamplerSettings = SamplerSettings(),
    negative_prompt: str = "",
    controller: StepController | None = None,
    latent_callback: LatentCallback | None = None,
    uncond_embeddings: Sequence[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    on_prediction: PredictionHook | None = None,
) -> torch.Tensor:
    """Run the loop; returns the final latents (P, 4, h, w) in float32.

    `latent`: (1, 4, h, w), shared by all prompts. `uncond_embeddings`: one (1, 77, d) embedding per step
    (null-text inversion) replacing the negative prompt's token embeddings (SDXL: its pooled vector stays). `generator` feeds the η > 0 noise, which is
    drawn once per step and shared by all prompts so that edits stay aligned. `on_prediction(step, x0)` gets
    a copy of the step's predicted clean latents (before any latent callback).
    """
    if not prompts:
        raise UserError("sample needs at least one prompt")
    num_prompts = len(prompts)
    device = model.device
    latent_hw = tuple(latent.shape[-2:])
    cond = condition(model, prompts, latent_hw=latent_hw)
    uncond = condition(model, [negative_prompt] * num_prompts, latent_hw=latent_hw)
    timesteps = ddim_timesteps(
        settings.steps, num_train_timesteps=model.config.num_train_timesteps, offset=settings.offset
    )
    if uncond_embeddings is not None and len(uncond_embeddings) != len(timesteps):
        raise UserError(f"{len(uncond_embeddings)} null embeddings given for {len(timesteps)} steps")
    x = latent.to(device=device, dtype=torch.float32).expand(num_prompts, -1, -1, -1).clone()
    with attach_controller(model.unet, controller):
        for step, t in enumerate(tqdm(timesteps, desc="sampling", disable=not progress, leave=False)):
            if controller is not None:
                controller.begin_step(step)
            if uncond_embeddings is not None:
                uncond = uncond.with_context(
                    uncond_embeddings[step].to(device, model.dtype).expand(num_prompts, -1, -1)
                )
            out = unet_output(model, torch.cat([x, x]), t, concat(uncond, cond))
            out_uncond, out_cond = out.chunk(2)
            guided = out_uncond + settings.guidance * (out_cond - out_uncond)
            if on_prediction is not None:
                on_prediction(
                    step, eps_and_x0(guided, x, model.schedule.alpha(t), prediction=model.config.prediction)[1]
                )
            noise = None
            if settings.eta > 0:
                noise = torch.randn((1, *x.shape[1:]), generator=generator).to(device).expand_as(x)
            x = ddim_step(
                guided,
                x,
                t=t,
                t_prev=previous_timestep(
                    t, num_steps=settings.steps, num_train_timesteps=model.config.num_train_timesteps
                ),
                schedule=model.schedule,
                prediction=model.config.prediction,
                eta=settings.eta,
                noise=noise,
            )
            if latent_callback is not None:
                x = latent_callback(step, x)
    return x


@torch.no_grad()
def decode(model: StableDiffusion, latents: torch.Tensor) -> np.ndarray:
    """Scaled latents → uint8 images (P, H, W, 3)."""
    images = model.decode_latents(latents.to(model.device))
    images = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def image_size(model: StableDiffusion, height: int | None, width: int | None) -> tuple[int, int]:
    """None → the model's native size; anything else is kept (and checked later), so height=0 is an error."""
    return (model.config.image_size if height is None else height, model.config.image_size if width is None else width)


def generate(
    model: StableDiffusion,
    prompts: Sequence[str],
    *,
    seed: int,
    height: int | None = None,
    width: int | None = None,
    settings: SamplerSettings | None = None,
    **kwargs,
) -> np.ndarray:
    """Text to image for a batch of prompts that share one seed; uint8 (P, H, W, 3)."""
    height, width = image_size(model, height, width)
    settings = settings or SamplerSettings(guidance=model.config.guidance)
    latent = initial_latent(
        seed, height=height, width=width, latent_factor=model.config.latent_factor, multiple=model.config.size_multiple
    )
    generator = torch.Generator("cpu").manual_seed(int(seed) + 1) if settings.eta > 0 else None
    return decode(model, sample(model, prompts, latent=latent, settings=settings, generator=generator, **kwargs))
