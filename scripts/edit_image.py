"""Edit a real image by editing its caption (issue 4; paper §4, Fig. 10–12; Mokady et al. 2023).

    python scripts/edit_image.py image=photo.png \
        prompts='["a red circle on a black background","a blue circle on a black background"]' \
        inversion=null_text edit=replace
    python scripts/edit_image.py ... inversion=ddim            # or negative_prompt
    python scripts/edit_image.py ... blend=local 'blend.words=[circle]' restore_unedited=true   # Fig. 12

Writes: original.png, vae_reconstruction.png, inversion_reconstruction.png, one PNG per prompt of the edit
batch (source first), grid.png, metrics.json (reconstruction PSNRs, inversion time, null-text losses) and
config.yaml; a folder that holds a previous run's files is refused before any work. `edit=store` with the
caption alone only inverts and reconstructs. Inversions are cached in `cache_dir` keyed by image,
caption, model, settings and method.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts._cli import entry_point  # noqa: E402
from scripts._common import (check_fresh, load_model, number, run_dir, sampler_settings, save_config,  # noqa: E402
                            save_image, slug)
from models.errors import UserError  # noqa: E402
from models.files import write_text  # noqa: E402
from p2p import views  # noqa: E402
from scripts.edit import edit_inputs  # noqa: E402
from p2p.edit import BlendSpec, EditSpec, StoreSpec, build_controllers, edit  # noqa: E402
from p2p.real.images import load_image  # noqa: E402
from p2p.real.inversion import check_tolerance_scale, psnr, restore_outside_mask, vae_reconstruction  # noqa: E402
from p2p.real.cache import cached_invert  # noqa: E402
from p2p.pipeline import check_image_size, decode, image_size, sample  # noqa: E402


def check_request(cfg: DictConfig) -> tuple[list[str], EditSpec, BlendSpec | None]:
    """Everything a user types, checked before the model loads: returns the prompts, the edit and the blend."""
    for key, form in (("image", "image=PATH/TO/photo.png"),
                      ("prompts", "prompts='[\"caption of the photo\", \"target caption\"]'")):
        if OmegaConf.is_missing(cfg, key) or cfg[key] is None:
            raise UserError(f"{key} is required: pass {form}")
    if cfg.negative_prompt:
        raise UserError(f"negative_prompt={cfg.negative_prompt!r} has no effect here: the unconditional embedding "
                         "comes from the inversion (inversion=negative_prompt uses the caption); leave it empty")
    prompts, spec, blend = edit_inputs(cfg)  # the rules of scripts/edit.py: a list of strings, targets for an edit
    if cfg.restore_unedited and blend is None:
        raise UserError("restore_unedited=true needs a mask: pass blend=local 'blend.words=[word]'")
    check_tolerance_scale(tolerance_scale(cfg))
    return prompts, spec, blend


def tolerance_scale(cfg: DictConfig) -> float:
    return number(cfg.inversion.tolerance_scale, name="inversion.tolerance_scale")


@entry_point("edit_image")
def main(cfg: DictConfig) -> None:
    prompts, spec, blend = check_request(cfg)
    out = run_dir()
    check_fresh(out)  # before minutes of inversion
    model = load_model(cfg)
    height, width = image_size(model, cfg.height, cfg.width)
    check_image_size(height, width, latent_factor=model.config.latent_factor)
    margins = OmegaConf.to_container(cfg.margins) if OmegaConf.is_list(cfg.margins) else cfg.margins
    image = load_image(cfg.image, height=height, width=width, margins=margins)
    settings = sampler_settings(cfg, model)
    if len(prompts) > 1:  # the edit's own checks (a replace's word counts, blend words, ...) before the inversion
        build_controllers(model, prompts, spec=spec if spec.kind != "none" else None, blend=blend, store=None,
                          num_steps=settings.steps, latent_hw=(height // model.config.latent_factor,
                                                               width // model.config.latent_factor))
    save_config(cfg, out)  # first, so that even a run that fails later says how it was started

    start = time.perf_counter()
    inversion, from_cache = cached_invert(model, image, prompts[0], cache_dir=cfg.cache_dir,
                                          method=cfg.inversion.method, settings=settings,
                                          inner_steps=cfg.inversion.inner_steps, null_init=cfg.inversion.init,
                                          tolerance_scale=tolerance_scale(cfg),
                                          inversion_guidance=float(cfg.inversion.guidance), progress=cfg.progress)
    load_seconds = time.perf_counter() - start

    vae_only = vae_reconstruction(model, image)
    reconstruction = decode(model, sample(model, prompts[:1], latent=inversion.x_T, settings=settings,
                                          uncond_embeddings=inversion.uncond_embeddings, progress=cfg.progress))[0]
    save_image(image, out / "original.png")
    save_image(vae_only, out / "vae_reconstruction.png")
    save_image(reconstruction, out / "inversion_reconstruction.png")

    result = None
    if len(prompts) > 1:
        result = edit(model, prompts, latent=inversion.x_T, spec=spec if spec.kind != "none" else None,
                      blend=blend, store=StoreSpec(max_fraction=1.0) if cfg.attention else None, settings=settings,
                      uncond_embeddings=inversion.uncond_embeddings, progress=cfg.progress)
        edited = result.images
        if cfg.restore_unedited:
            if result.blend.last_mask is None:
                raise UserError(f"restore_unedited=true: the blend never ran (blend.start={blend.start} of "
                                 f"{settings.steps} steps), so there is no mask; lower blend.start")
            edited = np.stack([edited[0]] + [restore_outside_mask(im, image, result.blend.last_mask[i])
                                             for i, im in enumerate(edited) if i > 0])
        for i, (im, p) in enumerate(zip(edited, prompts)):
            save_image(im, out / f"{i:02d}_{slug(p)}.png")

    metrics = {
        "method": inversion.method, "from_cache": from_cache,
        # what computing the inversion took (on a cache hit: when it was computed), and this run's wait for it
        "inversion_seconds": round(inversion.seconds if inversion.seconds is not None else load_seconds, 3),
        "inversion_wait_seconds": round(load_seconds, 3),
        "psnr_vae_reconstruction": round(psnr(vae_only, image), 3),
        "psnr_inversion_reconstruction": round(psnr(reconstruction, image), 3),
        "null_text_final_losses": inversion.losses, "null_text_adam_steps": inversion.inner_steps,
        "steps": settings.steps, "guidance": settings.guidance, "inversion_guidance": float(cfg.inversion.guidance),
    }
    write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    tiles = [views.captioned(image, "original"), views.captioned(vae_only, "VAE reconstruction"),
             views.captioned(reconstruction, f"{inversion.method} reconstruction")]
    rows = [tiles]
    if result is not None:
        rows.append([views.captioned(im, p) for im, p in zip(edited, prompts)])
    views.save_png(views.grid(rows), out / "grid.png")
    print(f"PSNR: VAE {metrics['psnr_vae_reconstruction']} dB, {inversion.method} inversion "
          f"{metrics['psnr_inversion_reconstruction']} dB; files in {out}")


if __name__ == "__main__":
    main()
