"""Prompt-to-Prompt editing from a few settings: build the controllers for one run and run it.

    result = edit(model, ["a cat riding a bicycle", "a cat riding a car"], seed=8,
                  spec=EditSpec(kind="replace", cross_replace_steps=0.8, self_replace_steps=0.4))

`EditSpec`, `BlendSpec` and `StoreSpec` are the schemas of the `edit=`, `blend=` and `store` config groups.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from models.errors import UserError
from models.flow_model import FlowModel
from models.stable_diffusion import StableDiffusion
from models.text import clip_tokenizer
from p2p.blend import DEFAULT_DILATION, DEFAULT_THRESHOLD, LocalBlend
from p2p.controllers import (
    AttentionEdit,
    AttentionStore,
    Compose,
    Controller,
    LayerFilter,
    grid_at,
    max_queries_at_fraction,
)
from p2p.pipeline import SamplerSettings, decode, image_size, initial_latent, sample
from p2p.real.inversion import restore_outside_mask, source_on_trajectory
from p2p.schedules import DEFAULT_KEY, cross_alphas, named_step_range
from p2p.tokens import CONTEXT_LENGTH, check_prompts, has_word, refine_alignments, replace_mappers, token_scales

EDIT_KINDS = ("replace", "refine", "reweight", "none")


@dataclass
class EditSpec:
    kind: str = "replace"  # replace (word swap) | refine (add/change phrases) | reweight (fader alone) | none (no edit)
    cross_replace_steps: Any = 0.8  # f, (start, end), or {word: f | (start, end), "default_": …}
    self_replace_steps: Any = 0.4  # f or (start, end)
    # Self maps are injected only in layers with few queries: side ≤ latent side × fraction (official SD
    # notebook 1/4 → 16² at 512 px; null-text notebook 1/2 → 32²), or ≤ `self_max_side`² when that is set.
    self_max_fraction: float = 0.25
    self_max_side: int | None = None
    reweight: dict = field(
        default_factory=dict
    )  # {word: c} for all targets, or {word: [c per target]} (1: target lacks it)
    preserve: list = field(default_factory=list)  # object preservation (Fig. 5): only these words' maps inject


@dataclass
class BlendSpec:
    words: list = field(default_factory=list)  # per prompt [[src words], [tgt words], …], or one list for all
    threshold: float = DEFAULT_THRESHOLD
    dilation: int = DEFAULT_DILATION
    start: float = 0.0  # fraction of the run before blending starts (null-text notebook: 0.2)
    subtract_words: list = field(default_factory=list)  # same forms as `words`
    subtract_threshold: float = DEFAULT_THRESHOLD
    resolution_downsamplings: int | None = None  # None = latent/4 (SD) clipped to the model's deepest level
    # After decoding, copy the source's pixels outside the (upsampled) last mask into each target, as the
    # Fig. 12 path does with the photo: the latent blend keeps latents, but a decoder spreads any change.
    restore_pixels: bool = False


@dataclass
class StoreSpec:
    kinds: tuple = ("cross", "hybrid")  # which layers to record
    max_fraction: float = 0.5  # record layers with side ≤ latent side × this (the reference: 32² at 512 px)
    per_step: bool = False  # also keep each step's maps (Fig. 4 per-step rows)


@dataclass
class EditResult:
    images: np.ndarray  # uint8 (P, H, W, 3), source first
    latents: torch.Tensor  # (P, 4, h, w)
    store: AttentionStore | None
    blend: LocalBlend | None


def _per_prompt(value: Sequence, prompts: Sequence[str], what: str) -> list[list[str]]:
    """`["cat"]` → the same words for every prompt; `[["cat"], ["dog"]]` → one list per prompt.

    The reference's `LocalBlend(prompts, ("cat", "dog"))` meant one word per prompt: a flat list with a word
    missing from some prompt raises, pointing to the per-prompt form.
    """
    if not value:
        return [[] for _ in prompts]
    if all(isinstance(v, str) for v in value):
        for word in value:
            missing = [p for p in prompts if not has_word(p, word)]
            if missing:
                raise UserError(
                    f"{what}: word {word!r} is not in prompt {missing[0]!r}; a flat list applies to every "
                    f"prompt — for one word per prompt give one list per prompt, e.g. "
                    f"{[[w] for w in value]}"
                )
        return [list(value) for _ in prompts]
    if len(value) != len(prompts):
        raise UserError(
            f"{what} has {len(value)} lists for {len(prompts)} prompts; give one list per prompt "
            "or one flat list for all"
        )
    return [[v] if isinstance(v, str) else list(v) for v in value]


def _reweight_scales(reweight: Mapping, targets: Sequence[str], context_length: int) -> torch.Tensor:
    """(T, L) scales: one per (target prompt, word) — P2P_SPEC §9.3.

    A target that lacks the word may give it the scale 1 (nothing to scale there), so that with several
    targets each can fade its own word: `{"dog": [2, 1]}` for targets "a dog …" and "a horse …".
    """
    rows = []
    for t, target in enumerate(targets):
        per_target = {}
        for word, scale in reweight.items():
            if isinstance(scale, Sequence) and not isinstance(scale, str):
                if len(scale) != len(targets):
                    raise UserError(
                        f"reweight for {word!r} has {len(scale)} values for {len(targets)} targets; "
                        "give one number for all or one per target prompt"
                    )
                scale = scale[t]
            if isinstance(scale, bool) or not isinstance(scale, (int, float)):
                raise UserError(f"reweight for {word!r} must be a number (or one per target prompt), got {scale!r}")
            if scale == 1 and not has_word(target, word):
                continue
            per_target[word] = float(scale)
        rows.append(token_scales(target, per_target, context_length=context_length))
    return torch.stack(rows)


def self_max_queries(spec: EditSpec, latent_hw: tuple[int, int]) -> int:
    if spec.self_max_side is not None:
        side = spec.self_max_side
        if isinstance(side, bool) or not isinstance(side, int) or side < 1:
            raise UserError(
                f"self_max_side={side!r} must be a positive int (a query grid side, in latent pixels); "
                "to inject no self-attention set self_replace_steps=0"
            )
        return side**2
    return max_queries_at_fraction(latent_hw, spec.self_max_fraction)


def build_edit(
    spec: EditSpec,
    prompts: Sequence[str],
    *,
    num_steps: int,
    latent_hw: tuple[int, int],
    context_length: int = CONTEXT_LENGTH,
) -> AttentionEdit:
    """The edit controller; `context_length` = the model's text positions (`model.context_length`)."""
    if spec.kind not in EDIT_KINDS:
        raise UserError(f"edit kind {spec.kind!r} is not supported; choose one of {EDIT_KINDS}")
    prompts = check_prompts(prompts, context_length=context_length)
    source, targets = prompts[0], list(prompts[1:])
    if not targets:
        raise UserError(f"edit kind {spec.kind!r} needs a source and at least one target prompt; got {list(prompts)}")
    if spec.kind == "reweight" and not spec.reweight:
        raise UserError(
            "edit kind 'reweight' needs the words to scale: reweight={word: scale} "
            "(scripts: edit.reweight={red: 3}); without them the edit does nothing"
        )
    schedule = spec.cross_replace_steps
    if spec.preserve:  # Fig. 5: only the named words' maps are injected
        window = schedule if not isinstance(schedule, Mapping) else schedule.get(DEFAULT_KEY, 1.0)
        schedule = {DEFAULT_KEY: 0.0, **{w: window for w in spec.preserve}}
    kwargs = {}
    kind = spec.kind
    if kind == "replace":
        kwargs["mapper"] = replace_mappers(source, targets, context_length=context_length)
    elif kind == "refine":
        kwargs["mapper"], kwargs["refine_alphas"] = refine_alignments(source, targets, context_length=context_length)
    else:  # reweight alone / none: source maps go to targets token by token, so the tokens must line up
        # the same tokens, not the same spelling: CLIP lowercases, so "A red circle" is "a red circle"
        source_ids = clip_tokenizer().encode(source)
        different = [t for t in targets if clip_tokenizer().encode(t) != source_ids]
        if different:
            raise UserError(
                f"edit kind {kind!r} (no base edit) needs targets equal to the source {source!r}; "
                f"{different[0]!r} differs — use edit=refine (or replace), with edit.reweight for a fader"
            )
        kind = "none"
    if spec.reweight:
        kwargs["reweight"] = _reweight_scales(spec.reweight, targets, context_length)
    return AttentionEdit(
        num_prompts=len(prompts),
        kind=kind,
        cross_alphas=cross_alphas(schedule, targets=targets, num_steps=num_steps, context_length=context_length),
        self_steps=named_step_range(spec.self_replace_steps, num_steps, "self_replace_steps"),
        self_max_queries=self_max_queries(spec, latent_hw),
        **kwargs,
    )


