"""The sampling loop for the rectified-flow models (SD3 / SD3.5 / FLUX.1), with `p2p/pipeline.py`'s controller protocol.

One initial noise latent, drawn on the CPU from the seed as diffusers draws it ((1, 16, H/8, W/8); FLUX packs it
into 2×2 patches inside the model call), is shared by every prompt (source first, then targets). Each step:
- SD3/SD3.5: the transformer on `[uncond × P ; cond × P]` and classifier-free guidance v = v_u + w·(v_c − v_u)
  (when w > 1, as the reference pipeline; Ho & Salimans 2022);
- FLUX-dev: one batch of P, the guidance scale embedded (guidance distillation; no unconditional batch);
  FLUX-schnell: one batch, no guidance;
then an Euler step x ← x + (σ_next − σ)·v (`models/flow.py`). The loop — never a call counter — tells the
controller which step it is (`controller.begin_step(step)`), and `attach_controller` checks every joint site
(FLUX's single-stream blocks included) met it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from models.attention import attach_controller
from models.errors import UserError
from models.flow import euler_step
from models.flow_model import FlowConditioning, FlowModel, FlowModelConfig, concat
from p2p.pipeline import StepController


@dataclass
class FlowSamplerSettings:
    steps: int = 28  # Euler steps
    guidance: float = 7.0  # SD3: CFG scale w; FLUX-dev: the embedded guidance; FLUX-schnell: unused


def initial_noise(model: FlowModel, seed: int, *, height: int, width: int) -> torch.Tensor:
    """ε ~ N(0, I) of shape (1, 16, H/8, W/8) from `torch.Generator("cpu").manual_seed(seed)`, as the SD3 and FLUX
    pipelines draw it (FLUX's (1, 16, 2·(H/16), 2·(W/16)) is the same shape at the sizes it takes), so seeds carry over."""
    model.config.check_image_size(height=height, width=width)
    generator = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(model.latent_shape(height=height, width=width), generator=generator)


def uses_cfg(model: FlowModel, guidance: float) -> bool:
    """Real classifier-free guidance: SD3/SD3.5 with w > 1 (the pipeline's `do_classifier_free_guidance`)."""
    return model.config.family == "sd3" and guidance > 1


def check_negative_prompt(config: FlowModelConfig, negative_prompt: str) -> None:
    if negative_prompt and config.family == "flux":
        raise UserError(
            f"negative_prompt={negative_prompt!r}: FLUX.1 is guidance-distilled and samples without an "
            "unconditional batch, so it takes no negative prompt; leave negative_prompt empty"
        )


def conditioning(
    model: FlowModel, prompts: Sequence[str], *, negative_prompt: str, guidance: float
) -> tuple[FlowConditioning, FlowConditioning | None]:
    """(cond, uncond or None) for the prompts; the text encoders are released afterwards when the model says so."""
    prompts = list(prompts)
    check_negative_prompt(model.config, negative_prompt)
    cfg = uses_cfg(model, guidance)
    text = model.encode_text(prompts + [negative_prompt] * (len(prompts) if cfg else 0))
    if model.release_text_encoders_after_encoding:
        model.release_text_encoders()
    n = len(prompts)
    cond = FlowConditioning(text.context[:n], text.pooled[:n], text.text_segments)
    uncond = FlowConditioning(text.context[n:], text.pooled[n:], text.text_segments) if cfg else None
    return cond, uncond


@torch.no_grad()
def sample(
    model: FlowModel,
    cond: FlowConditioning,
    *,
    latent: torch.Tensor,
    uncond: FlowConditioning | None = None,
    settings: FlowSamplerSettings | None = None,
    controller: StepController | None = None,
    conditioning_callback: Callable[[int, FlowConditioning], FlowConditioning] | None = None,
    latent_callback: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Integrate from noise (σ = 1) to data (σ = 0); returns the final latents (P, 16, h, w) in float32.

    `cond`: P prompts' conditioning; `uncond`: the negative prompt's, P rows (SD3 with guidance > 1), else None.
    `conditioning_callback(step, cond)`: the conditional rows' conditioning at this step (an edit giving the targets
    the source's pooled vector, `p2p.joint_edit`); `latent_callback(step, x)`: rewrites the latents after each
    Euler step (LocalBlend).
    """
    settings = settings or FlowSamplerSettings(steps=model.config.steps, guidance=model.config.guidance)
    model.ensure_loaded("transformer")
    num_prompts = cond.context.shape[0]
    sigmas = model.sigmas(settings.steps, latent_hw=tuple(latent.shape[-2:]))
    x = latent.to(device=model.device, dtype=torch.float32).expand(num_prompts, -1, -1, -1).clone()
    with attach_controller(model.transformer, controller):
        for step in tqdm(range(settings.steps), desc="sampling", disable=not progress, leave=False):
            if controller is not None:
                controller.begin_step(step)
            sigma, sigma_next = float(sigmas[step]), float(sigmas[step + 1])
            step_cond = cond if conditioning_callback is None else conditioning_callback(step, cond)
            if uncond is None:
                v = model.velocity(x, sigma=sigma, conditioning=step_cond, guidance=settings.guidance)
            else:
                both = concat(uncond, step_cond)
                v_uncond, v_cond = model.velocity(torch.cat([x, x]), sigma=sigma, conditioning=both).chunk(2)
                v = v_uncond + settings.guidance * (v_cond - v_uncond)
            x = euler_step(x, v, sigma=sigma, sigma_next=sigma_next)
            if latent_callback is not None:
                x = latent_callback(step, x)
    return x


@torch.no_grad()
def decode(model: FlowModel, latents: torch.Tensor) -> np.ndarray:
    """Model latents → uint8 images (P, H, W, 3)."""
    images = model.decode_latents(latents)
    images = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def generate(
    model: FlowModel,
    prompts: Sequence[str],
    *,
    seed: int,
    height: int | None = None,
    width: int | None = None,
    settings: FlowSamplerSettings | None = None,
    negative_prompt: str = "",
    controller: StepController | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Text to image for prompts sharing one seed; uint8 (P, H, W, 3). Text first (and released on a CPU), then
    the transformer, then the VAE."""
    if not prompts:
        raise UserError("generate needs at least one prompt")
    c = model.config
    height, width = c.image_size if height is None else height, c.image_size if width is None else width
    settings = settings or FlowSamplerSettings(steps=c.steps, guidance=c.guidance)
    latent = initial_noise(model, seed, height=height, width=width)
    cond, uncond = conditioning(model, prompts, negative_prompt=negative_prompt, guidance=settings.guidance)
    latents = sample(
        model, cond, uncond=uncond, latent=latent, settings=settings, controller=controller, progress=progress
    )
    return decode(model, latents)
