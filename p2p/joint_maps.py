"""Recording joint-attention maps for the views and LocalBlend, without holding a full joint map (P2P_SPEC §5, §6, §10).

Both recorders keep only what is asked of them: the image rows × text columns (P2P's cross-attention map) of the
conditional half, averaged over heads, at the chosen blocks, taken slice by slice of query rows
(`models.attention.JointRequest`). A joint site's image grid is the latent's patch grid (latent / 2), whatever the
image size, so the LocalBlend mask needs no resolution constant.
- `JointStore`: an `AttentionStore` whose maps are (P, H·W, L) per block: the views read it as a cross layer.
- `JointBlend`: a `LocalBlend` whose word maps come from those columns, at every chosen block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from models.attention import AttentionSite, JointRequest
from p2p.blend import LocalBlend
from p2p.controllers import AttentionStore, LayerFilter
from p2p.joint import DEFAULT_QUERY_CHUNK, block_of, conditional_rows

JOINT_BLEND_DOWNSAMPLINGS = 1  # the joint sites' grid: the latent in 2×2 patches (SD3 and FLUX)


def image_text_part(probs: torch.Tensor, site: AttentionSite, num_prompts: int) -> tuple[torch.Tensor, int]:
    """(P, image rows of this slice, L) head-averaged image→text maps of the conditional half, and the index of the
    slice's first image row in the image grid (flattened)."""
    n_text, start = site.num_text_keys, site.rows[0]
    first = max(start, n_text)
    cond = probs[conditional_rows(probs.shape[0], num_prompts)]
    return cond[:, :, first - start :, :n_text].mean(dim=1).float(), first - n_text


class JointStore(AttentionStore):
    """Head-averaged image→text maps of the chosen joint blocks, summed over steps: `maps[name]` is (P, H·W, L)."""

    def __init__(
        self,
        *,
        num_prompts: int,
        blocks: frozenset[str],
        per_step: bool = False,
        query_chunk: int | None = DEFAULT_QUERY_CHUNK,
    ):
        super().__init__(num_prompts=num_prompts, layers=LayerFilter(kinds=("joint",)), per_step=per_step)
        self.blocks, self.query_chunk = blocks, query_chunk
        self._partial: dict[str, torch.Tensor] = {}  # this forward pass's map, filled slice by slice

    def wants(self, site):
        return site.kind == "joint" and block_of(site.name) in self.blocks

    def joint_request(self, site: AttentionSite) -> JointRequest:
        return JointRequest(query_chunk=self.query_chunk, conditional_half=self.num_prompts)

    def __call__(self, probs, site):
        part, offset = image_text_part(probs, site, self.num_prompts)
        num_image = site.query_hw[0] * site.query_hw[1]
        if site.rows[0] == 0:
            self._partial[site.name] = torch.zeros(part.shape[0], num_image, part.shape[-1])
        self._partial[site.name][:, offset : offset + part.shape[1]] = part.cpu()
        if site.rows[1] == site.num_queries:  # the last slice: the pass's map is complete
            mean = self._partial.pop(site.name)
            self.sites[site.name] = dataclasses.replace(site, query_rows=None)
            self.maps[site.name] = self.maps[site.name] + mean if site.name in self.maps else mean.clone()
            self.counts[site.name] = self.counts.get(site.name, 0) + 1
            if self.per_step:
                self.steps.setdefault(self.step, {})[site.name] = mean.clone()
        return probs


class JointBlend(LocalBlend):
    """LocalBlend on the image→word columns of the chosen joint blocks (all of them share the patch grid)."""

    def __init__(self, *, blocks: frozenset[str], query_chunk: int | None = DEFAULT_QUERY_CHUNK, **kwargs):
        super().__init__(resolution_downsamplings=JOINT_BLEND_DOWNSAMPLINGS, **kwargs)
        self.blocks, self.query_chunk = blocks, query_chunk

    def wants(self, site: AttentionSite) -> bool:
        if site.kind != "joint" or block_of(site.name) not in self.blocks:
            return False
        self.seen_grids.add(site.query_hw)
        return site.query_hw == self.grid

    def joint_request(self, site: AttentionSite) -> JointRequest:
        return JointRequest(query_chunk=self.query_chunk, conditional_half=self.num_prompts)

    def __call__(self, probs, site):
        if site.num_text_keys != self.weights.shape[1]:
            raise RuntimeError(
                f"joint site {site.name} has {site.num_text_keys} text tokens, the blend was built for "
                f"{self.weights.shape[1]}"
            )
        part, offset = image_text_part(probs, site, self.num_prompts)  # (P, rows, L)
        if self.summed is None:
            self.summed = torch.zeros(self.num_prompts, site.num_text_keys, *self.grid)
        flat = self.summed.view(self.num_prompts, site.num_text_keys, -1)
        flat[:, :, offset : offset + part.shape[1]] += part.transpose(1, 2).cpu()
        return probs


def blend_words(words: Sequence, prompts: Sequence[str]) -> list[list[str]]:
    """The blend's words per prompt (`p2p.edit._per_prompt` checks them against CLIP; here they are looked up
    in the joint columns by `JointWords`)."""
    if all(isinstance(w, str) for w in words):
        return [list(words) for _ in prompts]
    return [[w] if isinstance(w, str) else list(w) for w in words]
