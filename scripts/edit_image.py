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
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.errors import UserError  # noqa: E402
from models.files import write_text  # noqa: E402
from p2p import views  # noqa: E402
from p2p.edit import BlendSpec, EditSpec, StoreSpec, build_controllers  # noqa: E402
from p2p.pipeline import image_size  # noqa: E402
from p2p.real.images import load_image  # noqa: E402
from p2p.real.inversion import check_tolerance_scale  # noqa: E402
from p2p.real.photo import InversionSettings, edit_photo  # noqa: E402
from scripts._cli import entry_point  # noqa: E402
from scripts._common import (  # noqa: E402
    check_fresh,
    edit_inputs,
    load_model,
    number,
    run_dir,
    sampler_settings,
    save_config,
    save_image,
    slug,
)


def check_request(cfg: DictConfig) -> tuple[list[str], EditSpec, BlendSpec | None, InversionSettings]:
    """Everything a user types, checked before the model loads: the prompts, the edit, the blend, the inversion."""
    for key, form in (
        ("image", "image=PATH/TO/photo.png"),
        ("prompts", 'prompts=\'["caption of the photo", "target caption"]\''),
    ):
        if OmegaConf.is_missing(cfg, key) or cfg[key] is None:
            raise UserError(f"{key} is required: pass {form}")
    if cfg.negative_prompt:
        raise UserError(
            f"negative_prompt={cfg.negative_prompt!r} has no effect here: the unconditional embedding "
            "comes from the inversion (inversion=negative_prompt uses the caption); leave it empty"
        )
    prompts, spec, blend = edit_inputs(cfg)  # the rules of scripts/edit.py: a list of strings, targets for an edit
    if cfg.restore_unedited and blend is None:
        raise UserError("restore_unedited=true needs a mask: pass blend=local 'blend.words=[word]'")
    inversion = InversionSettings(
        method=cfg.inversion.method,
        inner_steps=cfg.inversion.inner_steps,
        init=cfg.inversion.init,
        guidance=float(cfg.inversion.guidance),
        tolerance_scale=number(cfg.inversion.tolerance_scale, name="inversion.tolerance_scale"),
        gradient_checkpointing=bool(cfg.inversion.get("gradient_checkpointing", True)),
    )
    check_tolerance_scale(inversion.tolerance_scale)
    return prompts, spec, blend, inversion


@entry_point("edit_image")
def main(cfg: DictConfig) -> None:
    prompts, spec, blend, inversion = check_request(cfg)
    out = check_fresh(run_dir())  # before minutes of inversion
    model = load_model(cfg)
    height, width = image_size(model, cfg.height, cfg.width)
    model.config.check_image_size(height=height, width=width)
    margins = OmegaConf.to_container(cfg.margins) if OmegaConf.is_list(cfg.margins) else cfg.margins
    image = load_image(cfg.image, height=height, width=width, margins=margins)
    settings = sampler_settings(cfg, model)
    spec = spec if spec.kind != "none" else None
    if len(prompts) > 1:  # the edit's own checks (a replace's word counts, blend words, ...) before the inversion
        factor = model.config.latent_factor
        build_controllers(
            model,
            prompts,
            spec=spec,
            blend=blend,
            store=None,
            num_steps=settings.steps,
            latent_hw=(height // factor, width // factor),
        )
    save_config(cfg, out)  # first, so that even a run that fails later says how it was started
    photo = edit_photo(
        model,
        image,
        prompts,
        spec=spec,
        blend=blend,
        settings=settings,
        inversion=inversion,
        cache_dir=cfg.cache_dir,
        restore_unedited=cfg.restore_unedited,
        progress=cfg.progress,
        store=StoreSpec(max_fraction=1.0) if cfg.attention else None,
    )

    rows = [
        [
            views.captioned(photo.original, "original"),
            views.captioned(photo.vae_reconstruction, "VAE reconstruction"),
            views.captioned(photo.reconstruction, f"{photo.inversion.method} reconstruction"),
        ]
    ]
    save_image(photo.original, out / "original.png")
    save_image(photo.vae_reconstruction, out / "vae_reconstruction.png")
    save_image(photo.reconstruction, out / "inversion_reconstruction.png")
    if photo.edited is not None:
        for i, (im, p) in enumerate(zip(photo.edited, prompts)):
            save_image(im, out / f"{i:02d}_{slug(p)}.png")
        rows.append([views.captioned(im, p) for im, p in zip(photo.edited, prompts)])
    write_text(out / "metrics.json", json.dumps(photo.metrics, indent=2))
    views.save_png(views.grid(rows), out / "grid.png")
    print(
        f"PSNR: VAE {photo.metrics['psnr_vae_reconstruction']} dB, {photo.inversion.method} inversion "
        f"{photo.metrics['psnr_inversion_reconstruction']} dB; files in {out}"
    )


if __name__ == "__main__":
    main()
