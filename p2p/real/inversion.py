"""Real images: DDIM inversion, null-text inversion, negative-prompt inversion (P2P_SPEC §7).

- DDIM inversion (Song et al. 2021; Dhariwal & Nichol 2021, App. F): run the deterministic sampler
  backwards from the image latent z_0 to z_T, keeping every latent of the trajectory.
- Null-text inversion (Mokady et al. 2023, Algorithm 1): per step i, optimise the unconditional
  embedding ∅_i so that the guided DDIM step from the current latent lands on the inversion
  trajectory's next latent; the UNet stays frozen (no weight gradients).
- Negative-prompt inversion (Miyake et al. 2023, arXiv 2305.16807): ∅_i = the source prompt's
  conditional embedding, no optimisation.
- Direct Inversion (Ju et al. 2023, "PnP Inversion", §4 / Algorithm 1): no optimisation either; the DDIM
  trajectory is kept and, while editing, the source branch is put back on it after every step
  (`source_on_trajectory`), so the source reconstructs exactly and the targets' attention comes from it.
Editing then samples from z_T with ∅_i as the unconditional embedding at step i for every prompt.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from models.ddim import ddim_inverse_step, ddim_step, ddim_timesteps, previous_timestep
from models.errors import UserError, WrongTypeError
from models.stable_diffusion import StableDiffusion
from p2p.pipeline import Conditioning, SamplerSettings, concat, condition, decode, unet_output

log = logging.getLogger(__name__)

INVERSION_METHODS = ("ddim", "null_text", "negative_prompt", "direct")
TRAJECTORY_METHODS = ("direct",)  # methods whose editing puts the source branch back on the inversion trajectory
NULL_TEXT_INITS = ("empty", "negative_prompt")  # ∅_0 before optimisation: the "" embedding (spec) or the caption's
NULL_TEXT_LR = 1e-2  # Adam learning rate at step 0, decayed linearly: lr_i = 1e-2·(1 − i/100)
NULL_TEXT_INNER_STEPS = 10  # Adam steps per sampling step, at most
NULL_TEXT_EPSILON = 1e-5  # early stop when loss < ε + i·2e-5 (the reference's per-step tolerance)
NULL_TEXT_EPSILON_SLOPE = 2e-5
# Null-text started from the caption's embedding and stopped at a tenth of the reference's tolerance: on the
# built-in model the reference's PSNR in a tenth of the paper's Adam steps, though its edits keep less of the
# background (`conf/inversion/null_text_fast`; docs/tiny-model-history.md, "Real images on G3").
FAST_NULL_TEXT = {"null_init": "negative_prompt", "tolerance_scale": 0.1}
DDIM_INVERSION_GUIDANCE = 1.0  # the reference's: the conditional branch alone walks z_0 → z_T


@dataclass
class Inversion:
    """Everything editing needs from an inverted image."""

    x_T: torch.Tensor  # (1, 4, h, w) the latent to sample from
    trajectory: list[torch.Tensor]  # DDIM inversion latents z_0 … z_T (steps + 1 entries)
    uncond_embeddings: list[torch.Tensor] | None  # (1, context, d) per sampling step, noisiest first; None = ""
    method: str
    losses: list[float] = field(default_factory=list)  # null-text: final loss of each step
    inner_steps: list[int] = field(default_factory=list)  # null-text: Adam steps taken at each step
    seconds: float | None = None  # wall time `invert` took (kept by the cache: what a cached entry once cost)

    @property
    def source_trajectory(self) -> list[torch.Tensor] | None:
        """What editing must keep the source branch on (Direct Inversion: the trajectory), else None."""
        return self.trajectory if self.method in TRAJECTORY_METHODS else None


def _guided(model, x, t, uncond: Conditioning, cond: Conditioning, guidance):
    out_uncond, out_cond = unet_output(model, torch.cat([x, x]), t, concat(uncond, cond)).chunk(2)
    return out_uncond + guidance * (out_cond - out_uncond)


def _check_prompt(prompt) -> None:
    if not isinstance(prompt, str):
        raise WrongTypeError(f"the caption must be one string, got {type(prompt).__name__} {prompt!r}")


def _check_latent(latent: torch.Tensor, model: StableDiffusion, what: str) -> None:
    channels = model.config.unet.in_channels
    if latent.ndim != 4 or latent.shape[1] != channels:
        raise UserError(f"{what} has shape {tuple(latent.shape)}; expected (batch, {channels}, h, w) latents")


@torch.no_grad()
def ddim_invert(
    model: StableDiffusion, z0: torch.Tensor, prompt: str, *, settings: SamplerSettings, progress: bool = True
) -> list[torch.Tensor]:
    """z_0 → [z_0, z_1, …, z_T] along the sampling timesteps in ascending order (steps + 1 latents).

    `settings.guidance` = 1 (the reference's, `DDIM_INVERSION_GUIDANCE`) uses the conditional branch only;
    other values apply classifier-free guidance with the empty prompt. z_0: (b, 4, h, w), one caption for all.
    """
    _check_prompt(prompt)
    _check_latent(z0, model, "z0")
    batch, latent_hw = z0.shape[0], tuple(z0.shape[-2:])
    cond = condition(model, [prompt], latent_hw=latent_hw).expand(batch)
    uncond = condition(model, [""], latent_hw=latent_hw).expand(batch) if settings.guidance != 1.0 else None
    timesteps = ddim_timesteps(
        settings.steps, num_train_timesteps=model.config.num_train_timesteps, offset=settings.offset
    )[::-1]
    z, trajectory = z0.float().to(model.device), [z0.float().to(model.device)]
    for t in tqdm(timesteps, desc="DDIM inversion", disable=not progress, leave=False):
        out = (
            unet_output(model, z, t, cond) if uncond is None else _guided(model, z, t, uncond, cond, settings.guidance)
        )
        t_prev = previous_timestep(t, num_steps=settings.steps, num_train_timesteps=model.config.num_train_timesteps)
        z = ddim_inverse_step(out, z, t_prev=t_prev, t=t, schedule=model.schedule, prediction=model.config.prediction)
        trajectory.append(z)
    return trajectory


def null_text_optimization(
    model: StableDiffusion,
    trajectory: Sequence[torch.Tensor],
    prompt: str,
    *,
    settings: SamplerSettings,
    inner_steps: int = NULL_TEXT_INNER_STEPS,
    tolerance_scale: float = 1.0,
    progress: bool = True,
    init: str = "empty",
    reference_schedule: bool = False,
) -> tuple[list[torch.Tensor], list[float], list[int]]:
    """Mokady et al. 2023, Algorithm 1, with the reference's schedule; returns (∅_i, final losses, Adam steps).

    Per step i: the loss of the current ∅ is computed first; if it is below the tolerance
    tolerance_scale·(1e-5 + i·2e-5) the step is done (no Adam step: already converged), else one Adam step
    and again, at most `inner_steps` Adam steps. The latent then advances with the final ∅ — the guided step
    whose loss was last computed, so no extra UNet call. The reported loss is that of the final ∅ (the
    reference reports the one before its last update).
    Only ∅ has a gradient: the UNet's parameters are frozen for the duration, so no weight gradients are
    ever computed or stored.

    init: ∅ before step 0 — "empty" (the "" embedding, as the paper and P2P_SPEC §7) or "negative_prompt"
    (the caption's own embedding: Miyake et al.'s training-free solution, which null-text then refines;
    on models where that is already exact, most steps take no Adam step at all).

    tolerance_scale: multiplies the reference's tolerance (1 = the reference's). Started from the caption's
    embedding on the built-in model, the reference's tolerance is met almost at once (~3 Adam steps in 50
    sampling steps), and the carry-over keeps whatever ∅ those few steps made: below the tolerance, but
    0.07–0.33 dB below the paper's reconstruction. A tenth of it converges (within 0.01 dB of a thirtieth):
    FAST_NULL_TEXT, measured in docs/real-images.md and docs/tiny-model-history.md.

    `reference_schedule=True` reproduces the official code's cost for benchmarks: weights left as they are
    (its UNet has requires_grad=True, so backward also computes weight gradients), all `inner_steps` Adam
    steps taken at every step, then a separate UNet call to advance.
    """
    if init not in NULL_TEXT_INITS:
        raise UserError(f"null-text init {init!r} is not supported; choose one of {NULL_TEXT_INITS}")
    if inner_steps < 0:
        raise UserError(f"inner_steps must be ≥ 0, got {inner_steps}")
    check_tolerance_scale(tolerance_scale)
    _check_prompt(prompt)
    _check_trajectory(trajectory, model, steps=settings.steps)
    # detached copies: a trajectory made under torch.inference_mode() cannot take part in autograd
    trajectory = [z.detach().float().to(model.device).clone() for z in trajectory]
    frozen = [] if reference_schedule else [p for p in model.parameters() if p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        with torch.enable_grad():  # ∅ needs a gradient even when the caller runs under torch.no_grad()
            return _optimize_null_text(
                model,
                trajectory,
                prompt,
                settings=settings,
                inner_steps=inner_steps,
                tolerance_scale=tolerance_scale,
                progress=progress,
                init=init,
                reference_schedule=reference_schedule,
            )
    finally:
        for p in frozen:
            p.requires_grad_(True)


def check_tolerance_scale(value) -> None:
    """A null-text tolerance scale is a finite number ≥ 0; anything else is named."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UserError(
            f"tolerance_scale={value!r}: it multiplies null-text's early-stop tolerance "
            "1e-5 + i·2e-5; pass a finite number ≥ 0 (1 = the reference's, 0 = never stop early)"
        )