BLEND_DOWNSAMPLINGS = 2  # latent/4: SD's 16×16 cross-attention layers at 512 px (official LocalBlend)
# The blend mask is max-pooled 3×3 (dilation) on its grid: on a grid under 8 cells a side one cell grows to
# over a third of the image, so the mask cannot keep anything. SD at 512 px: latent/4 = 16 (the reference);
# the tiny model's 8×8 latent: its 8×8 cross layers instead of the 2×2 at latent/4.
MIN_BLEND_SIDE = 8


def default_blend_downsamplings(model: StableDiffusion, latent_hw: tuple[int, int]) -> int:
    """latent/4 as in the reference (SDXL at 1024 px: its 32² layers), among the levels that have text
    attention (SDXL has none at full resolution); a grid under MIN_BLEND_SIDE on a side gives way to the next
    finer level that has attention. Resolution-agnostic: derived from the model and the image size."""
    unet = model.config.unet
    levels = [d for d in range(len(unet.channel_mult)) if 2**d in unet.attention_resolutions and unet.depth_at(d) > 0]
    if not levels:
        raise UserError(f"model {model.config.name!r} has no text attention, so LocalBlend has no maps to read")
    candidates = [d for d in levels if d <= BLEND_DOWNSAMPLINGS] or levels[:1]
    wide_enough = [d for d in candidates if min(grid_at(latent_hw, d)) >= MIN_BLEND_SIDE]
    return max(wide_enough) if wide_enough else min(candidates)


