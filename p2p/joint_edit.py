"""Prompt-to-Prompt on SD3 / SD3.5 / FLUX.1 from a few settings: the controllers for one run, and the run.

    result = edit_flow(model, ["a cat riding a bicycle", "a cat riding a car"], seed=8,
                       spec=EditSpec(kind="replace"), joint=JointSpec(renorm="rescale"))

The edit settings are the UNet's (`p2p.edit.EditSpec`, `BlendSpec`, `StoreSpec`: the `edit=` and `blend=`
config groups); `JointSpec` holds what only joint attention has (the `joint=` config group). The defaults are a
first reasoned choice; the measured ones will come from the ground-truth table on `tiny_mmdit` (issue 33).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from models.errors import UserError
from models.flow_model import FlowConditioning, FlowModel
from p2p.controllers import Compose, Controller
from p2p.edit import EDIT_KINDS, BlendSpec, EditResult, EditSpec, StoreSpec
from p2p.flow import FlowSamplerSettings, conditioning, decode, initial_noise, sample
from p2p.joint import DEFAULT_QUERY_CHUNK, JointEdit, select_blocks
from p2p.joint_maps import JointBlend, JointStore, blend_words
from p2p.joint_tokens import JointWords
from p2p.real.inversion import restore_outside_mask
from p2p.schedules import DEFAULT_KEY, cross_alphas, named_step_range


@dataclass
class JointSpec:
    renorm: str = "rescale"  # probs | logits | rescale: how an edited softmax row is made whole again
    blocks: Any = "all"  # blocks whose image→text maps are edited: all | double | single | [indices or names]
    self_blocks: Any = None  # blocks whose image→image maps are injected in the self window (None: = blocks)
    text_rows: bool = False  # also inject the source's text→image rows for aligned tokens (cross window)
    pooled: bool = False  # give the targets the source's pooled vector (adaLN modulation) in the cross window
    query_chunk: int = DEFAULT_QUERY_CHUNK  # query rows per slice of a joint map (0: the whole map at once)
    store_blocks: Any = "all"  # blocks whose head-averaged image→text maps the views and LocalBlend read


def joint_reweight(reweight: Mapping, targets: Sequence[str], words: JointWords) -> torch.Tensor:
    """(T, L) scales over the joint text columns: one per (target, word) in every segment (P2P_SPEC §9.3)."""
    scales = torch.ones(len(targets), words.length)
    for t, target in enumerate(targets):
        for word, scale in reweight.items():
            if isinstance(scale, Sequence) and not isinstance(scale, str):
                if len(scale) != len(targets):
                    raise UserError(f"reweight for {word!r} has {len(scale)} values for {len(targets)} targets")
                scale = scale[t]
            if isinstance(scale, bool) or not isinstance(scale, (int, float)):
                raise UserError(f"reweight for {word!r} must be a number (or one per target prompt), got {scale!r}")
            if scale == 1 and not words.has_word(target, word):
                continue
            scales[t, words.positions(target, word)] = float(scale)
    return scales


def build_joint_edit(
    model: FlowModel, spec: EditSpec, joint: JointSpec, prompts: Sequence[str], *, num_steps: int, words: JointWords
) -> JointEdit:
    """The editor of joint attention; the prompts' words are checked here (before any model part is read)."""
    if spec.kind not in EDIT_KINDS or spec.kind == "none":
        raise UserError(f"edit kind {spec.kind!r} does not edit; choose one of {EDIT_KINDS[:3]}")
    source, targets = prompts[0], list(prompts[1:])
    if not targets:
        raise UserError(f"edit kind {spec.kind!r} needs a source and at least one target prompt; got {list(prompts)}")
    if spec.kind == "reweight" and not spec.reweight:
        raise UserError("edit kind 'reweight' needs the words to scale: edit.reweight={word: scale}")
    schedule = spec.cross_replace_steps
    if spec.preserve:  # Fig. 5: only the named words' maps are injected
        window = schedule if not isinstance(schedule, Mapping) else schedule.get(DEFAULT_KEY, 1.0)
        schedule = {DEFAULT_KEY: 0.0, **{w: window for w in spec.preserve}}
    kind, kwargs = spec.kind, {}
    if kind == "replace":
        kwargs["mapper"] = torch.stack([words.replace_mapper(source, t) for t in targets])
    elif kind == "refine":
        mappers, alphas = zip(*(words.refine_alignment(source, t) for t in targets))
        kwargs["mapper"], kwargs["refine_alphas"] = torch.stack(mappers), torch.stack(alphas)
    else:
        different = [t for t in targets if not words.identical(source, t)]
        if different:
            raise UserError(
                f"edit kind 'reweight' alone needs targets equal to the source {source!r}; {different[0]!r} "
                "differs — use edit=refine (or replace) with edit.reweight for a fader"
            )
        kind = "none"
    if spec.reweight:
        kwargs["reweight"] = joint_reweight(spec.reweight, targets, words)
    blocks = select_blocks(model.config, joint.blocks)
    return JointEdit(
        num_prompts=len(prompts),
        kind=kind,
        cross_alphas=cross_alphas(
            schedule, targets=targets, num_steps=num_steps, context_length=words.length, words=words
        ),
        self_steps=named_step_range(spec.self_replace_steps, num_steps, "self_replace_steps"),
        cross_blocks=blocks,
        self_blocks=blocks if joint.self_blocks is None else select_blocks(model.config, joint.self_blocks),
        renorm=joint.renorm,
        text_rows=joint.text_rows,
        query_chunk=joint.query_chunk or None,
        **kwargs,
    )


