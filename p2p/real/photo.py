"""Editing a photo, the whole real-image path in one call (paper §3.3 with Mokady et al. 2023, Figs. 10–12):
invert the photo under its caption (through the cache), reconstruct it, edit it with P2P from the inverted x_T
and null embeddings, and optionally put the photo's own pixels back outside the LocalBlend mask (Fig. 12).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.errors import UserError
from models.stable_diffusion import StableDiffusion
from p2p.edit import BlendSpec, EditResult, EditSpec, StoreSpec, edit
from p2p.pipeline import SamplerSettings, decode, sample
from p2p.real.cache import cached_invert
from p2p.real.inversion import (
    Inversion,
    psnr,
    restore_outside_mask,
    source_on_trajectory,
    vae_reconstruction,
)


@dataclass
class InversionSettings:
    method: str = "null_text"  # null_text | ddim | negative_prompt | direct
    inner_steps: int = 10  # null-text: Adam steps per sampling step at most
    init: str = "empty"  # null-text: start ∅ from "" ("empty", the paper) or from the caption ("negative_prompt")
    tolerance_scale: float = 1.0  # null-text: early-stop tolerance relative to the paper's
    guidance: float = 1.0  # the DDIM inversion's own guidance (the reference's: 1)
    # null-text: recompute each UNet block's inside during backward instead of keeping it (models/unet.py): the
    # same gradients; SDXL at 1024² needs it to fit 20 GB, for ~1 more forward per Adam step (docs/benchmarks.md)
    gradient_checkpointing: bool = True


@dataclass
class PhotoEdit:
    original: np.ndarray  # uint8 (H, W, 3): the photo as the model sees it (cropped, resized)
    vae_reconstruction: np.ndarray  # the VAE alone: the upper bound of any inversion
    reconstruction: np.ndarray | None  # the caption sampled from the inversion (None: reconstruct=False)
    inversion: Inversion
    edited: np.ndarray | None = None  # uint8 (P, H, W, 3): source first; None when only the caption was given
    result: EditResult | None = None  # the edit's latents, blend and store
    metrics: dict = field(default_factory=dict)


def edit_photo(
    model: StableDiffusion,
    image: np.ndarray,
    prompts: list[str],
    *,
    spec: EditSpec | None,
    blend: BlendSpec | None,
    settings: SamplerSettings,
    inversion: InversionSettings,
    cache_dir: str | Path | None,
    restore_unedited: bool = False,
    store: StoreSpec | None = None,
    progress: bool = True,
    reconstruct: bool = True,
) -> PhotoEdit:
    """Invert `image` under `prompts[0]`, reconstruct it (unless `reconstruct=False`: a benchmark needs only the
    edit, and saves a third of the sampling), and edit it into `prompts[1:]` (if any)."""
    start = time.perf_counter()
    with model.unet.checkpointing(inversion.gradient_checkpointing):
        inverted, from_cache = cached_invert(
            model,
            image,
            prompts[0],
            cache_dir=cache_dir,
            method=inversion.method,
            settings=settings,
            inner_steps=inversion.inner_steps,
            null_init=inversion.init,
            tolerance_scale=inversion.tolerance_scale,
            inversion_guidance=inversion.guidance,
            progress=progress,
        )
    wait_seconds = time.perf_counter() - start
    vae_only = vae_reconstruction(model, image)
    # Direct Inversion: the source branch rides the trajectory, so its reconstruction is z_0 (the VAE's) exactly
    trajectory = inverted.source_trajectory
    reconstruction = (
        decode(
            model,
            sample(
                model,
                prompts[:1],
                latent=inverted.x_T,
                settings=settings,
                uncond_embeddings=inverted.uncond_embeddings,
                progress=progress,
                latent_callback=source_on_trajectory(trajectory) if trajectory else None,
            ),
        )[0]
        if reconstruct
        else None
    )
    out = PhotoEdit(original=image, vae_reconstruction=vae_only, reconstruction=reconstruction, inversion=inverted)
    if len(prompts) > 1:
        out.result = edit(
            model,
            prompts,
            latent=inverted.x_T,
            spec=spec,
            blend=blend,
            store=store,
            settings=settings,
            uncond_embeddings=inverted.uncond_embeddings,
            source_trajectory=trajectory,
            progress=progress,
        )
        out.edited = out.result.images
        if restore_unedited:
            mask = out.result.blend.last_mask if out.result.blend is not None else None
            if mask is None:
                raise UserError(
                    f"restore_unedited=true: the blend never ran (blend.start={blend.start if blend else None}"
                    f" of {settings.steps} steps), so there is no mask; lower blend.start"
                )
            out.edited = np.stack(
                [out.edited[0]] + [restore_outside_mask(im, image, mask[i]) for i, im in enumerate(out.edited) if i > 0]
            )
    out.metrics = {
        "method": inverted.method,
        "from_cache": from_cache,
        # what computing the inversion took (on a cache hit: when it was computed), and this run's wait for it
        "inversion_seconds": round(inverted.seconds if inverted.seconds is not None else wait_seconds, 3),
        "inversion_wait_seconds": round(wait_seconds, 3),
        "psnr_vae_reconstruction": round(psnr(vae_only, image), 3),
        "psnr_inversion_reconstruction": round(psnr(reconstruction, image), 3) if reconstruct else None,
        "null_text_final_losses": inverted.losses,
        "null_text_adam_steps": inverted.inner_steps,
        "steps": settings.steps,
        "guidance": settings.guidance,
        "inversion_guidance": inversion.guidance,
    }
    return out
