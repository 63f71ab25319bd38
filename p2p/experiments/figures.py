"""The paper's figures as functions of a model and a few prompts (Hertz et al. 2022, Figs. 2, 4-10, 12).

Each builder runs the edits a figure needs and returns a `Figure` (figure_canvas.py): rows of captioned tiles
with a label on the left of each row, like the paper's layouts.

    rows_figure            Figs. 2, 5, 7, 8: one row per edit variant (no injection, replace, refine, preserve, blend)
    attention_figure       Fig. 4: per-word cross-attention averaged over steps, and chosen words step by step
    injection_sweep_figure Fig. 6: one row per word swap, one column per injected fraction of the steps
    fader_figure           Fig. 9: one row per (prompt, word), one column per reweight scale c
    real_image_figure      Figs. 10-12: inversion, reconstruction, edits, attention mask restoring the photo

`build(kind, model, params, ...)` picks the builder by name and checks `params` against its arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np

from models.errors import UserError
from models.flow_model import FlowModel
from models.stable_diffusion import StableDiffusion
from p2p import views
from p2p.controllers import grid_at
from p2p.edit import BlendSpec, EditSpec, StoreSpec, build_controllers, edit
from p2p.experiments.figure_canvas import Figure, Tile
from p2p.joint_edit import JointSpec, build_flow_controllers
from p2p.pipeline import SamplerSettings, decode, image_size, sample
from p2p.real.cache import cached_invert
from p2p.real.inversion import (
    INVERSION_METHODS,
    psnr,
    restore_outside_mask,
    source_on_trajectory,
    vae_reconstruction,
)
from p2p.shapes.world import WorldConfig, sample_scene
from p2p.tokens import word_token_positions, words

NO_INJECTION = "none"  # a row's `edit: none` = same-seed sampling without any attention edit


def _image_tiles(images: np.ndarray, prompts: Sequence[str]) -> list[Tile]:
    return [Tile(image, prompt, prompt) for image, prompt in zip(images, prompts)]


def _blend_spec(blend: Sequence | dict | None) -> BlendSpec | None:
    """A row's `blend`: BlendSpec.words forms (a word list, or one list per prompt), or a dict of BlendSpec fields."""
    if not blend:
        return None
    return BlendSpec(**blend) if isinstance(blend, dict) else BlendSpec(words=list(blend))


def _spec_with(spec: EditSpec, overrides: dict | str | None) -> EditSpec | None:
    """`spec` with a row's overrides; `"none"` = no edit (same-seed sampling)."""
    if overrides == NO_INJECTION:
        return None
    overrides = dict(overrides or {})
    unknown = set(overrides) - {f.name for f in dataclasses.fields(EditSpec)}
    if unknown:
        raise UserError(
            f"edit overrides {sorted(unknown)} are not EditSpec fields; "
            f"accepted: {[f.name for f in dataclasses.fields(EditSpec)]}"
        )
    return dataclasses.replace(spec, **overrides)


# ----------------------------------------------------------------------------- builders


