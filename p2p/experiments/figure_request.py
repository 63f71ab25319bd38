"""What a figure run asks for, checked before any model is loaded (minutes for SD): the experiment's prompt set,
the tile size, the seed, the image size, and for the real-image figure its photo. Works on the resolved config as a
plain dict (`scripts/figure.py` passes `OmegaConf.to_container(cfg, resolve=True)`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.errors import UserError, number
from p2p.experiments import figures
from p2p.real.images import load_image
from p2p.real.inversion import check_tolerance_scale

PROMPT_SETS = ("shapes", "paper")
MIN_TILE_SIZE = 8  # px: smaller tiles show nothing


def prompt_set(request: dict) -> dict:
    """The chosen prompt set's builder arguments, checked against the model and the experiment."""
    if request.get("figure") is None:
        raise UserError("no figure chosen: pass experiment=NAME (one of conf/experiment/*.yaml)")
    sets = request.get("prompt_sets") or {}
    if request["prompt_set"] not in PROMPT_SETS or request["prompt_set"] not in sets:
        raise UserError(f"prompt_set={request['prompt_set']!r}; this experiment has {sorted(sets)}")
    if request["prompt_set"] == "paper" and request["model"]["name"] == "tiny" and request["check_model"]:
        raise UserError(
            "prompt_set=paper needs Stable Diffusion weights: model=sd15 model.checkpoint=PATH "
            "(the built-in tiny model only knows the shapes world; use prompt_set=shapes)"
        )
    return dict(sets[request["prompt_set"]])


def size_override(request: dict, name: str) -> int | None:
    """height=/width=: null (the model's size) or a positive integer, named when it is not."""
    value = request.get(name)
    if value is None:
        return None
    value = number(value, name=name, kind=int)
    if value < 1:
        raise UserError(f"{name}={value} is out of range; use a positive number of pixels (or null: the model's size)")
    return value


def checked_overrides(request: dict, params: dict) -> dict:
    """tile_size, height, width and seed (the command line's, else the prompt set's, which leaves `params`),
    and the real-image figure's photo and caption."""
    tile_size = number(request["tile_size"], name="tile_size", kind=int)
    if tile_size < MIN_TILE_SIZE:
        raise UserError(f"tile_size={tile_size} is too small to see; use at least {MIN_TILE_SIZE} px (default 128)")
    set_seed = params.pop("seed", None)
    seed = set_seed if request["seed"] is None else request["seed"]
    if seed is not None:
        seed = number(seed, name="seed", kind=int)
    elif request["figure"] != "real":  # the real-image figure starts from its photo's inversion, not from a seed
        raise UserError(f"prompt set {request['prompt_set']!r} of this experiment names no seed; pass seed=N")
    if request["seed"] is not None and "rows" in params:  # seed= on the command line is every tile's
        params["rows"] = [{k: v for k, v in dict(row).items() if k != "seed"} for row in params["rows"]]
    height, width = size_override(request, "height"), size_override(request, "width")
    if request["figure"] == "real":
        if request.get("image") is None and "scene" not in params:
            raise UserError("the real-image figure needs a photo: pass image=PATH")
        if request.get("image") is not None and params.get("source") is None:
            raise UserError("the real-image figure needs the photo's caption as `source` in the prompt set")
        if request.get("image") is None and (height is not None or width is not None):
            raise UserError(
                "height/width size the photo given as image=PATH; the shapes scene is rendered at "
                "the world's 32 px (drop height/width, or pass image=PATH)"
            )
        check_tolerance_scale(number(request["inversion"]["tolerance_scale"], name="inversion.tolerance_scale"))
    return dict(tile_size=tile_size, height=height, width=width, seed=seed)


def photo(image: str | Path | None, params: dict, *, size: int, height: int | None, width: int | None) -> np.ndarray:
    """The real-image figure's photo, also put into `params`: image=PATH loaded at height×width (default: the
    model's `size`), else the prompt set's rendered scene, whose caption becomes the source."""
    scene = params.pop("scene", None)
    if image is not None:
        params["photo"] = load_image(image, height=height or size, width=width or size)
    else:
        params["photo"], caption = figures.render_scene(**scene)
        params.setdefault("source", caption)
    return params["photo"]
