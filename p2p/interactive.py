"""Live editing: the source branch of an edit computed once, only the targets recomputed (issue 28).

In Prompt-to-Prompt the source prompt is sampled untouched: every controller edits only the target rows
(P2P_SPEC §1, §4) and LocalBlend leaves the source's latent as it is (§5). So everything the targets need
from the source — its latent after each step and its conditional attention maps at every site — depends
on (model, source prompt, x_T or seed, steps, guidance, null embeddings) and on none of the edit settings.
A slider that moves a window or a fader changes only the target branch:

    editor = LiveEditor(model)
    result = editor.edit(prompts, start=Start(seed=3), spec=EditSpec(cross_replace_steps=(0.0, 0.6)),
                         settings=SamplerSettings(steps=50, guidance=5.0))   # the second call is twice as fast

`edit_from_source` runs the edit's own controllers (`p2p.edit.build_controllers`) on a batch of targets as if
the source were in it: at each wanted site the cached source row is put back in front of the targets, the
controllers see the layout `[uncond × P, cond × P]` they were built for, and the source rows are dropped
again. The result equals `p2p.edit.edit` up to float32 rounding: batched CPU kernels (oneDNN convolutions,
BLAS matmuls, the text encoder) round a row differently when the batch around it has another size, so the
latents differ by ~1e-6 per step (tests/test_app_cache.py measures the bound it asserts).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from models.attention import AttentionSite
from models.errors import UserError
from models.stable_diffusion import StableDiffusion
from p2p.controllers import Controller
from p2p.edit import BlendSpec, EditResult, EditSpec, StoreSpec, build_controllers, edit
from p2p.pipeline import SamplerSettings, decode, image_size, initial_latent, sample
from p2p.real.inversion import restore_outside_mask

log = logging.getLogger(__name__)

# A source trajectory keeps every site's conditional map at every step: ~30 MB for the built-in model at 50 steps,
# but ~8 GB for SD at 512 px. Above this budget the editor runs the full edit instead (correct, just not live).
DEFAULT_MAX_SOURCE_BYTES = 512 * 2**20
DEFAULT_MAX_SOURCES = 8  # trajectories kept (least recently used dropped first): sources and baselines


@dataclass(frozen=True, eq=False)  # identified by `key`, never by comparing tensors
class Start:
    """Where sampling starts: a seed's x_T (generated images) or an inverted photo's x_T and null embeddings."""

    seed: int | None = None
    photo_key: str | None = None  # identifies the inversion (the inversion cache's key); part of the cache key
    x_T: torch.Tensor | None = None  # (1, 4, h, w), with a photo
    uncond_embeddings: tuple[torch.Tensor, ...] | None = None  # one per step, with a null-text photo

    def __post_init__(self):
        if (self.seed is None) == (self.photo_key is None):
            raise UserError("an edit starts from a seed or from an inverted photo (exactly one of them)")

    @property
    def key(self) -> str:
        return f"seed {self.seed}" if self.photo_key is None else f"photo {self.photo_key}"


@dataclass
class SourceTrajectory:
    """What the target branch needs from one prompt sampled without edits."""

    prompt: str
    x_T: torch.Tensor  # (1, 4, h, w)
    latents: list[torch.Tensor]  # (1, 4, h, w) after each step, noisiest first; the last is the final latent
    maps: list[dict[str, torch.Tensor]]  # per step: site name → the prompt's conditional map (1, heads, Q, K)
    image: np.ndarray  # uint8 (H, W, 3)

    @property
    def nbytes(self) -> int:
        return sum(m.numel() * m.element_size() for step in self.maps for m in step.values())


class SourceTooLarge(Exception):
    """Raised by the recorder when a trajectory would not fit the memory budget (caught by LiveEditor)."""


class SourceRecorder(Controller):
    """Wants every site at every step and keeps a copy of the conditional row's map; edits nothing."""

    def __init__(self, *, max_bytes: int, num_steps: int):
        super().__init__(num_prompts=1)
        self.maps: list[dict[str, torch.Tensor]] = []
        self.max_bytes, self.num_steps = max_bytes, num_steps

    def begin_step(self, step: int) -> None:
        super().begin_step(step)
        if step == 1:  # one step recorded: its size times the steps is the whole trajectory's
            per_step = sum(m.numel() * m.element_size() for m in self.maps[0].values())
            if per_step * self.num_steps > self.max_bytes:
                raise SourceTooLarge(f"{per_step * self.num_steps / 2**20:.0f} MiB > {self.max_bytes / 2**20:.0f} MiB")
        self.maps.append({})

    def wants(self, site: AttentionSite) -> bool:
        return True

    def __call__(self, probs: torch.Tensor, site: AttentionSite) -> torch.Tensor:
        self.maps[self.step][site.name] = self.conditional(probs).clone()
        return probs