def _check_trajectory(trajectory: Sequence[torch.Tensor], model: StableDiffusion, *, steps: int) -> None:
    """Null-text targets are trajectory[-2], trajectory[-3], …: a wrong length would silently pair steps wrongly."""
    if len(trajectory) != steps + 1:
        raise UserError(
            f"the trajectory has {len(trajectory)} latents for steps={steps}; null-text inversion "
            f"needs the DDIM inversion's z_0 … z_T, {steps + 1} latents"
        )
    for i, latent in enumerate(trajectory):
        _check_latent(latent, model, f"trajectory[{i}]")
        if latent.shape[0] != 1:
            raise UserError(
                f"trajectory[{i}] holds a batch of {latent.shape[0]} latents; null-text inversion "
                "optimises one ∅ per step for one image: invert images one at a time"
            )
        if latent.shape != trajectory[0].shape:
            raise UserError(
                f"trajectory[{i}] has shape {tuple(latent.shape)} but trajectory[0] "
                f"{tuple(trajectory[0].shape)}; every latent of a trajectory has the same shape"
            )


def _optimize_null_text(
    model, trajectory, prompt, *, settings, inner_steps, tolerance_scale, progress, init, reference_schedule
):
    """The loop of `null_text_optimization`, its inputs checked and the weights already frozen."""
    latent_hw = tuple(trajectory[-1].shape[-2:])
    with torch.no_grad():
        cond = condition(model, [prompt], latent_hw=latent_hw)
        cond = Conditioning(cond.context.float(), cond.y)
        # ∅ is the token embeddings alone; SDXL's pooled vector of the unconditional branch stays the empty
        # prompt's, as in sampling (`sample` replaces only the context with the optimised ∅_i)
        empty = condition(model, [""], latent_hw=latent_hw)
        uncond = cond.context.clone() if init == "negative_prompt" else empty.context.float()
    timesteps = ddim_timesteps(
        settings.steps, num_train_timesteps=model.config.num_train_timesteps, offset=settings.offset
    )
    latent = trajectory[-1]
    embeddings, losses, used = [], [], []
    with tqdm(total=len(timesteps), desc="null-text inversion", disable=not progress, leave=False) as bar:
        for i, t in enumerate(timesteps):
            t_prev = previous_timestep(
                t, num_steps=settings.steps, num_train_timesteps=model.config.num_train_timesteps
            )
            target = trajectory[len(trajectory) - i - 2]
            uncond = uncond.detach().clone().requires_grad_(True)
            optimizer = torch.optim.Adam([uncond], lr=NULL_TEXT_LR * (1.0 - i / 100.0))
            with torch.no_grad():
                out_cond = unet_output(model, latent, t, cond)
            steps_taken, tolerance = 0, tolerance_scale * (NULL_TEXT_EPSILON + i * NULL_TEXT_EPSILON_SLOPE)
            while True:  # the guided DDIM step with the current ∅_i, its distance to the trajectory, maybe Adam
                out_uncond = unet_output(model, latent, t, empty.with_context(uncond))
                guided = out_uncond + settings.guidance * (out_cond - out_uncond)
                previous = ddim_step(
                    guided, latent, t=t, t_prev=t_prev, schedule=model.schedule, prediction=model.config.prediction
                )
                loss = F.mse_loss(previous, target)
                loss_value = loss.item()
                if steps_taken == inner_steps or (not reference_schedule and loss_value < tolerance):
                    break
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                steps_taken += 1
                if reference_schedule and steps_taken >= inner_steps:
                    break  # (its loss is the one before the last update, as the official code logs it)
            uncond = uncond.detach()
            embeddings.append(uncond.clone())
            losses.append(loss_value)
            used.append(steps_taken)
            if reference_schedule:  # the official code's separate call to advance with the optimised ∅_i
                with torch.no_grad():
                    previous = ddim_step(
                        _guided(model, latent, t, empty.with_context(uncond), cond, settings.guidance),
                        latent,
                        t=t,
                        t_prev=t_prev,
                        schedule=model.schedule,
                        prediction=model.config.prediction,
                    )
            latent = previous.detach()
            bar.set_postfix(loss=f"{loss_value:.2e}", adam=steps_taken)
            bar.update()
    return embeddings, losses, used


