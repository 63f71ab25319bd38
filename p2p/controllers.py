"""Attention controllers: plain objects that the attention modules call at their one hook.

Batch layout seen by every controller (P prompts, source first): rows `[uncond × P, cond × P]`.
Edits touch only the conditional half (P2P_SPEC §1). A controller is built for one run: it holds the
current step (told by the sampling loop, never inferred by counting calls) and nothing else mutable
except the maps it was asked to record.

- `AttentionStore` records head-averaged maps of chosen layers (Fig. 4 views, LocalBlend).
- `AttentionEdit` is the paper's edit (§3.2): Replace (word swap), Refine (token alignment), Reweight
  (fader, composable on either), per-word cross windows and self-attention injection.
- `Compose` chains controllers; recorders placed before the editor see each prompt's own maps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from models.attention import AttentionSite, JointRequest
from models.errors import UserError

MIN_LOG = -1e4  # logit of a column that reads nothing (edits on logits): its exp underflows to exactly 0


def edit_columns(source, targets, *, kind, mapper, refine_alphas, reweight, alpha, logits: bool) -> torch.Tensor:
    """The paper's Edit on the last axis: source/targets (T, …, L) → α·Edit·c + (1 − α)·M_tgt (P2P_SPEC §3–4).

    `logits=True`: the same mappers on logits — a mixing column (a word split into several tokens) is the log of
    the mixed exp-logits, a reweight adds log c, and α selects (it is 0 or 1)."""
    per_target = (source.shape[0], *[1] * (source.dim() - 2), source.shape[-1])  # (T, 1, …, 1, L)
    if kind == "replace":
        m = mapper.to(source)
        if logits:
            peak = source.amax(dim=-1, keepdim=True)
            mixed = torch.einsum("t...i,tij->t...j", (source - peak).exp(), m)
            edited = mixed.clamp_min(1e-30).log().where(mixed > 0, torch.full_like(mixed, MIN_LOG)) + peak
        else:
            edited = torch.einsum("t...i,tij->t...j", source, m)
    elif kind == "refine":
        index = mapper.to(source.device).view(per_target).expand_as(source)
        edited = source.gather(-1, index)  # M_src[..., a_t(j)]
        edited = edited.where(refine_alphas.to(source).view(per_target) > 0.5, targets)
    else:
        edited = source
    if reweight is not None:
        c = reweight.to(source).view(per_target)
        edited = edited + c.clamp_min(1e-30).log() if logits else edited * c
    return edited.where(alpha.to(source).view(per_target) > 0.5, targets)


def grid_at(latent_hw: tuple[int, int], downsamplings: int) -> tuple[int, int]:
    """Query grid of the UNet level after `downsamplings` stride-2 convs (each gives ceil(n/2))."""
    h, w = latent_hw
    for _ in range(downsamplings):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def max_queries_at_fraction(latent_hw: tuple[int, int], fraction: float) -> int:
    """Query count of the UNet level whose side is `fraction` of the latent's: 1/4 → two downsamplings.

    Follows the UNet's own rounding (ceil at each halving), so odd latents (SD at 520 px: 65 → 33 → 17)
    still reach their layers. A fraction between powers of two picks the next smaller level.
    """
    if not 0 < fraction <= 1:
        raise UserError(f"resolution fraction {fraction} must be in (0, 1]")
    downsamplings = math.ceil(math.log2(1 / fraction) - 1e-9)
    h, w = grid_at(latent_hw, downsamplings)
    return h * w


class Controller:
    """Base controller: knows the batch layout and the step; wants nothing, changes nothing."""

    def __init__(self, *, num_prompts: int):
        if num_prompts < 1:
            raise UserError(f"num_prompts={num_prompts} must be ≥ 1")
        self.num_prompts = num_prompts
        self.step = -1  # set by the sampling loop through begin_step

    def begin_step(self, step: int) -> None:
        if step == 0 and self.step != -1:
            raise RuntimeError(
                f"{type(self).__name__} already ran (it was at step {self.step}); controllers are "
                "built for one run — build a new one for every run"
            )
        self.step = step

    def wants(self, site: AttentionSite) -> bool:
        return False

    def __call__(self, probs: torch.Tensor, site: AttentionSite) -> torch.Tensor:
        return probs

    def conditional(self, probs: torch.Tensor) -> torch.Tensor:
        """The conditional half (P, heads, queries, keys) of a CFG batch."""
        if probs.shape[0] != 2 * self.num_prompts:
            raise RuntimeError(
                f"attention batch of {probs.shape[0]} rows; expected 2 × {self.num_prompts} prompts "
                "([uncond, cond]); was the controller built for this run?"
            )
        return probs[self.num_prompts :]


class Compose(Controller):
    """Several controllers at one hook, called in order (only those that want the site)."""

    def __init__(self, controllers: Sequence[Controller]):
        super().__init__(num_prompts=controllers[0].num_prompts)
        self.controllers = list(controllers)

    def begin_step(self, step: int) -> None:
        super().begin_step(step)
        for c in self.controllers:
            c.begin_step(step)

    def wants(self, site: AttentionSite) -> bool:
        return any(c.wants(site) for c in self.controllers)

    def joint_request(self, site: AttentionSite) -> JointRequest:
        """Joint sites: the largest slice any member asks for, and logits if one member takes logits."""
        requests = [c.joint_request(site) for c in self.controllers if hasattr(c, "joint_request") and c.wants(site)]
        chunks, halves = [r.query_chunk for r in requests], {r.conditional_half for r in requests}
        return JointRequest(
            query_chunk=None if not chunks or None in chunks else max(chunks),
            scores=any(r.scores for r in requests),
            conditional_half=halves.pop() if len(halves) == 1 else None,  # all members must skip the same rows
        )

    def __call__(self, maps, site):
        """`maps` are probabilities, or logits at a joint site where a member takes logits (`JointRequest`): members
        before it see their softmax (recorders: the unedited maps), it returns probabilities for the rest."""
        logits = maps if site.query_rows is not None and self.joint_request(site).scores else None
        probs = None if logits is not None else maps
        for c in self.controllers:
            if not c.wants(site):
                continue
            if hasattr(c, "joint_request") and c.joint_request(site).scores:
                if logits is None:
                    raise RuntimeError(f"two controllers at {site.name} take logits; compose at most one such editor")
                probs, logits = c(logits, site), None
            else:
                probs = c(probs if probs is not None else logits.softmax(dim=-1), site)
        return probs if probs is not None else logits.softmax(dim=-1)


@dataclass(frozen=True)
class LayerFilter:
    """Which sites a recorder keeps: by kind and by query grid (`grids` None = any)."""

    kinds: tuple[str, ...] = ("cross", "hybrid")
    grids: tuple[tuple[int, int], ...] | None = None
    max_queries: int | None = None  # keep only layers with at most this many queries (memory bound)

    def __call__(self, site: AttentionSite) -> bool:
        return (
            site.kind in self.kinds
            and (self.grids is None or site.query_hw in self.grids)
            and (self.max_queries is None or site.num_queries <= self.max_queries)
        )


class AttentionStore(Controller):
    """Records the conditional half's maps, averaged over heads, summed over steps (P2P_SPEC §6).

    `maps[site.name]` is (P, queries, keys) summed over recorded steps; `average(name)` divides by the
    count. Hybrid layers keep all columns (text first, then pixels). With `per_step=True` each
    step's maps are also kept (`steps[i][name]`) for the per-step views of Fig. 4. Maps are copies of what
    the model computed before any later controller in a `Compose` edits them.
    """

    def __init__(
        self,
        *,
        num_prompts: int,
        layers: LayerFilter = LayerFilter(),
        per_step: bool = False,
        steps: range | None = None,
    ):
        super().__init__(num_prompts=num_prompts)
        self.layers, self.per_step, self.record_steps = layers, per_step, steps
        self.maps: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.sites: dict[str, AttentionSite] = {}
        self.steps: dict[int, dict[str, torch.Tensor]] = {}

    def wants(self, site):
        return self.layers(site) and (self.record_steps is None or self.step in self.record_steps)

    def __call__(self, probs, site):
        mean = self.conditional(probs).mean(dim=1).float()  # (P, queries, keys)
        self.sites[site.name] = site
        self.maps[site.name] = self.maps[site.name] + mean if site.name in self.maps else mean.clone()
        self.counts[site.name] = self.counts.get(site.name, 0) + 1
        if self.per_step:
            self.steps.setdefault(self.step, {})[site.name] = mean.clone()
        return probs

    def average(self, name: str) -> torch.Tensor:
        return self.maps[name] / self.counts[name]

    def names(self, *, kinds: tuple[str, ...] | None = None, grid: tuple[int, int] | None = None) -> list[str]:
        return [
            n
            for n, s in self.sites.items()
            if (kinds is None or s.kind in kinds) and (grid is None or s.query_hw == grid)
        ]


class AttentionEdit(Controller):
    """The paper's edit on the conditional half: target maps = α·Edit(M_src, M_tgt)·c + (1 − α)·M_tgt.

    Edit (cross/text columns), per target t and key token j:
      replace: Σ_i M_src[..., i]·A_t[i, j]              (A: word-swap mapper, `p2p.tokens.replace_mapper`)
      refine:  M_src[..., a_t(j)] if j is aligned else M_tgt[..., j]   (`p2p.tokens.refine_alignment`)
      none:    M_src[..., j]                              (same prompts: the fader of Fig. 9)
    c = per-(target, token) reweight scales (1 elsewhere; no renormalisation, as in the reference).
    α = per-step, per-target, per-token window (`p2p.schedules.cross_alphas`).
    Self-attention: during the self window, in layers with at most `self_max_queries` queries, the targets'
    maps are replaced by the source's.
    Hybrid (Imagen) layers: only their text columns are edited, by the cross rule (P2P_SPEC §2); their pixel
    columns are each prompt's own, whatever the self window says.
    """

    def __init__(
        self,
        *,
        num_prompts: int,
        kind: str,
        cross_alphas: torch.Tensor,
        self_steps: range,
        self_max_queries: int,
        mapper: torch.Tensor | None = None,
        refine_alphas: torch.Tensor | None = None,
        reweight: torch.Tensor | None = None,
    ):
        super().__init__(num_prompts=num_prompts)
        if num_prompts < 2:
            raise UserError("an edit needs a source prompt and at least one target prompt")
        if kind not in ("replace", "refine", "none"):
            raise UserError(f"edit kind {kind!r} is not supported; use 'replace', 'refine' or 'none'")
        num_targets = num_prompts - 1
        if cross_alphas.shape[1] != num_targets:
            raise UserError(f"cross_alphas has {cross_alphas.shape[1]} targets, the batch {num_targets}")
        self.kind = kind
        self.cross_alphas = cross_alphas  # (steps, T, L): L text positions (77 for SD)
        self.self_steps, self.self_max_queries = self_steps, self_max_queries
        self.mapper = mapper  # replace: (T, L, L) float; refine: (T, L) long
        self.refine_alphas = refine_alphas  # refine: (T, L), 1 = aligned token
        self.reweight = reweight  # (T, L) or None

    def _cross_active(self) -> bool:
        return 0 <= self.step < len(self.cross_alphas) and bool(self.cross_alphas[self.step].any())

    def _self_active(self, site: AttentionSite) -> bool:
        return self.step in self.self_steps and site.num_queries <= self.self_max_queries

    def wants(self, site):
        if site.kind == "cross":
            return self._cross_active()
        if site.kind == "self":
            return self._self_active(site)
        return self._cross_active()  # hybrid: text columns only

    def __call__(self, probs, site):
        probs = probs.clone()  # the caller's tensor is never edited in place
        cond = probs[self.num_prompts :]  # a view into the clone: edits below land in `probs`
        self.conditional(probs)  # validates the batch layout
        text = site.num_text_keys
        if site.kind != "self" and text != self.cross_alphas.shape[-1]:
            raise UserError(
                f"layer {site.name} attends to {text} text tokens but the edit was built for "
                f"{self.cross_alphas.shape[-1]}; build it with the model's context length "
                "(p2p.edit.build_edit(..., context_length=model.context_length))"
            )
        if site.kind != "self" and self._cross_active():
            cond[1:, ..., :text] = self._edit_cross(cond[0, ..., :text], cond[1:, ..., :text])
        if site.kind == "self" and self._self_active(site):
            cond[1:] = cond[:1]  # source's self maps for every target
        return probs

    def _edit_cross(self, source: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """source (heads, Q, L), targets (T, heads, Q, L) → edited targets."""
        return edit_columns(
            source.expand_as(targets),
            targets,
            kind=self.kind,
            mapper=self.mapper,
            refine_alphas=self.refine_alphas,
            reweight=self.reweight,
            alpha=self.cross_alphas[self.step],
            logits=False,
        )
