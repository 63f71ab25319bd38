"""Token grounding for training the built-in model (issue 7): TokenCompose's token loss (Wang et al. 2024).

The shapes world knows every object's pixels, so each object's color and shape tokens can be asked to draw
their cross-attention from that object: `GroundingCache` turns a batch's scenes and (possibly dropped)
captions into rows (sample, token position, mask), `CrossMaps` records one forward pass's cross-attention
maps with their graph, `grounding_loss` scores them. `p2p.shapes.losses.diffusion_loss` adds it with the weight
`unet.grounding` of conf/train_tiny.yaml.

`ColorMixer` is a second, optional handle on the same question — which token carries what (`unet.color_mix`):
the causal text encoder writes an object's color into every later position too, and a model trained on plain
captions reads it from there (measured on G3: a target embedding that differs from the source's only at the
color word reaches the target's color in 2% of 53 swaps), so a color word swap changes the values of the whole
caption. Mixed samples take their text features from the caption with *other* object colors everywhere but at
the color words themselves, so the color can only be read from its own word.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.attention import AttentionSite
from models.errors import UserError
from p2p.shapes.world import Scene, WorldConfig, make_caption, parse_caption
from p2p.tokens import word_token_positions, words


@dataclass
class Grounding:
    """Which token of which sample should attend from which pixels: one row per (sample, token position)."""

    sample: torch.Tensor  # (R,) long: the batch index
    token: torch.Tensor  # (R,) long: the text position (SOT = 0)
    mask: torch.Tensor  # (R, 1, H, W) float: the object's pixel mask at image resolution


class GroundingCache:
    """The color and shape token positions of each object of a world caption (`a C S [and a C S] …`), cached:
    CLIP's BPE is slow per call."""

    def __init__(self, context_length: int):
        self.context_length, self.positions = context_length, {}

    def __call__(self, scenes: list[Scene], captions: list[str]) -> Grounding:
        """Rows for every object of every scene whose caption was kept (a dropped caption, "", has no words)."""
        samples, tokens, masks = [], [], []
        for i, (scene, caption) in enumerate(zip(scenes, captions)):
            if caption != scene.caption:
                continue
            if caption not in self.positions:
                self.positions[caption] = self._object_positions(caption, len(scene.objects))
            for obj, positions in zip(scene.objects, self.positions[caption]):
                for k in positions:
                    samples.append(i), tokens.append(k), masks.append(obj.mask)
        if not samples:
            return Grounding(
                torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0, 1, 1, 1)
            )
        return Grounding(
            torch.tensor(samples), torch.tensor(tokens), torch.from_numpy(np.stack(masks)).float()[:, None]
        )

    def _object_positions(self, caption: str, num_objects: int) -> list[list[int]]:
        caption_words = words(caption)
        positions = []
        for j in range(
            num_objects
        ):  # object j's color and shape are words 4j+1 and 4j+2 (p2p.shapes.world.make_caption)
            color, shape = 4 * j + 1, 4 * j + 2
            if shape >= len(caption_words):
                raise UserError(f"caption {caption!r} does not name object {j + 1} as 'a <color> <shape>'")
            positions.append(
                [
                    k
                    for w in (color, shape)
                    for k in word_token_positions(caption, w, context_length=self.context_length)
                ]
            )
        return positions


class CrossMaps:
    """An attention controller that keeps the cross-attention maps of one forward pass, graph included."""

    def __init__(self):
        self.maps: list[torch.Tensor] = []

    def wants(self, site: AttentionSite) -> bool:
        return site.kind == "cross"

    def __call__(self, probs: torch.Tensor, site: AttentionSite) -> torch.Tensor:
        self.maps.append(probs.unflatten(2, site.query_hw))  # (b, heads, h, w, keys)
        return probs


def grounding_loss(maps: list[torch.Tensor], grounding: Grounding) -> torch.Tensor:
    """TokenCompose's token loss (Wang et al. 2024, Eq. 3): for each (sample, token, object mask) row and each
    cross-attention layer, the share of the token's attention (heads averaged) that comes from the object's
    pixels, A_in = Σ_{q ∈ mask} A_q / Σ_q A_q, and the loss (1 − A_in)², averaged over rows and layers.
    Masks are area-averaged to each layer's grid, so a pixel half inside counts half."""
    if len(grounding.sample) == 0 or not maps:
        return maps[0].new_zeros(()) if maps else torch.zeros(())
    losses = []
    for probs in maps:  # (b, heads, h, w, keys)
        h, w = probs.shape[2:4]
        mask = F.adaptive_avg_pool2d(grounding.mask.to(probs), (h, w)).flatten(1)  # (R, h·w)
        column = probs.mean(1)[grounding.sample.to(probs.device), :, :, grounding.token.to(probs.device)].flatten(1)
        inside = (column * mask).sum(1) / column.sum(1).clamp_min(1e-12)
        losses.append((1 - inside).pow(2).mean())
    return torch.stack(losses).mean()


@dataclass
class ColorMix:
    """Per sample: the caption whose features fill every position but the kept ones (the sample's own caption where
    it is not mixed), and which positions keep the sample's own features."""

    decoy_ids: torch.Tensor  # (b, context_length) token ids
    keep: torch.Tensor  # (b, context_length) bool: True = the sample's own caption's features


class ColorMixer:
    """Builds `ColorMix` for a batch: each kept caption is mixed with probability p (decoy colors drawn per object,
    always another color than the object's); dropped captions ("") and captions whose decoy tokenizes to other
    color-word positions are never mixed. `tokenize`: captions → (b, context_length) ids (p2p.shapes.training.TokenCache)."""

    def __init__(self, world: WorldConfig, tokenize, context_length: int):
        self.colors, self.world = list(world.colors), world
        self.tokenize, self.context_length, self.positions = tokenize, context_length, {}

    def color_positions(self, caption: str, num_objects: int) -> list[int]:
        if caption not in self.positions:  # object j's color is word 4j+1 (p2p.shapes.world.make_caption)
            self.positions[caption] = [
                k
                for j in range(num_objects)
                for k in word_token_positions(caption, 4 * j + 1, context_length=self.context_length)
            ]
        return self.positions[caption]

    def __call__(self, scenes: list[Scene], captions: list[str], *, p: float, rng: np.random.Generator) -> ColorMix:
        if not 0 <= p <= 1:
            raise UserError(f"color_mix={p!r} is not a probability in [0, 1]")
        mixed = rng.random(len(captions)) < p
        decoys, keep = list(captions), torch.ones(len(captions), self.context_length, dtype=torch.bool)
        for i, (scene, caption) in enumerate(zip(scenes, captions)):
            if not mixed[i] or caption != scene.caption:
                continue
            spec = parse_caption(caption, config=self.world)
            others = [[c for c in self.colors if c != color] for color, _ in spec.objects]
            decoy = make_caption(
                [(choices[rng.integers(len(choices))], shape) for choices, (_, shape) in zip(others, spec.objects)],
                background=spec.background,
            )
            positions = self.color_positions(caption, len(spec.objects))
            if positions != self.color_positions(decoy, len(spec.objects)):
                continue  # a decoy color of another token length would shift every later position
            decoys[i] = decoy
            keep[i] = False
            keep[i, positions] = True
        return ColorMix(self.tokenize(decoys), keep)
