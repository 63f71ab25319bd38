"""The paper's figures, one experiment config each (issue 5): conf/experiment/*.yaml over conf/figure.yaml.

    python scripts/figure.py experiment=fig2_content          # shapes-world prompts, built-in model, CPU
    python scripts/figure.py experiment=fig6_injection_steps steps=25 seed=7
    python scripts/figure.py experiment=fig9_fader prompt_set=paper model=sd15 model.checkpoint=v1-5.safetensors
    python scripts/figure.py experiment=fig10_12_real prompt_set=paper image=cat.jpg model=sd15 model.checkpoint=...
    python scripts/figure.py -m experiment=fig2_content,fig6_injection_steps,fig9_fader   # several at once

Writes into its own run folder outputs/figure/<experiment>/<date>/<time>: figure.png, images/ (each tile),
figure.json (the seed, steps, guidance and size used; captions, files, numbers) and config.yaml; the
real-image figure also writes photo.png. seed=, steps=, guidance=, height=/width= and edit.* override the
experiment's (except what a figure sweeps: Fig. 6's cross fraction, Fig. 9's reweight); a run folder that
already holds a figure is refused before the model is loaded.
The layouts and the edits behind them live in p2p/experiments/figures.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from models.errors import number  # noqa: E402
from p2p.edit import EditSpec  # noqa: E402
from p2p.experiments import figure_request, figures  # noqa: E402
from scripts._cli import entry_point  # noqa: E402
from scripts._common import check_fresh, load_model, run_dir, sampler_settings, save_config, save_image  # noqa: E402


def make_figure(cfg: DictConfig, out: Path) -> Path:
    """Build the experiment's figure and save it with its tiles and the resolved config into `out`."""
    request = OmegaConf.to_container(cfg, resolve=True)
    params = figure_request.prompt_set(request)
    check_fresh(out, what="a figure")
    overrides = figure_request.checked_overrides(request, params)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    model = load_model(cfg, flow=True)  # SD3 / FLUX: the edit on joint attention, default joint settings
    settings = sampler_settings(cfg, model)
    common = dict(title=cfg.title, spec=EditSpec(**request["edit"]), settings=settings, **overrides)
    size = model.config.image_size
    if cfg.figure == "real":
        photo = figure_request.photo(cfg.image, params, size=size, height=overrides["height"], width=overrides["width"])
        save_image(photo, out / "photo.png")
        common.update(
            inner_steps=cfg.inversion.inner_steps,
            null_init=cfg.inversion.init,
            cache_dir=cfg.cache_dir,
            tolerance_scale=number(cfg.inversion.tolerance_scale, name="inversion.tolerance_scale"),
        )
    figure = figures.build(cfg.figure, model, params, **common)
    image_height, image_width = (
        params["photo"].shape[:2] if cfg.figure == "real" else (overrides["height"] or size, overrides["width"] or size)
    )
    figure.settings = {
        "seed": overrides["seed"],
        "steps": settings.steps,
        "guidance": settings.guidance,
        "height": image_height,
        "width": image_width,
        "prompt_set": cfg.prompt_set,
    }
    path = figure.save(out, tile_size=overrides["tile_size"])
    save_config(cfg, out)
    return path


@entry_point("figure")
def main(cfg: DictConfig) -> None:
    path = make_figure(cfg, run_dir())
    print(f"wrote {path} with images/, figure.json and config.yaml")


if __name__ == "__main__":
    main()
