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

from scripts._cli import entry_point  # noqa: E402
from scripts._common import check_fresh, load_model, number, run_dir, sampler_settings, save_config, save_image  # noqa: E402
from models.errors import UserError  # noqa: E402
from p2p.experiments import figures  # noqa: E402
from p2p.edit import EditSpec  # noqa: E402
from p2p.real.images import load_image  # noqa: E402
from p2p.real.inversion import check_tolerance_scale  # noqa: E402

PROMPT_SETS = ("shapes", "paper")


def prompt_set(cfg: DictConfig) -> dict:
    """The chosen prompt set's builder arguments, checked against the model and the experiment."""
    if cfg.figure is None:
        raise UserError("no figure chosen: pass experiment=NAME (one of conf/experiment/*.yaml)")
    if cfg.prompt_set not in PROMPT_SETS or cfg.prompt_set not in cfg.prompt_sets:
        raise UserError(f"prompt_set={cfg.prompt_set!r}; this experiment has {sorted(cfg.prompt_sets)}")
    if cfg.prompt_set == "paper" and cfg.model.name == "tiny" and cfg.check_model:
        raise UserError("prompt_set=paper needs Stable Diffusion weights: model=sd15 model.checkpoint=PATH "
                         "(the built-in tiny model only knows the shapes world; use prompt_set=shapes)")
    return OmegaConf.to_container(cfg.prompt_sets[cfg.prompt_set], resolve=True)



def size_override(cfg: DictConfig, name: str) -> int | None:
    """height=/width=: null (the model's size) or a positive integer, named when it is not."""
    value = cfg.get(name)
    if value is None:
        return None
    value = number(value, name=name, kind=int)
    if value < 1:
        raise UserError(f"{name}={value} is out of range; use a positive number of pixels (or null: the model's size)")
    return value


def checked_overrides(cfg: DictConfig, params: dict) -> dict:
    """tile_size, height, width and seed (the command line's, else the prompt set's, which leaves `params`),
    and the real-image figure's photo and caption: all checked before the model is loaded (minutes for SD)."""
    tile_size = number(cfg.tile_size, name="tile_size", kind=int)
    if tile_size < 8:
        raise UserError(f"tile_size={tile_size} is too small to see; use at least 8 px (default 128)")
    set_seed = params.pop("seed", None)
    seed = set_seed if cfg.seed is None else cfg.seed
    if seed is not None:
        seed = number(seed, name="seed", kind=int)
    elif cfg.figure != "real":  # the real-image figure starts from its photo's inversion, not from a seed
        raise UserError(f"prompt set {cfg.prompt_set!r} of this experiment names no seed; pass seed=N")
    if cfg.seed is not None and "rows" in params:  # seed= on the command line is every tile's, a row's own included
        params["rows"] = [{k: v for k, v in dict(row).items() if k != "seed"} for row in params["rows"]]
    height, width = size_override(cfg, "height"), size_override(cfg, "width")
    if cfg.figure == "real":
        if cfg.image is None and "scene" not in params:
            raise UserError("the real-image figure needs a photo: pass image=PATH")
        if cfg.image is not None and params.get("source") is None:
            raise UserError("the real-image figure needs the photo's caption as `source` in the prompt set")
        if cfg.image is None and (height is not None or width is not None):
            raise UserError("height/width size the photo given as image=PATH; the shapes scene is rendered at "
                             "the world's 32 px (drop height/width, or pass image=PATH)")
        check_tolerance_scale(number(cfg.inversion.tolerance_scale, name="inversion.tolerance_scale"))
    return dict(tile_size=tile_size, height=height, width=width, seed=seed)


def add_photo(cfg: DictConfig, params: dict, *, size: int, height: int | None, width: int | None, out: Path) -> None:
    """The real-image figure's photo into `params` (and photo.png): image=PATH loaded at height×width (default:
    the model's `size`), else the prompt set's rendered scene, whose caption is the source."""
    scene = params.pop("scene", None)
    if cfg.image is not None:
        params["photo"] = load_image(cfg.image, height=height or size, width=width or size)
    else:
        params["photo"], caption = figures.render_scene(**scene)
        params.setdefault("source", caption)
    save_image(params["photo"], out / "photo.png")


def make_figure(cfg: DictConfig, out: Path) -> Path:
    """Build the experiment's figure and save it with its tiles and the resolved config into `out`."""
    params = prompt_set(cfg)
    check_fresh(out, what="a figure")
    overrides = checked_overrides(cfg, params)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    model = load_model(cfg)
    settings = sampler_settings(cfg, model)
    common = dict(title=cfg.title, spec=EditSpec(**OmegaConf.to_container(cfg.edit, resolve=True)),
                  settings=settings, **overrides)
    size = model.config.image_size
    if cfg.figure == "real":
        add_photo(cfg, params, size=size, height=overrides["height"], width=overrides["width"], out=out)
        common.update(inner_steps=cfg.inversion.inner_steps, null_init=cfg.inversion.init,
                      tolerance_scale=number(cfg.inversion.tolerance_scale, name="inversion.tolerance_scale"),
                      cache_dir=cfg.cache_dir)
    figure = figures.build(cfg.figure, model, params, **common)
    image_height, image_width = (params["photo"].shape[:2] if cfg.figure == "real" else
                                 (overrides["height"] or size, overrides["width"] or size))
    figure.settings = {"seed": overrides["seed"], "steps": settings.steps, "guidance": settings.guidance,
                       "height": image_height, "width": image_width, "prompt_set": cfg.prompt_set}
    path = figure.save(out, tile_size=overrides["tile_size"])
    save_config(cfg, out)
    return path


@entry_point("figure")
def main(cfg: DictConfig) -> None:
    path = make_figure(cfg, run_dir())
    print(f"wrote {path} with images/, figure.json and config.yaml")


if __name__ == "__main__":
    main()