@torch.no_grad()
def invert(
    model: StableDiffusion,
    image: np.ndarray,
    prompt: str,
    *,
    method: str = "null_text",
    settings: SamplerSettings | None = None,
    inner_steps: int = NULL_TEXT_INNER_STEPS,
    null_init: str = "empty",
    tolerance_scale: float = 1.0,
    inversion_guidance: float = DDIM_INVERSION_GUIDANCE,
    progress: bool = True,
    reference_schedule: bool = False,
) -> Inversion:
    """Invert a uint8 (H, W, 3) image with its caption by `method` (one of INVERSION_METHODS).

    `settings` are those the edits will sample with (steps, guidance w, offset; η must be 0: the inversion
    retraces deterministic DDIM). `inversion_guidance`: the DDIM inversion's own guidance scale (the
    reference's 1). null_init: where null-text's ∅ starts (one of NULL_TEXT_INITS) and tolerance_scale: its
    early-stop tolerance (see `null_text_optimization`).
    """
    if method not in INVERSION_METHODS:
        raise UserError(f"inversion method {method!r} is not supported; choose one of {INVERSION_METHODS}")
    _check_prompt(prompt)
    settings = settings or SamplerSettings(guidance=model.config.guidance)
    if settings.eta != 0:
        raise UserError(f"eta={settings.eta}: inversion retraces deterministic DDIM; sample the edits with eta=0")
    image_tensor = image_to_tensor(image)
    model.config.check_image_size(height=image.shape[0], width=image.shape[1])
    start = time.perf_counter()
    z0 = model.encode_images(image_tensor)  # VAE posterior mean × scale factor
    trajectory = ddim_invert(
        model,
        z0,
        prompt,
        settings=SamplerSettings(steps=settings.steps, guidance=inversion_guidance, offset=settings.offset),
        progress=progress,
    )
    embeddings, losses, used = None, [], []
    if method == "negative_prompt":
        cond = model.encode_prompts([prompt])
        embeddings = [cond.clone() for _ in range(settings.steps)]
    elif method == "null_text":
        embeddings, losses, used = null_text_optimization(
            model,
            trajectory,
            prompt,
            settings=settings,
            inner_steps=inner_steps,
            progress=progress,
            init=null_init,
            tolerance_scale=tolerance_scale,
            reference_schedule=reference_schedule,
        )
    return Inversion(trajectory[-1], trajectory, embeddings, method, losses, used, seconds=time.perf_counter() - start)