def start_latent(
    model: StableDiffusion, start: Start, *, height: int | None = None, width: int | None = None
) -> torch.Tensor:
    if start.x_T is not None:
        return start.x_T
    height, width = image_size(model, height, width)
    return initial_latent(
        start.seed,
        height=height,
        width=width,
        latent_factor=model.config.latent_factor,
        multiple=model.config.size_multiple,
    )


def sample_source(
    model: StableDiffusion,
    prompt: str,
    *,
    start: Start,
    settings: SamplerSettings,
    max_bytes: int = DEFAULT_MAX_SOURCE_BYTES,
) -> SourceTrajectory:
    """Sample `prompt` alone, keeping its latents and conditional maps (raises SourceTooLarge over `max_bytes`)."""
    x_T = start_latent(model, start)
    recorder = SourceRecorder(max_bytes=max_bytes, num_steps=settings.steps)
    latents: list[torch.Tensor] = []

    def keep(step: int, x: torch.Tensor) -> torch.Tensor:
        latents.append(x.clone())
        return x

    final = sample(
        model,
        [prompt],
        latent=x_T,
        settings=settings,
        controller=recorder,
        latent_callback=keep,
        uncond_embeddings=start.uncond_embeddings,
        progress=False,
    )
    return SourceTrajectory(prompt=prompt, x_T=x_T, latents=latents, maps=recorder.maps, image=decode(model, final)[0])


class SourceInjector(Controller):
    """The edit's controller run on a batch of T targets `[uncond × T, cond × T]` as if the source were in it."""

    def __init__(self, inner: Controller, source: SourceTrajectory):
        super().__init__(num_prompts=inner.num_prompts - 1)
        self.inner, self.source = inner, source

    def begin_step(self, step: int) -> None:
        super().begin_step(step)
        self.inner.begin_step(step)

    def wants(self, site: AttentionSite) -> bool:
        return self.inner.wants(site)

    def __call__(self, probs: torch.Tensor, site: AttentionSite) -> torch.Tensor:
        source = self.source.maps[self.step][site.name].to(probs)  # (1, heads, Q, K)
        uncond, cond = probs.chunk(2)
        # Controllers read and edit only the conditional half (P2P_SPEC §1): the source's unconditional row is a
        # placeholder of the right shape, never read.
        full = self.inner(torch.cat([source, uncond, source, cond]), site)
        targets = self.num_prompts
        return torch.cat([full[1 : 1 + targets], full[2 + targets :]])


def edit_from_source(
    model: StableDiffusion,
    prompts: list[str],
    *,
    source: SourceTrajectory,
    start: Start,
    spec: EditSpec | None,
    blend: BlendSpec | None,
    store: StoreSpec | None,
    settings: SamplerSettings,
) -> EditResult:
    """`p2p.edit.edit(model, prompts, ...)` with the source branch taken from `source` (see the module doc)."""
    if prompts[0] != source.prompt:
        raise ValueError(f"the trajectory is of {source.prompt!r}, the edit's source is {prompts[0]!r}")
    recorder, blender, controller = build_controllers(
        model,
        prompts,
        spec=spec,
        blend=blend,
        store=store,
        num_steps=settings.steps,
        latent_hw=tuple(source.x_T.shape[-2:]),
    )
    if len(prompts) < 2:
        images = source.image[None]
        return EditResult(images=images, latents=source.latents[-1], store=recorder, blend=blender)
    injector = SourceInjector(controller, source) if controller is not None else None

    def blend_targets(step: int, x: torch.Tensor) -> torch.Tensor:
        return blender.blend_latents(step, torch.cat([source.latents[step].to(x), x]))[1:]

    targets = sample(
        model,
        prompts[1:],
        latent=source.x_T,
        settings=settings,
        controller=injector,
        latent_callback=blend_targets if blender is not None else None,
        uncond_embeddings=start.uncond_embeddings,
        progress=False,
    )
    images = np.concatenate([source.image[None], decode(model, targets)])
    if blender is not None and blend.restore_pixels and blender.last_mask is not None:
        images[1:] = [
            restore_outside_mask(image, images[0], mask) for image, mask in zip(images[1:], blender.last_mask[1:])
        ]
    return EditResult(images=images, latents=torch.cat([source.latents[-1], targets]), store=recorder, blend=blender)


