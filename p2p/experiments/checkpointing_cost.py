"""What gradient checkpointing costs null-text inversion in time: one Adam step's UNet work, on and off, interleaved.

A null-text Adam step is a forward of the unconditional branch with ∅ requiring a gradient and a backward to ∅
(`p2p.real.inversion`). With `UNetModel.checkpointing()` each block keeps only its input and recomputes its inside
during backward. Both settings run in one process, alternating, so a shared or throttled machine slows both alike;
the peak memory of each is measured separately by running edit_image.py under scripts/peak_memory.py.
"""

from __future__ import annotations

import statistics
import time

import torch

from models.stable_diffusion import StableDiffusion
from p2p.pipeline import condition, initial_latent, unet_output

TIMESTEP = 501  # a mid-trajectory timestep; the cost does not depend on it


def adam_step_seconds(model: StableDiffusion, *, height: int, width: int, checkpointing: bool) -> float:
    """Seconds of one forward + backward to ∅ through the UNet (the work of one null-text Adam step)."""
    latent = initial_latent(
        0, height=height, width=width, latent_factor=model.config.latent_factor, multiple=model.config.size_multiple
    )
    with torch.no_grad():
        empty = condition(model, [""], latent_hw=tuple(latent.shape[-2:]))
    uncond = empty.context.float().clone().requires_grad_(True)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.enable_grad(), model.unet.checkpointing(checkpointing):
            start = time.perf_counter()
            unet_output(model, latent, TIMESTEP, empty.with_context(uncond)).square().mean().backward()
            return time.perf_counter() - start
    finally:
        for p in frozen:
            p.requires_grad_(True)


def compare(model: StableDiffusion, *, height: int, width: int, repeats: int) -> dict:
    """`repeats` rounds of (on, off); the median seconds of each and their ratio."""
    seconds = {True: [], False: []}
    for _ in range(repeats):
        for checkpointing in (True, False):
            seconds[checkpointing].append(
                adam_step_seconds(model, height=height, width=width, checkpointing=checkpointing)
            )
    on, off = statistics.median(seconds[True]), statistics.median(seconds[False])
    return {
        "on_seconds": seconds[True],
        "off_seconds": seconds[False],
        "median_on": on,
        "median_off": off,
        "ratio": on / off,
    }