def build_blend(
    spec: BlendSpec,
    prompts: Sequence[str],
    *,
    num_steps: int,
    latent_hw: tuple[int, int],
    downsamplings: int,
    context_length: int = CONTEXT_LENGTH,
) -> LocalBlend:
    prompts = check_prompts(prompts, context_length=context_length)
    return LocalBlend(
        prompts=prompts,
        words=_per_prompt(spec.words, prompts, "blend.words"),
        latent_hw=latent_hw,
        num_steps=num_steps,
        threshold=spec.threshold,
        dilation=spec.dilation,
        start_step=named_step_range(spec.start, num_steps, "blend start").stop,
        subtract_words=_per_prompt(spec.subtract_words, prompts, "blend.subtract_words"),
        subtract_threshold=spec.subtract_threshold,
        resolution_downsamplings=downsamplings
        if spec.resolution_downsamplings is None
        else spec.resolution_downsamplings,
        context_length=context_length,
    )


def build_store(spec: StoreSpec, *, num_prompts: int, latent_hw: tuple[int, int]) -> AttentionStore:
    max_queries = max_queries_at_fraction(latent_hw, spec.max_fraction)
    return AttentionStore(
        num_prompts=num_prompts,
        per_step=spec.per_step,
        layers=LayerFilter(kinds=tuple(spec.kinds), max_queries=max_queries),
    )


def build_controllers(
    model: StableDiffusion,
    prompts: Sequence[str],
    *,
    spec: EditSpec | None,
    blend: BlendSpec | None,
    store: StoreSpec | None,
    num_steps: int,
    latent_hw: tuple[int, int],
) -> tuple[AttentionStore | None, LocalBlend | None, Controller | None]:
    """The recorder, the blend and the one controller that runs them with the edit. Every check of the
    prompts against the edit (word counts of a replace, blend words, reweight words) happens here, so callers
    with slow work before sampling (an inversion) can call this first to fail fast."""
    prompts = check_prompts(prompts, context_length=model.context_length)
    if not prompts:
        raise UserError("edit needs at least one prompt (the source)")
    if spec is not None and spec.kind == "none" and (spec.reweight or spec.preserve):
        raise UserError(
            f"edit kind 'none' edits nothing, so reweight={spec.reweight} / preserve={spec.preserve} "
            "would be ignored; use kind 'reweight' (identical prompts), 'replace' or 'refine'"
        )
    recorder = build_store(store, num_prompts=len(prompts), latent_hw=latent_hw) if store else None
    blender = (
        build_blend(
            blend,
            prompts,
            num_steps=num_steps,
            latent_hw=latent_hw,
            downsamplings=default_blend_downsamplings(model, latent_hw),
            context_length=model.context_length,
        )
        if blend and blend.words
        else None
    )
    controllers: list[Controller] = [c for c in (recorder, blender) if c is not None]  # recorders first: unedited maps
    if spec is not None and spec.kind != "none":
        controllers.append(
            build_edit(spec, prompts, num_steps=num_steps, latent_hw=latent_hw, context_length=model.context_length)
        )
    return recorder, blender, Compose(controllers) if controllers else None


