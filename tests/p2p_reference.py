"""A slow, obviously-correct Prompt-to-Prompt, written straight from ../shared/P2P_SPEC.md §3–§5 (test-only).

It shares nothing with `p2p/controllers.py`, `p2p/schedules.py` or `p2p/blend.py`: every rule is
re-derived here with explicit Python loops over targets, heads and tokens, so that the fast,
batched implementation can be checked against it (tests/test_p2p_reference.py). From `p2p.tokens`
it takes only the inputs the spec defines elsewhere: word → token positions, the word-swap mapper A
and the refine alignment a(j) (those are proven in tests/test_tokens.py).

It implements the hook protocol of `models/attention.py` (`wants`, `__call__`) plus `begin_step`, and
LocalBlend as the loop's latent callback (`blend`). It wants *every* attention site, so it also proves that
the fast path's `wants` never skips a layer that the edit needs.

    ref = ReferenceP2P(prompts=prompts, num_steps=4, latent_hw=(8, 8), kind="replace", ...)
    latents = sample(model, prompts, latent=x_T, settings=settings, controller=ref, latent_callback=ref.blend)

Readings of the spec made here (the fast path must agree):
- windows use the literal `int(f·n)`; the tests pick fractions for which f·n is exact (the fast path adds 1e-9
  so that 0.29·100 means 29, not 28);
- LocalBlend accumulates each prompt's *own* maps, taken before the edit (§9.6: store what you mean);
- subtract words (null-text notebook variant): like the blend words, their mask is the union of the source's
  and the target's (the notebook's `get_mask` ends with `mask[:1] + mask` for both); `subtract_union=False`
  gives the target's alone;
- an empty mask leaves its target unblended and warns (§9.4).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch

from p2p.tokens import refine_alignment, replace_mapper, word_token_positions

log = logging.getLogger(__name__)


def spec_steps(window, num_steps: int) -> list[int]:
    """P2P_SPEC §3: a float f means steps [0, int(f·n)); a pair (start, end) means [int(start·n), int(end·n))."""
    if isinstance(window, (int, float)):
        start, end = 0.0, float(window)
    else:
        start, end = window
    return list(range(int(start * num_steps), int(end * num_steps)))


class ReferenceP2P:
    """Replace / refine / reweight / per-word windows / preservation / self injection / LocalBlend, by loops.

    prompts: source first, then targets.
    kind: "replace" (A from p2p.tokens.replace_mapper), "refine" (a(j) from p2p.tokens.refine_alignment),
          "none" (Edit = M_src column by column: the fader on identical prompts), or None (no cross edit).
    cross: float, (start, end) or {word: window, "default_": window} (P2P_SPEC §3).
    preserve: words whose maps alone are injected (object preservation, Fig. 5): they get `cross`'s
          window, every other token an empty one.
    self_window: float or (start, end). self_fraction / self_side: a layer is replaced when both sides of
          its query grid are ≤ latent side × fraction (or ≤ self_side when that is given).
    reweight: {word: c or [c per target]}: the edited columns of every target are multiplied by c.
    context: text positions per prompt (the model's `context_length`; 77 for SD).
    blend_words: one list of words per prompt (or None: no LocalBlend). blend_grid: the query grid whose
          cross/hybrid maps are accumulated. subtract_words: one list per prompt or None.
    """

    def __init__(
        self,
        *,
        prompts: Sequence[str],
        num_steps: int,
        latent_hw: tuple[int, int],
        kind: str | None,
        cross=1.0,
        self_window=0.0,
        self_fraction: float = 0.25,
        self_side: int | None = None,
        reweight: Mapping | None = None,
        preserve: Sequence[str] = (),
        blend_words: Sequence[Sequence[str]] | None = None,
        blend_grid: tuple[int, int] | None = None,
        blend_threshold: float = 0.3,
        blend_dilation: int = 1,
        blend_start: float = 0.0,
        subtract_words: Sequence[Sequence[str]] | None = None,
        subtract_threshold: float = 0.3,
        subtract_union: bool = True,
        context: int = 77,
    ):
        self.prompts = list(prompts)
        self.num_prompts = len(prompts)
        self.targets = self.prompts[1:]
        self.num_steps = num_steps
        self.latent_hw = tuple(latent_hw)
        self.kind = kind
        self.step = -1
        self.context = context  # text positions per prompt: 77 for SD, the model's own otherwise

        # --- α[step][t][j] ∈ {0, 1}: P2P_SPEC §3, built token by token -------------------------------
        if preserve:
            window = cross if not isinstance(cross, Mapping) else cross.get("default_", 1.0)
            cross = {"default_": 0.0, **{word: window for word in preserve}}
        if not isinstance(cross, Mapping):
            cross = {"default_": cross}
        default_steps = spec_steps(cross.get("default_", 1.0), num_steps)
        word_steps = {word: spec_steps(window, num_steps) for word, window in cross.items() if word != "default_"}
        self.alpha = []
        for step in range(num_steps):
            per_target = []
            for target in self.targets:
                word_positions = {word: word_token_positions(target, word) for word in word_steps}
                row = []
                for j in range(self.context):
                    window_steps = default_steps  # tokens of no named word: the default window
                    for word, steps in word_steps.items():
                        if j in word_positions[word]:
                            window_steps = steps  # a named word's tokens: its own window
                    row.append(1.0 if step in window_steps else 0.0)
                per_target.append(row)
            self.alpha.append(per_target)

        # --- the edit's token maps (inputs from p2p.tokens) as plain lists --------------------------
        self.mapper = None  # replace: mapper[t][j] = [(i, A[i, j]) for the source tokens i with A[i, j] ≠ 0]
        self.aligned = None  # refine: aligned[t][j] = source position or None (new token)
        if kind == "replace":
            self.mapper = []
            for target in self.targets:
                A = replace_mapper(self.prompts[0], target, context_length=self.context).tolist()
                self.mapper.append(
                    [[(i, A[i][j]) for i in range(self.context) if A[i][j] != 0.0] for j in range(self.context)]
                )
        elif kind == "refine":
            self.aligned = []
            for target in self.targets:
                positions, alphas = refine_alignment(self.prompts[0], target, context_length=self.context)
                self.aligned.append([int(positions[j]) if alphas[j] == 1 else None for j in range(self.context)])
        elif kind not in ("none", None):
            raise ValueError(kind)

        # --- reweight c[t][j] -------------------------------------------------------------------------
        self.scale = [[1.0] * self.context for _ in self.targets]
        for word, value in (reweight or {}).items():
            for t, target in enumerate(self.targets):
                c = value[t] if isinstance(value, (list, tuple)) else value
                for j in word_token_positions(target, word):
                    self.scale[t][j] = float(c)

        # --- self-attention window and layer rule (P2P_SPEC §3) ---------------------------------------
        self.self_steps = spec_steps(self_window, num_steps)
        self.self_fraction, self.self_side = self_fraction, self_side

        # --- LocalBlend (P2P_SPEC §5) -----------------------------------------------------------------
        self.blend_words = blend_words
        self.blend_grid = tuple(blend_grid) if blend_grid else None
        self.blend_threshold, self.blend_dilation = blend_threshold, blend_dilation
        self.blend_start = int(blend_start * num_steps)
        self.subtract_words, self.subtract_threshold = subtract_words, subtract_threshold
        self.subtract_union = subtract_union
        self.word_positions = self._positions(blend_words)
        self.subtract_positions = self._positions(subtract_words)
        self.recorded = [
            sorted(
                set((self.word_positions or [[]] * len(prompts))[p])
                | set((self.subtract_positions or [[]] * len(prompts))[p])
            )
            for p in range(len(prompts))
        ]  # per prompt: the token positions whose maps are kept
        self.accumulated = None  # [prompt] → {token position: (h, w) map, mean over layers, summed over steps}
        self.step_layer_maps = []  # this step's per-layer maps, averaged at the end of the step
        self.last_mask = None

    def _positions(self, words_per_prompt):
        if not words_per_prompt:
            return None
        result = []
        for prompt, words in zip(self.prompts, words_per_prompt):
            result.append(sorted({p for word in words for p in word_token_positions(prompt, word)}))
        return result

    # --- the hook protocol ----------------------------------------------------------------------------

    def begin_step(self, step: int) -> None:
        self.step = step
        self.step_layer_maps = []

    def wants(self, site) -> bool:
        return True  # materialise every map: the edit decides below what to change

    def _self_layer(self, site) -> bool:
        h, w = site.query_hw
        if self.self_side is not None:
            return h <= self.self_side and w <= self.self_side
        return h <= self.latent_hw[0] * self.self_fraction and w <= self.latent_hw[1] * self.self_fraction

    def __call__(self, probs: torch.Tensor, site) -> torch.Tensor:
        P = self.num_prompts
        assert probs.shape[0] == 2 * P, probs.shape
        if self.blend_grid is not None and site.kind != "self" and tuple(site.query_hw) == self.blend_grid:
            self._record(probs, site)  # the prompts' own (unedited) maps
        out = probs.clone()
        step = self.step
        text = site.num_text_keys
        heads = probs.shape[1]
        source_row = P  # conditional half: rows P..2P-1; the unconditional half is never touched
        for t in range(len(self.targets)):
            row = P + 1 + t
            for h in range(heads):
                src = probs[source_row, h]  # (queries, keys)
                tgt = probs[row, h]
                if site.kind in ("cross", "hybrid") and self.kind is not None:
                    for j in range(text):
                        a = self.alpha[step][t][j]
                        if a == 0.0:
                            continue  # (1 − α)·M_tgt with α = 0: the target's own column
                        if self.kind == "replace":  # Edit[..., j] = Σ_i M_src[..., i]·A[i, j]
                            edited = torch.zeros_like(src[:, j])
                            for i, weight in self.mapper[t][j]:  # the terms with A[i, j] = 0 add nothing
                                edited = edited + src[:, i] * weight
                        elif self.kind == "refine":  # aligned → M_src[..., a(j)]; new → M_tgt[..., j]
                            i = self.aligned[t][j]
                            edited = src[:, i] if i is not None else tgt[:, j]
                        else:  # identical token layout: M_src[..., j]
                            edited = src[:, j]
                        edited = edited * self.scale[t][j]
                        out[row, h, :, j] = a * edited + (1.0 - a) * tgt[:, j]
                if site.kind == "self" and step in self.self_steps and self._self_layer(site):
                    for j in range(probs.shape[-1]):  # self maps: the source's (hybrid pixel columns: never)
                        out[row, h, :, j] = src[:, j]
        return out

    # --- LocalBlend -----------------------------------------------------------------------------------

    def _record(self, probs, site):
        P = self.num_prompts
        heads = probs.shape[1]
        gh, gw = site.query_hw
        per_prompt = []
        for p in range(P):
            maps = {}
            for j in self.recorded[p]:
                column = torch.zeros(gh * gw)
                for h in range(heads):
                    column = column + probs[P + p, h, :, j]
                maps[j] = (column / heads).reshape(gh, gw)  # mean over heads
            per_prompt.append(maps)
        self.step_layer_maps.append(per_prompt)

    def _end_of_step_accumulate(self):
        layers = self.step_layer_maps
        if not layers:
            return
        if self.accumulated is None:
            self.accumulated = [{j: torch.zeros(self.blend_grid) for j in positions} for positions in self.recorded]
        for p in range(self.num_prompts):
            for j in self.recorded[p]:
                mean = torch.zeros(self.blend_grid)
                for layer in layers:
                    mean = mean + layer[p][j]
                self.accumulated[p][j] = self.accumulated[p][j] + mean / len(layers)  # mean over layers
        self.step_layer_maps = []

    def _word_mask(self, p: int, positions, threshold: float, pool: bool) -> torch.Tensor:
        """(H, W) bool: the words' accumulated map → (max-pool) → nearest upsample → / max → > threshold."""
        gh, gw = self.blend_grid
        summed = torch.zeros(gh, gw)
        for j in positions[p]:
            summed = summed + self.accumulated[p][j]
        if pool:
            k = self.blend_dilation
            pooled = torch.zeros(gh, gw)
            for y in range(gh):
                for x in range(gw):
                    best = -math.inf
                    for dy in range(-k, k + 1):
                        for dx in range(-k, k + 1):
                            if 0 <= y + dy < gh and 0 <= x + dx < gw:
                                best = max(best, float(summed[y + dy, x + dx]))
                    pooled[y, x] = best
            summed = pooled
        H, W = self.latent_hw
        up = torch.zeros(H, W)
        for y in range(H):
            for x in range(W):
                up[y, x] = summed[y * gh // H, x * gw // W]  # nearest: source index floor(dst · in / out)
        peak = float(up.max())
        if peak <= 0:
            return torch.zeros(H, W, dtype=torch.bool)
        return (up / peak) > threshold

    def blend(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        """Latent callback: x_tgt ← x_src + mask·(x_tgt − x_src), mask = source ∪ target words (− subtract)."""
        if self.blend_words is None:
            return latents
        self._end_of_step_accumulate()
        if step < self.blend_start:
            return latents
        out = latents.clone()
        masks = [torch.ones(self.latent_hw)]  # row 0 (source) is unchanged by the formula anyway
        source_mask = self._word_mask(0, self.word_positions, self.blend_threshold, pool=True)
        source_sub = None
        if self.subtract_positions is not None:
            source_sub = self._word_mask(0, self.subtract_positions, self.subtract_threshold, pool=False)
        for p in range(1, self.num_prompts):
            mask = source_mask | self._word_mask(p, self.word_positions, self.blend_threshold, pool=True)
            if self.subtract_positions is not None:
                sub = self._word_mask(p, self.subtract_positions, self.subtract_threshold, pool=False)
                if self.subtract_union:
                    sub = sub | source_sub
                mask = mask & ~sub
            mask = mask.float()
            if not mask.any():  # P2P_SPEC §9.4: an empty mask must not collapse the edit
                log.warning("reference LocalBlend: empty mask for prompt %d", p)
                mask = torch.ones_like(mask)
            masks.append(mask)
            out[p] = latents[0] + mask * (latents[p] - latents[0])
        self.last_mask = torch.stack(masks)[:, None]
        return out