def source_on_trajectory(trajectory: Sequence[torch.Tensor]):
    """Direct Inversion's latent callback (Ju et al. 2023, Algorithm 1): after sampling step i (0 = noisiest),
    the source prompt's latent (batch row 0) := the inversion's latent at that step, trajectory[steps − 1 − i];
    the targets are left as the step made them. No optimisation: the source branch simply never leaves the
    trajectory, so its reconstruction is z_0 exactly, and P2P injects the source's maps along the true path.

    The paper adds the difference (trajectory latent − the source's step) to the source branch; since the
    source then starts every step on the trajectory, that is the same as this assignment.
    """
    trajectory = list(trajectory)
    steps = len(trajectory) - 1

    def put_back(step: int, latents: torch.Tensor) -> torch.Tensor:
        if not 0 <= step < steps:
            raise UserError(
                f"sampling step {step} is outside the inversion's {steps} steps; edit with the inversion's own steps"
            )
        latents = latents.clone()
        latents[0] = trajectory[steps - 1 - step][0].to(latents)
        return latents

    return put_back


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) → float (1, 3, H, W) in [-1, 1]."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise UserError(
            f"expected a uint8 (H, W, 3) RGB image, got {getattr(image, 'dtype', type(image).__name__)} "
            f"{getattr(image, 'shape', '')}; p2p.real.images.load_image makes one from a file"
        )
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1.0