def _chain(callbacks):
    """Latent callbacks applied in order (None when there are none: the loop then skips the call)."""
    if not callbacks:
        return None

    def chained(step: int, latents: torch.Tensor) -> torch.Tensor:
        for callback in callbacks:
            latents = callback(step, latents)
        return latents

    return chained


def edit(
    model: StableDiffusion | FlowModel,
    prompts: Sequence[str],
    *,
    seed: int | None = None,
    latent: torch.Tensor | None = None,
    spec: EditSpec | None = None,
    blend: BlendSpec | None = None,
    store: StoreSpec | None = None,
    settings: SamplerSettings | None = None,
    height: int | None = None,
    width: int | None = None,
    uncond_embeddings: Sequence[torch.Tensor] | None = None,
    source_trajectory: Sequence[torch.Tensor] | None = None,
    progress: bool = True,
) -> EditResult:
    """Generate `prompts` (source first) from one shared x_T with the edit `spec` (None: no edit, plain sampling).

    `source_trajectory`: a DDIM inversion's z_0 … z_T (Direct Inversion): the source branch is put back on it
    after every step, before the LocalBlend (so the targets' background is blended from the true trajectory).
    A flow model (SD3 / SD3.5 / FLUX.1) runs `p2p.joint_edit.edit_flow` with the default `JointSpec`, so code written
    for the UNet (the shapes-world studies, notebooks) edits joint attention unchanged.
    """
    if isinstance(model, FlowModel):
        from p2p.joint_edit import edit_as_unet  # here, not on top: p2p.joint_edit builds on this module

        arguments = {k: v for k, v in locals().items() if k not in ("model", "prompts", "edit_as_unet")}
        return edit_as_unet(model, prompts, **arguments)
    settings = settings or SamplerSettings(guidance=model.config.guidance)
    height, width = image_size(model, height, width)
    if latent is None:
        if seed is None:
            raise UserError("edit needs a seed or an initial latent")
        latent = initial_latent(
            seed,
            height=height,
            width=width,
            latent_factor=model.config.latent_factor,
            multiple=model.config.size_multiple,
        )
    recorder, blender, controller = build_controllers(
        model,
        prompts,
        spec=spec,
        blend=blend,
        store=store,
        num_steps=settings.steps,
        latent_hw=tuple(latent.shape[-2:]),
    )
    prompts = list(prompts)
    callbacks = []
    if source_trajectory is not None:
        if len(source_trajectory) != settings.steps + 1:
            raise UserError(
                f"source_trajectory has {len(source_trajectory)} latents for steps={settings.steps}; "
                f"Direct Inversion needs the inversion's z_0 … z_T, {settings.steps + 1} latents"
            )
        callbacks.append(source_on_trajectory(source_trajectory))
    if blender is not None:
        callbacks.append(blender.blend_latents)
    latents = sample(
        model,
        prompts,
        latent=latent,
        settings=settings,
        controller=controller,
        latent_callback=_chain(callbacks),
        uncond_embeddings=uncond_embeddings,
        progress=progress,
    )
    images = decode(model, latents)
    if blender is not None and blend.restore_pixels and blender.last_mask is not None:
        images[1:] = [
            restore_outside_mask(image, images[0], mask) for image, mask in zip(images[1:], blender.last_mask[1:])
        ]
    return EditResult(images=images, latents=latents, store=recorder, blend=blender)
