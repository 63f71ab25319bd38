"""LocalBlend: edit only where the edited words are (Hertz et al. 2022, §3.2 "Local editing"; P2P_SPEC §5).

For each prompt, the cross-attention maps of its blend words are averaged over heads and over the layers
at the blend resolution (SD at 512 px: the five 16×16 cross layers = latent/4), summed over the word's
tokens and accumulated over the steps so far. Then: 3×3 max-pool (dilation), nearest upsampling to the
latent, division by the per-image max, threshold. Mask = union of the source's and each target's masks
(minus the subtract words' mask). After each step from `start_step` on:
`x_tgt ← x_src + mask·(x_tgt − x_src)`, so outside the mask the target keeps the source's latent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from models.attention import AttentionSite
from models.errors import UserError
from p2p.controllers import Controller, grid_at
from p2p.schedules import WordLookup
from p2p.tokens import CONTEXT_LENGTH, word_token_positions

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.3  # official notebooks
DEFAULT_DILATION = 1  # max-pool kernel 2k+1 = 3 (official `k = 1`)
DEFAULT_RESOLUTION_DOWNSAMPLINGS = 2  # latent/4: the 16×16 layers of SD at 512 px


def word_weights(
    prompts: Sequence[str],
    words: Sequence[Sequence[str]],
    *,
    context_length: int = CONTEXT_LENGTH,
    lookup: WordLookup | None = None,
) -> torch.Tensor:
    """(P, context_length) with 1 at the tokens of each prompt's words (P2P's `alpha_layers`); `lookup` finds
    them among another model's text positions (an MM-DiT's CLIP and T5 columns: `p2p.joint_tokens.JointWords`)."""
    if len(words) != len(prompts):
        raise UserError(f"blend words for {len(words)} prompts given; the batch has {len(prompts)} prompts")
    weights = torch.zeros(len(prompts), context_length)
    for p, (prompt, prompt_words) in enumerate(zip(prompts, words)):
        for word in prompt_words:
            positions = (
                word_token_positions(prompt, word, context_length=context_length)
                if lookup is None
                else lookup.positions(prompt, word)
            )
            weights[p, positions] = 1.0
    return weights


class LocalBlend(Controller):
    """Records the blend words' maps (a recorder at the hook) and blends latents (the loop's latent callback)."""

    def __init__(
        self,
        *,
        prompts: Sequence[str],
        words: Sequence[Sequence[str]],
        latent_hw: tuple[int, int],
        num_steps: int,
        threshold: float = DEFAULT_THRESHOLD,
        dilation: int = DEFAULT_DILATION,
        start_step: int = 0,
        subtract_words: Sequence[Sequence[str]] | None = None,
        subtract_threshold: float = DEFAULT_THRESHOLD,
        resolution_downsamplings: int = DEFAULT_RESOLUTION_DOWNSAMPLINGS,
        context_length: int = CONTEXT_LENGTH,
        lookup: WordLookup | None = None,
    ):
        super().__init__(num_prompts=len(prompts))
        for name, value in (("threshold", threshold), ("subtract_threshold", subtract_threshold)):
            if not 0.0 <= value < 1.0:  # maps are divided by their max: at 1 or above no pixel passes
                raise UserError(f"blend {name} {value} must be in [0, 1)")
        if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 0:
            raise UserError(f"blend dilation {dilation!r} must be an int ≥ 0 (max-pool kernel 2·dilation + 1)")
        if not any(words):
            raise UserError("LocalBlend needs at least one word (per prompt: the object being edited)")
        self.weights = word_weights(prompts, words, context_length=context_length, lookup=lookup)
        self.subtract = (
            word_weights(prompts, subtract_words, context_length=context_length, lookup=lookup)
            if subtract_words and any(subtract_words)
            else None
        )
        self.threshold, self.subtract_threshold, self.dilation = threshold, subtract_threshold, dilation
        self.latent_hw, self.num_steps, self.start_step = tuple(latent_hw), num_steps, start_step
        self.grid = grid_at(self.latent_hw, resolution_downsamplings)
        self.summed: torch.Tensor | None = None  # (P, L, h, w): per-token maps summed over layers and steps
        self.seen_grids: set[tuple[int, int]] = set()
        self.last_mask: torch.Tensor | None = None  # (P, 1, H, W) latent-size mask of the last blend

    def wants(self, site: AttentionSite) -> bool:
        if site.kind == "self":
            return False
        self.seen_grids.add(site.query_hw)
        return site.query_hw == self.grid

    def __call__(self, probs, site):
        if site.num_text_keys != self.weights.shape[1]:
            raise UserError(
                f"layer {site.name} attends to {site.num_text_keys} text tokens but the blend was built "
                f"for {self.weights.shape[1]}; build it with the model's context_length"
            )
        text = self.conditional(probs)[..., : site.num_text_keys].mean(dim=1).float()  # (P, Q, 77)
        maps = text.transpose(1, 2).reshape(self.num_prompts, -1, *site.query_hw)  # (P, 77, h, w)
        self.summed = maps.clone() if self.summed is None else self.summed + maps
        return probs

    def _mask(self, weights: torch.Tensor, threshold: float, *, dilate: bool) -> torch.Tensor:
        maps = (self.summed * weights.to(self.summed)[:, :, None, None]).sum(dim=1, keepdim=True)  # (P, 1, h, w)
        if dilate:
            k = self.dilation
            maps = F.max_pool2d(maps, 2 * k + 1, stride=1, padding=k)
        maps = F.interpolate(maps, size=self.latent_hw, mode="nearest")
        peak = maps.amax(dim=(2, 3), keepdim=True)
        if (peak <= 0).any():
            empty = (peak.flatten() <= 0).nonzero().flatten().tolist()
            log.warning("LocalBlend: the blend words of prompt(s) %s have no attention; their masks are empty", empty)
        return (maps / peak.clamp_min(1e-12)).gt(threshold)

    def mask(self) -> torch.Tensor:
        """(P, 1, H, W) float mask in latent resolution; row 0 (source) unused, row t = source ∪ target t."""
        if self.summed is None:
            raise RuntimeError(
                f"LocalBlend recorded no cross-attention maps at {self.grid[0]}×{self.grid[1]}; "
                f"the model's text-attention layers are at {sorted(self.seen_grids)} — "
                "choose resolution_downsamplings accordingly"
            )
        mask = self._mask(self.weights, self.threshold, dilate=True)
        mask = mask[:1] | mask  # union of the source's words and each prompt's own
        if self.subtract is not None:  # null-text notebook: the subtract mask is a source ∪ prompt union too
            subtract = self._mask(self.subtract, self.subtract_threshold, dilate=False)
            mask = mask & ~(subtract[:1] | subtract)
        return mask.float()

    def blend_latents(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        """The latent callback: x_t ← x_src + mask·(x_t − x_src) for every prompt, from `start_step` on."""
        if step < self.start_step:
            return latents
        mask = self.mask().to(latents)
        empty = (mask.flatten(1).amax(dim=1) == 0).nonzero().flatten()
        empty = empty[empty > 0]
        if len(empty):  # an empty mask would collapse the target onto the source: leave that target unblended
            log.warning(
                "LocalBlend at step %d: empty mask for prompt(s) %s; leaving them unblended "
                "(lower the threshold or check the blend words)",
                step,
                empty.tolist(),
            )
            mask[empty] = 1.0
        self.last_mask = mask
        return latents[:1] + mask * (latents - latents[:1])