@torch.no_grad()
def vae_reconstruction(model: StableDiffusion, image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) → the same through the VAE alone (posterior mean, decoded): every inversion's upper bound."""
    image_tensor = image_to_tensor(image)
    model.config.check_image_size(height=image.shape[0], width=image.shape[1])  # else it shrinks
    return decode(model, model.encode_images(image_tensor))[0]


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB between uint8 images, optionally only where `mask` (H, W) is True."""
    if a.shape != b.shape:
        raise UserError(f"psnr compares images of one shape, got {a.shape} and {b.shape}")
    diff = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    if mask is not None:
        if mask.shape != a.shape[:2]:
            raise UserError(f"psnr mask has shape {mask.shape}; the images are {a.shape[:2]}")
        if not mask.any():
            raise UserError("psnr mask selects no pixels")
        diff = diff[mask.astype(bool)]
    mse = diff.mean()
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def mask_at(mask: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """A latent-grid mask, (1, h, w) or (h, w), upsampled (nearest) to `size` = (H, W): float 0/1, (H, W)."""
    mask = mask.float().reshape(1, 1, *mask.shape[-2:])
    return F.interpolate(mask, size=tuple(size), mode="nearest")[0, 0].numpy()


def restore_outside_mask(edited: np.ndarray, original: np.ndarray, mask: torch.Tensor) -> np.ndarray:
    """Paper Fig. 12: keep the edit inside the attention mask, the original image outside.

    `mask` (1, h, w) or (h, w) in latent (or any) resolution, upsampled (nearest) to the image.
    """
    mask = mask_at(mask, edited.shape[:2])[..., None]
    return (mask * edited + (1 - mask) * original).round().astype(np.uint8)
