"""The built-in tiny model's training losses (issue 7), one function per term; p2p/shapes/training.py runs them.

- `vae_loss`: the KL autoencoder's reconstruction + KL to N(0, I) (LDM §3.1), plus an optional coverage term
  (`coverage_loss` on `cell_coverage`) that writes each latent cell's object coverage into channel 0;
- `diffusion_loss`: ε-prediction MSE at a uniform t (DDPM Eq. 14), optionally min-SNR-γ weighted
  (`min_snr_weights`) and plus the token-grounding term of p2p/shapes/grounding.py.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from models.attention import attach_controller
from models.ddim import add_noise
from models.errors import UserError
from models.stable_diffusion import StableDiffusion
from p2p.shapes.grounding import ColorMix, CrossMaps, Grounding, grounding_loss

RECONSTRUCTION_LOSSES = ("l1", "mse", "l1+mse")


def cell_coverage(scenes, factor: int) -> torch.Tensor:
    """(N, H/factor, W/factor) float32: the fraction of each latent cell's pixels that some object covers."""
    masks = np.stack([np.any([o.mask for o in scene.objects], axis=0) for scene in scenes]).astype(np.float32)
    return F.avg_pool2d(torch.from_numpy(masks)[:, None], factor)[:, 0]


def coverage_loss(means: torch.Tensor, coverage: torch.Tensor, *, ratio: float) -> torch.Tensor:
    """Asks latent channel 0 to write where the objects are, the same for every color and background:
    mean((μ₀ / s − ratio · coverage)²), s = the std of the other channels' posterior means in the batch
    (not differentiated, so the target follows the latent's own scale). An object's code (its cells' mean
    latent minus the empty cells') then shares the component `ratio · s` along channel 0 whatever its color, and
    the colors differ only in channels 1–3: a color swap moves the latent along those, where the G3 VAE wrote
    the colors of one background along different, even opposite directions of all four channels (model card)."""
    if means.shape[1] < 2:
        raise UserError(f"coverage_loss needs ≥ 2 latent channels (one for coverage), got {means.shape[1]}")
    if coverage.shape != (means.shape[0], *means.shape[2:]):
        raise UserError(f"coverage has shape {tuple(coverage.shape)}; expected {(means.shape[0], *means.shape[2:])}")
    scale = means[:, 1:].detach().std().clamp(min=1e-6)
    return (means[:, 0] / scale - ratio * coverage.to(means)).pow(2).mean()


def vae_loss(
    model: StableDiffusion,
    images: torch.Tensor,
    *,
    kl_weight: float,
    generator: torch.Generator,
    reconstruction: str = "l1",
    coverage: torch.Tensor | None = None,
    coverage_weight: float = 0.0,
    coverage_ratio: float = 4.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Reconstruction of x from z ~ q(z|x), plus kl_weight × KL(q(z|x) ‖ N(0, I)) summed per image (LDM §3.1),
    plus coverage_weight × coverage_loss when `coverage` (cell_coverage of the batch) is given.

    L1 (LDM's pixel term) gives every pixel a gradient of the same size, so the ~90% background pixels that
    are already nearly right keep pushing; MSE's gradient grows with the error, so wrong object colors
    dominate it. "l1+mse" uses both."""
    if reconstruction not in RECONSTRUCTION_LOSSES:
        raise UserError(f"reconstruction {reconstruction!r} is not one of {RECONSTRUCTION_LOSSES}")
    if coverage_weight < 0:
        raise UserError(f"coverage_weight must be ≥ 0 (0 = off), got {coverage_weight}")
    posterior = model.vae.encode(images)
    error = model.vae.decode(posterior.sample(generator)) - images
    l1, mse = error.abs().mean(), error.pow(2).mean()
    kl = posterior.kl().mean()
    pixel_loss = {"l1": l1, "mse": mse, "l1+mse": l1 + mse}[reconstruction]
    loss, stats = pixel_loss + kl_weight * kl, {"l1": l1.item(), "mse": mse.item(), "kl": kl.item()}
    if coverage is not None and coverage_weight > 0:
        cover = coverage_loss(posterior.mean, coverage.to(images.device), ratio=coverage_ratio)
        loss, stats["coverage"] = loss + coverage_weight * cover, cover.item()
    return loss, stats


def min_snr_weights(t: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample weights of the ε-MSE under min-SNR-γ (Hang et al. 2023, Eq. 8 for ε-prediction):
    min(SNR_t, γ) / SNR_t with SNR_t = ᾱ_t / (1 − ᾱ_t). Low-noise steps (SNR ≫ γ), which the 'simple' loss
    weights as much as the rest though they decide only fine detail, are down-weighted; γ = 5 in the paper."""
    a = alphas_cumprod.cpu()[t.cpu()]  # float64 on the CPU (some accelerators have no float64)
    snr = a / (1 - a)
    return (snr.clamp(max=gamma) / snr).to(t.device, torch.float32)


def diffusion_loss(
    model: StableDiffusion,
    latents: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    generator: torch.Generator,
    snr_gamma: float = 0.0,
    grounding: Grounding | None = None,
    grounding_weight: float = 0.0,
    mix: ColorMix | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """‖ε − ε_θ(sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·ε, t, c)‖², t ~ U{0, …, T−1} (DDPM Eq. 14, 'simple' loss),
    optionally weighted per sample by min-SNR-γ (snr_gamma > 0), plus grounding_weight × grounding_loss when
    `grounding` rows are given. `mix`: the text features come from `mix.decoy_ids` except where `mix.keep`.
    The logged 'mse' is always unweighted."""
    if snr_gamma < 0:
        raise UserError(f"snr_gamma must be ≥ 0 (0 = unweighted), got {snr_gamma}")
    if grounding_weight < 0:
        raise UserError(f"grounding_weight must be ≥ 0 (0 = off), got {grounding_weight}")
    b, device = latents.shape[0], latents.device
    noise = torch.randn(latents.shape, generator=generator).to(device)
    t = torch.randint(0, model.config.num_train_timesteps, (b,), generator=generator).to(device)
    context = model.text_encoder(token_ids.to(device))
    mixed = (~mix.keep).any(1) if mix is not None else None
    if mixed is not None and mixed.any():  # encode only the mixed rows' decoys (the others keep every position)
        keep = mix.keep[mixed].to(device)[..., None]
        context = context.clone()
        context[mixed] = torch.where(keep, context[mixed], model.text_encoder(mix.decoy_ids[mixed].to(device)))
    recorder = CrossMaps() if grounding is not None and grounding_weight > 0 else None
    with attach_controller(model.unet, recorder):
        prediction = model.unet(add_noise(latents, noise, t, model.schedule), t, context)
    if model.config.prediction != "epsilon":
        raise UserError(f"training supports prediction='epsilon' only, not {model.config.prediction!r}")
    per_sample = (prediction - noise).pow(2).flatten(1).mean(1)
    mse = per_sample.mean()
    loss = mse if snr_gamma == 0 else (min_snr_weights(t, model.schedule.alphas_cumprod, snr_gamma) * per_sample).mean()
    stats = {"mse": mse.item()}
    if recorder is not None:
        ground = grounding_loss(recorder.maps, grounding)
        loss = loss + grounding_weight * ground
        stats["grounding"] = ground.item()
    return loss, stats