def _check_edits(
    model: StableDiffusion, runs: Sequence[dict], *, settings: SamplerSettings, height: int | None, width: int | None
) -> None:
    """Build (and drop) each run's controllers before any sampling: a bad prompt, word or window in the last
    row of a figure then fails in a second, not after every earlier row was drawn (minutes on SD)."""
    size = image_size(model, height, width)
    model.config.check_image_size(height=size[0], width=size[1])
    latent_hw = (size[0] // model.config.latent_factor, size[1] // model.config.latent_factor)
    build = build_controllers
    if isinstance(model, FlowModel):  # SD3 / FLUX: the joint-attention controllers `p2p.edit.edit` will run
        build = functools.partial(build_flow_controllers, joint=JointSpec())
    for run in runs:
        build(
            model,
            run["prompts"],
            spec=run.get("spec"),
            blend=run.get("blend"),
            store=None,
            num_steps=settings.steps,
            latent_hw=latent_hw,
        )


def rows_figure(
    model: StableDiffusion,
    *,
    title: str,
    spec: EditSpec,
    settings: SamplerSettings,
    seed: int,
    rows: Sequence[dict],
    source: str | None = None,
    targets: Sequence[str] = (),
    height: int | None = None,
    width: int | None = None,
) -> Figure:
    """Figs. 2, 5, 7, 8: each row is one `edit` run of its source and targets (defaults: the figure's).

    A row is `{label, source?, targets?, seed?, edit?: {EditSpec field: value} | "none", blend?}`; `blend` is
    a word list in BlendSpec.words forms (one list for all prompts, or one per prompt) or a dict of BlendSpec fields.
    """
    if not rows:
        raise UserError("a rows figure needs at least one row: rows: [{label: ..., edit: ...}, ...]")
    runs = []
    for number, row in enumerate(rows, start=1):
        row = dict(row)
        if "label" not in row:
            raise UserError(f"row {number} ({row}) has no label; every row needs `label: text shown on its left`")
        label, row_source, row_targets = row.pop("label"), row.pop("source", source), row.pop("targets", targets)
        row_spec, blend = _spec_with(spec, row.pop("edit", None)), _blend_spec(row.pop("blend", None))
        row_seed = row.pop("seed", seed)
        if row:
            raise UserError(
                f"row {label!r} has unknown keys {sorted(row)}; accepted: label, source, targets, seed, edit, blend"
            )
        if row_source is None or not row_targets:
            raise UserError(f"row {label!r} needs a source and at least one target prompt")
        runs.append(dict(label=label, prompts=[row_source, *row_targets], spec=row_spec, blend=blend, seed=row_seed))
    _check_edits(model, runs, settings=settings, height=height, width=width)
    figure = Figure(title)
    for run in runs:
        result = edit(
            model,
            run["prompts"],
            seed=run["seed"],
            spec=run["spec"],
            blend=run["blend"],
            settings=settings,
            height=height,
            width=width,
            progress=False,
        )
        figure.add_row(run["label"], _image_tiles(result.images, run["prompts"]))
    return figure


def attention_figure(
    model: StableDiffusion,
    *,
    title: str,
    spec: EditSpec,
    settings: SamplerSettings,
    seed: int,
    prompt: str,
    words_over_steps: Sequence[str],
    steps_shown: int = 6,
    downsamplings: Sequence[int] | None = None,
    store_max_fraction: float = 0.5,
    tile_size: int = 128,
    height: int | None = None,
    width: int | None = None,
) -> Figure:
    """Fig. 4: the image and every word's cross-attention map averaged over steps, then chosen words' maps at
    `steps_shown` evenly spaced steps. A word split into several tokens shows their summed maps; a word that
    occurs twice gets a tile per occurrence. `downsamplings` = which layers to average, as latent side / 2^d (SD at
    512 px: [2] = the reference's 16×16 view; None: every recorded layer, upsampled to the largest); the store
    records layers up to latent side × `store_max_fraction`."""
    del spec  # no edit: the maps of plain sampling
    for word in words_over_steps:  # before sampling: a word missing from the prompt raises, naming the prompt's words
        word_token_positions(prompt, word, context_length=model.context_length)
    if not isinstance(steps_shown, int) or steps_shown < 1:
        raise UserError(f"steps_shown={steps_shown!r}; show at least 1 step")
    store = StoreSpec(kinds=("cross", "hybrid"), max_fraction=store_max_fraction, per_step=True)
    result = edit(
        model, [prompt], seed=seed, store=store, settings=settings, height=height, width=width, progress=False
    )
    latent_hw = tuple(result.latents.shape[-2:])
    grids = [grid_at(latent_hw, d) for d in downsamplings] if downsamplings is not None else None
    average = views.token_maps(result.store, 0, grids=grids)
    figure = Figure(title)
    tiles = [Tile(result.images[0], prompt, prompt)]
    tiles += [
        Tile(views.heat(views.word_map(average, prompt, index), size=tile_size), w, f"average_{w}")
        for index, w in enumerate(words(prompt))
    ]  # by index: each 'a' of 'a cat and a dog' its own map
    figure.add_row("image; each word's map averaged over all steps", tiles)
    count = min(steps_shown, settings.steps)
    shown = sorted({round(i * (settings.steps - 1) / max(count - 1, 1)) for i in range(count)})
    per_step = {s: views.token_maps(result.store, 0, grids=grids, step=s) for s in shown}
    for w in words_over_steps:
        figure.add_row(
            f"'{w}' over the steps (first to last)",
            [
                Tile(
                    views.heat(views.word_map(per_step[s], prompt, w), size=tile_size),
                    f"step {s + 1}/{settings.steps}",
                    f"{w}_step{s + 1:03d}",
                )
                for s in shown
            ],
        )
    return figure


def injection_sweep_figure(
    model: StableDiffusion,
    *,
    title: str,
    spec: EditSpec,
    settings: SamplerSettings,
    seed: int,
    source: str,
    targets: Sequence[str],
    fractions: Sequence[float],
    height: int | None = None,
    width: int | None = None,
) -> Figure:
    """Fig. 6: columns inject the source's cross-attention maps during the first f of the steps (0: none)."""
    if not fractions or not targets:
        raise UserError(
            f"an injection sweep needs fractions and targets; got fractions={list(fractions)}, targets={list(targets)}"
        )
    prompts = [source, *targets]
    specs = [dataclasses.replace(spec, cross_replace_steps=float(f)) for f in fractions]
    _check_edits(model, [dict(prompts=prompts, spec=s) for s in specs], settings=settings, height=height, width=width)
    columns = [
        edit(model, prompts, seed=seed, spec=s, settings=settings, height=height, width=width, progress=False).images
        for s in specs
    ]
    figure = Figure(title)
    figure.add_row("source", [Tile(columns[0][0], source, source)])
    for t, target in enumerate(targets, start=1):
        figure.add_row(
            target,
            [Tile(images[t], f"cross {f:.0%}", f"{target}_cross{f:.2f}") for f, images in zip(fractions, columns)],
        )
    return figure


def fader_figure(
    model: StableDiffusion,
    *,
    title: str,
    spec: EditSpec,
    settings: SamplerSettings,
    seed: int,
    rows: Sequence[dict],
    values: Sequence[float],
    height: int | None = None,
    width: int | None = None,
) -> Figure:
    """Fig. 9: per row `{prompt, word, seed?}`, the prompt regenerated with the word's attention scaled by each c."""
    if not rows or not values:
        raise UserError(
            f"a fader figure needs rows ({{prompt, word}}) and values of c; got rows={list(rows)}, "
            f"values={list(values)}"
        )
    runs = []
    for row in rows:
        row = dict(row)
        prompt, word, row_seed = row.pop("prompt", None), row.pop("word", None), row.pop("seed", seed)
        if not isinstance(prompt, str) or not isinstance(word, str) or row:
            raise UserError(
                f"a fader row is {{prompt: text, word: one of its words, seed?: int}}; got "
                f"{dict(prompt=prompt, word=word, **row)}"
            )
        runs.append(
            dict(
                prompt=prompt,
                word=word,
                seed=row_seed,
                prompts=[prompt] * (1 + len(values)),
                spec=dataclasses.replace(spec, reweight={word: [float(c) for c in values]}),
            )
        )
    _check_edits(model, runs, settings=settings, height=height, width=width)
    figure = Figure(title)
    for run in runs:
        prompt, word = run["prompt"], run["word"]
        result = edit(
            model,
            run["prompts"],
            seed=run["seed"],
            spec=run["spec"],
            settings=settings,
            height=height,
            width=width,
            progress=False,
        )
        tiles = [Tile(result.images[0], "source", f"{prompt}_source")]
        tiles += [
            Tile(image, f"{word}: c = {c:g}", f"{prompt}_{word}_c{c:g}") for image, c in zip(result.images[1:], values)
        ]
        figure.add_row(f"{prompt}: reweight '{word}'", tiles)
    return figure


def render_scene(*, seed: int, objects: Sequence[Sequence[str]], background: str) -> tuple[np.ndarray, str]:
    """A shapes-world 'photo' with a random layout and its caption (the background always named)."""
    scene = sample_scene(
        np.random.default_rng(seed),
        objects=[tuple(o) for o in objects],
        background=background,
        mention_background=True,
        config=WorldConfig(),
    )
    return scene.image, scene.caption


def real_image_figure(
    model: StableDiffusion,
    *,
    title: str,
    spec: EditSpec,
    settings: SamplerSettings,
    photo: np.ndarray,
    source: str,
    targets: Sequence[str],
    methods: Sequence[str] = ("null_text", "ddim"),
    blend: Sequence | dict | None = None,
    inner_steps: int = 10,
    null_init: str = "empty",
    tolerance_scale: float = 1.0,
    cache_dir: str | None = None,
    tile_size: int = 128,
) -> Figure:
    """Figs. 10-12: invert the photo with each method, reconstruct it, edit it; with `blend` words, the Fig. 12
    path: the LocalBlend mask of the first method's edit and the photo restored outside that mask. `blend` takes
    the forms of a `rows_figure` row's."""
    prompts = [source, *targets]
    unknown = [m for m in methods if m not in INVERSION_METHODS]
    if not methods or unknown:
        raise UserError(f"methods={list(methods)}; choose one or more of {INVERSION_METHODS}")
    # the edits' prompts, words and windows are checked before the inversions, which take the time
    _check_edits(
        model,
        [dict(prompts=prompts, spec=spec, blend=_blend_spec(blend))],
        settings=settings,
        height=photo.shape[0],
        width=photo.shape[1],
    )
    figure = Figure(title)
    vae = vae_reconstruction(model, photo)
    reconstruction_tiles = [
        Tile(photo, "photo", "photo"),
        Tile(vae, f"VAE only: {psnr(vae, photo):.1f} dB", "vae_reconstruction"),
    ]
    figure.metrics["psnr_vae"] = round(psnr(vae, photo), 3)
    inversions = {}
    for method in methods:
        inversion, _ = cached_invert(
            model,
            photo,
            source,
            cache_dir=cache_dir,
            method=method,
            settings=settings,
            inner_steps=inner_steps,
            null_init=null_init,
            tolerance_scale=tolerance_scale,
            progress=False,
        )
        inversions[method] = inversion
        trajectory = inversion.source_trajectory  # Direct Inversion: the source rides the inversion trajectory
        image = decode(
            model,
            sample(
                model,
                [source],
                latent=inversion.x_T,
                settings=settings,
                uncond_embeddings=inversion.uncond_embeddings,
                progress=False,
                latent_callback=source_on_trajectory(trajectory) if trajectory else None,
            ),
        )[0]
        figure.metrics[f"psnr_{method}"] = round(psnr(image, photo), 3)
        reconstruction_tiles.append(Tile(image, f"{method}: {psnr(image, photo):.1f} dB", f"{method}_reconstruction"))
    figure.add_row("reconstruction (PSNR to the photo)", reconstruction_tiles)
    for method, inversion in inversions.items():
        result = edit(
            model,
            prompts,
            latent=inversion.x_T,
            spec=spec,
            settings=settings,
            uncond_embeddings=inversion.uncond_embeddings,
            source_trajectory=inversion.source_trajectory,
            progress=False,
        )
        figure.add_row(f"{method} inversion + P2P", _image_tiles(result.images, prompts))
    if blend:
        inversion = inversions[methods[0]]
        result = edit(
            model,
            prompts,
            latent=inversion.x_T,
            spec=spec,
            settings=settings,
            blend=_blend_spec(blend),
            uncond_embeddings=inversion.uncond_embeddings,
            source_trajectory=inversion.source_trajectory,
            progress=False,
        )
        masks = result.blend.last_mask  # (P, 1, h, w); row 0 (the source) is unused
        figure.add_row(
            "LocalBlend mask: the edited words' attention",
            [
                Tile(views.heat(masks[t, 0], size=tile_size), f"mask: {target}", f"mask_{target}")
                for t, target in enumerate(targets, start=1)
            ],
        )
        figure.add_row(
            "edit inside the mask, photo restored outside (Fig. 12)",
            [
                Tile(restore_outside_mask(result.images[t], photo, masks[t]), target, f"restored_{target}")
                for t, target in enumerate(targets, start=1)
            ],
        )
    return figure


FIGURE_KINDS = {
    "rows": rows_figure,
    "attention": attention_figure,
    "injection_sweep": injection_sweep_figure,
    "fader": fader_figure,
    "real": real_image_figure,
}


UNET_ONLY_FIGURES = {"attention", "real"}  # per-layer CLIP-token views and DDIM inversion


def build(kind: str, model: StableDiffusion | FlowModel, params: dict[str, Any], **common) -> Figure:
    """Run the builder `kind` with a prompt set's `params` plus `common` (title, spec, settings, …).

    Only the arguments a builder declares are passed from `common`; unknown `params` raise with the accepted names.
    """
    if kind not in FIGURE_KINDS:
        raise UserError(f"figure kind {kind!r} is not known; choose one of {sorted(FIGURE_KINDS)}")
    builder = FIGURE_KINDS[kind]
    if isinstance(model, FlowModel) and kind in UNET_ONLY_FIGURES:
        raise UserError(
            f"figure {kind!r} runs on the UNet models only (it reads CLIP-only maps or inverts a photo); "
            f"flow models ({model.config.name}) draw the other figures: {sorted(set(FIGURE_KINDS) - UNET_ONLY_FIGURES)}"
        )
    accepted = [name for name in inspect.signature(builder).parameters if name != "model"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise UserError(f"figure {kind!r} does not take {unknown}; it takes {accepted}")
    passed = {k: v for k, v in common.items() if k in accepted}
    required = [
        name
        for name, parameter in inspect.signature(builder).parameters.items()
        if name != "model" and parameter.default is inspect.Parameter.empty
    ]
    missing = [name for name in required if name not in params and name not in passed]
    if missing:
        raise UserError(f"figure {kind!r} needs {missing} in its prompt set; it takes {accepted}")
    return builder(model, **passed, **params)
