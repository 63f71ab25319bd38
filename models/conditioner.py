"""SDXL's conditioning (Podell et al. 2023, §2.1-2.2): two text encoders side by side, and the vector `y`.

`Conditioner` has sgm's module tree, `conditioner.embedders.0` = OpenAI CLIP ViT-L/14 (stored under Hugging
Face names, mapped by rule like SD 1.x's) and `conditioner.embedders.1` = OpenCLIP ViT-bigG/14 (open_clip names).
Each gives its penultimate layer's states without the final layer norm; concatenated along the feature axis
they are the 2048-d cross-attention context (768 + 1280). bigG also gives the pooled embedding (1280).

`size_conditioning` builds the UNet's extra input `y` = [pooled text | emb(original h, w) | emb(crop top, left)
| emb(target h, w)], each number embedded sinusoidally like a timestep (sgm's `ConcatTimestepEmbedderND`,
diffusers' `add_time_proj`): 1280 + 6 × 256 = 2816 for SDXL base.

Both tokenizers are CLIP's BPE; CLIP-L pads with the end token 49407, bigG with 0 (sgm: open_clip.tokenize;
diffusers: tokenizer_2's pad token "!" = id 0). Padding only touches positions after the end token, so a word
sits at the same positions for both: P2P's token positions hold for the concatenated context.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.errors import UserError
from models.text import TextConditioning, TextConfig, TextEncoder
from models.unet import timestep_embedding

CLIP_L_HF_PREFIX = "conditioner.embedders.0.transformer.text_model."  # the file's CLIP-L keys (Hugging Face names)
CLIP_L_PREFIX = "conditioner.embedders.0.model."  # the same weights in our open_clip layout (`hf_clip_to_open_clip`)
SIZE_EMBEDDING_DIM = 256  # per number of the size conditioning (sgm `outdim: 256`; diffusers addition_time_embed_dim)


class Conditioner(nn.Module):
    """`conditioner.embedders.N`: text encoders whose contexts are concatenated; the one with a projection pools."""

    def __init__(self, configs: Sequence[TextConfig]):
        super().__init__()
        if sum(bool(c.projection_dim) for c in configs) != 1:
            raise ValueError(
                f"exactly one of the text encoders must have a projection (the pooled embedding); "
                f"got projection_dim {[c.projection_dim for c in configs]}"
            )
        self.embedders = nn.ModuleList(TextEncoder(c) for c in configs)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """The first encoder's ids; the others' differ only in the padding after the end token."""
        return self.embedders[0].tokenize(prompts)

    def features(self, prompts: list[str], *, dtype: torch.dtype | None = None) -> TextConditioning:
        """Prompts → context (b, 77, Σ widths) and pooled (b, projection_dim), each encoder with its own padding."""
        parts = []
        for encoder in self.embedders:
            ids = encoder.tokenize(prompts).to(encoder.model.token_embedding.weight.device)
            parts.append(encoder.features(ids, dtype=dtype))
        pooled = next(part.pooled for part in parts if part.pooled is not None)
        return TextConditioning(torch.cat([part.context for part in parts], dim=-1), pooled)


def size_conditioning(
    pooled: torch.Tensor,
    *,
    original_size: tuple[int, int],
    crop: tuple[int, int],
    target_size: tuple[int, int],
    embedding_dim: int = SIZE_EMBEDDING_DIM,
) -> torch.Tensor:
    """SDXL's micro-conditioning (Podell et al. 2023, §2.2): pooled (b, p) → y (b, p + 6·embedding_dim).

    `original_size` (height, width): the training image's size before resizing; `crop` (top, left): the crop's
    corner; `target_size` (height, width): the output's size. The reference pipeline's defaults are original =
    target = the output's size and crop (0, 0). One row of sizes for the whole batch, in the order above.
    """
    numbers = [*original_size, *crop, *target_size]
    if len(numbers) != 6:
        raise UserError(
            f"original_size {original_size}, crop {crop} and target_size {target_size} must be "
            "two numbers each: (height, width), (top, left), (height, width)"
        )
    sizes = torch.tensor(numbers, dtype=torch.float32, device=pooled.device)
    embedded = timestep_embedding(sizes, embedding_dim).flatten()  # (6 · embedding_dim,), [cos | sin] per number
    return torch.cat([pooled, embedded.to(pooled.dtype).expand(pooled.shape[0], -1)], dim=1)