def build_flow_controllers(
    model: FlowModel,
    prompts: Sequence[str],
    *,
    spec: EditSpec | None,
    blend: BlendSpec | None,
    store: StoreSpec | None,
    joint: JointSpec,
    num_steps: int,
    latent_hw: tuple[int, int],
) -> tuple[JointStore | None, JointBlend | None, JointEdit | None, Controller | None]:
    """The recorder, the blend, the editor and the one controller running them (recorders first: unedited maps)."""
    words = JointWords(model)
    for prompt in prompts:
        words.segments(prompt)  # every prompt fits and tokenises (raises naming it)
    chunk = joint.query_chunk or None
    map_blocks = select_blocks(model.config, joint.store_blocks)
    recorder = (
        JointStore(num_prompts=len(prompts), blocks=map_blocks, per_step=store.per_step, query_chunk=chunk)
        if store
        else None
    )
    blender = None
    if blend and blend.words:
        blender = JointBlend(
            blocks=map_blocks,
            query_chunk=chunk,
            prompts=list(prompts),
            words=blend_words(blend.words, prompts),
            latent_hw=latent_hw,
            num_steps=num_steps,
            threshold=blend.threshold,
            dilation=blend.dilation,
            start_step=named_step_range(blend.start, num_steps, "blend start").stop,
            subtract_words=blend_words(blend.subtract_words, prompts) if blend.subtract_words else None,
            subtract_threshold=blend.subtract_threshold,
            context_length=words.length,
            lookup=words,
        )
    editor = None
    if spec is not None and spec.kind != "none":
        editor = build_joint_edit(model, spec, joint, prompts, num_steps=num_steps, words=words)
    controllers = [c for c in (recorder, blender, editor) if c is not None]
    return recorder, blender, editor, Compose(controllers) if controllers else None


def source_pooled(editor: JointEdit):
    """The conditioning callback giving each target the source's pooled vector while its cross window is open."""

    def callback(step: int, cond: FlowConditioning) -> FlowConditioning:
        active = editor.pooled_active(step).to(cond.pooled.device)
        if not bool(active.any()):
            return cond
        pooled = cond.pooled.clone()
        pooled[1:][active] = cond.pooled[:1].expand(int(active.sum()), -1)
        return FlowConditioning(cond.context, pooled, cond.text_segments)

    return callback


def edit_flow(
    model: FlowModel,
    prompts: Sequence[str],
    *,
    seed: int,
    spec: EditSpec | None = None,
    blend: BlendSpec | None = None,
    store: StoreSpec | None = None,
    joint: JointSpec | None = None,
    settings: FlowSamplerSettings | None = None,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str = "",
    progress: bool = True,
) -> EditResult:
    """Generate `prompts` (source first) from one seed with the edit `spec` on joint attention (None: plain sampling)."""
    prompts, joint = list(prompts), joint or JointSpec()
    if not prompts:
        raise UserError("edit needs at least one prompt (the source)")
    c = model.config
    height, width = c.image_size if height is None else height, c.image_size if width is None else width
    settings = settings or FlowSamplerSettings(steps=c.steps, guidance=c.guidance)
    latent = initial_noise(model, seed, height=height, width=width)
    recorder, blender, editor, controller = build_flow_controllers(
        model,
        prompts,
        spec=spec,
        blend=blend,
        store=store,
        joint=joint,
        num_steps=settings.steps,
        latent_hw=tuple(latent.shape[-2:]),
    )
    cond, uncond = conditioning(model, prompts, negative_prompt=negative_prompt, guidance=settings.guidance)
    latents = sample(
        model,
        cond,
        uncond=uncond,
        latent=latent,
        settings=settings,
        controller=controller,
        conditioning_callback=source_pooled(editor) if editor is not None and joint.pooled else None,
        latent_callback=blender.blend_latents if blender is not None else None,
        progress=progress,
    )
    images = decode(model, latents)
    if blender is not None and blend.restore_pixels and blender.last_mask is not None:  # as p2p.edit.edit does
        images[1:] = [restore_outside_mask(im, images[0], m) for im, m in zip(images[1:], blender.last_mask[1:])]
    return EditResult(images=images, latents=latents, store=recorder, blend=blender)


def edit_as_unet(
    model: FlowModel, prompts, *, seed, latent, uncond_embeddings, source_trajectory, **common
) -> EditResult:
    """`p2p.edit.edit`'s call on a flow model: the default `JointSpec`; no latent, inversion or trajectory."""
    unsupported = [
        name
        for name, value in (
            ("latent", latent),
            ("uncond_embeddings", uncond_embeddings),
            ("source_trajectory", source_trajectory),
        )
        if value is not None
    ]
    if unsupported or seed is None:
        raise UserError(
            f"editing {model.config.name} takes a seed and no {unsupported or 'latent'}: real-image inversion is "
            "built for the DDIM models only"
        )
    return edit_flow(model, prompts, seed=seed, **common)