class LiveEditor:
    """Edits through a least-recently-used cache of source trajectories keyed by (prompt, start, steps,
    guidance, offset); one editor serves one model. Models whose trajectories exceed `max_bytes` (SD at 512 px)
    get the full `p2p.edit.edit` on every call."""

    def __init__(
        self,
        model: StableDiffusion,
        *,
        max_sources: int = DEFAULT_MAX_SOURCES,
        max_bytes: int = DEFAULT_MAX_SOURCE_BYTES,
    ):
        self.model, self.max_sources, self.max_bytes = model, max_sources, max_bytes
        self.sources: OrderedDict[tuple, SourceTrajectory] = OrderedDict()
        self.too_large = False  # set once a trajectory did not fit: every later edit runs in full
        self.hits = self.misses = 0

    def source(self, prompt: str, *, start: Start, settings: SamplerSettings) -> SourceTrajectory | None:
        if settings.eta != 0:
            return None  # η > 0 draws noise from a generator shared with the targets: not cacheable
        key = (prompt, start.key, settings.steps, float(settings.guidance), settings.offset)
        if key in self.sources:
            self.hits += 1
            self.sources.move_to_end(key)
            return self.sources[key]
        if self.too_large:
            return None
        self.misses += 1
        try:
            trajectory = sample_source(self.model, prompt, start=start, settings=settings, max_bytes=self.max_bytes)
        except SourceTooLarge as err:
            log.info("source trajectories do not fit the cache (%s); editing without it", err)
            self.too_large = True
            return None
        self.sources[key] = trajectory
        while len(self.sources) > self.max_sources:
            self.sources.popitem(last=False)
        return trajectory

    def edit(
        self,
        prompts: list[str],
        *,
        start: Start,
        spec: EditSpec | None,
        blend: BlendSpec | None = None,
        store: StoreSpec | None = None,
        settings: SamplerSettings,
    ) -> EditResult:
        # every check of the request first: a bad word costs no sampling
        build_controllers(
            self.model,
            prompts,
            spec=spec,
            blend=blend,
            store=store,
            num_steps=settings.steps,
            latent_hw=tuple(start_latent(self.model, start).shape[-2:]),
        )
        source = self.source(prompts[0], start=start, settings=settings)
        if source is None:
            return edit(
                self.model,
                prompts,
                latent=start_latent(self.model, start),
                spec=spec,
                blend=blend,
                store=store,
                settings=settings,
                uncond_embeddings=start.uncond_embeddings,
                progress=False,
            )
        return edit_from_source(
            self.model, prompts, source=source, start=start, spec=spec, blend=blend, store=store, settings=settings
        )

    def baseline(self, prompts: list[str], *, start: Start, settings: SamplerSettings) -> np.ndarray:
        """Every prompt sampled alone from the same start, no injection (the same-seed baseline), cached."""
        images = []
        for prompt in prompts:
            source = self.source(prompt, start=start, settings=settings)
            images.append(
                source.image
                if source is not None
                else edit(
                    self.model,
                    [prompt],
                    latent=start_latent(self.model, start),
                    settings=settings,
                    uncond_embeddings=start.uncond_embeddings,
                    progress=False,
                ).images[0]
            )
        return np.stack(images)
