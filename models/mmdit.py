"""The MM-DiT of Stable Diffusion 3 / 3.5 (Esser et al. 2024, "Scaling Rectified Flow Transformers", §4),
keys as in the original single-file checkpoints under `model.diffusion_model.`.

Names follow Stability-AI/sd3.5 `mmditx.py`: `joint_blocks.N.context_block` (text stream) and `x_block`
(image stream), each a `DismantledBlock` with `attn.qkv`, `attn.proj`, `mlp.fc1/fc2`, `adaLN_modulation.1`;
`x_embedder.proj` (2×2 patches), the stored sin-cos table `pos_embed`, `t_embedder` / `y_embedder` (timestep
and pooled CLIP vector → the conditioning `c`), `context_embedder` (4096-d text features), `final_layer`.
- SD3.5: RMSNorm on q and k per head (`attn.ln_q` / `attn.ln_k`).
- SD3.5-medium ("MMDiT-X"): blocks 0–12 add an image-only self-attention `x_block.attn2`, with three more
  modulation vectors (9 instead of 6).
- The last block's text stream is `pre_only`: it supplies keys/values, then stops (no proj, no MLP).

The joint attention (`models.attention.JointAttention`, site `joint_blocks.N`) sees `[text | image]`;
the text range comes from the context's shape, and the site says which columns are CLIP and which T5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from models.attention import JointAttention, name_attention_sites, rms_norm
from models.errors import UserError

CHECKPOINT_PREFIX = "model.diffusion_model."  # where the original SD3 files keep the transformer
# Tensors a released file may carry that are not weights (../shared/sd-keys/keys_sd3*_extras.txt): the reference
# wrapper's shifted σ table. A strict loader accepts and drops exactly these.
DECLARED_EXTRA_KEYS = ("model.model_sampling.sigmas",)
TIMESTEP_FREQUENCIES = 256  # width of the sinusoidal timestep features (DiT's `frequency_embedding_size`)
# SD3 pipelines: CLIP-L ‖ bigG states fill the first 77 text positions (zero-padded from 2048 to 4096 features),
# T5 tokens follow. Only used to *label* the text columns for controllers; the model itself takes any length.
CLIP_TEXT_POSITIONS = 77


@dataclass
class MMDiTConfig:
    depth: int = 24  # joint blocks; the released models tie hidden = 64·depth and heads = depth
    hidden_size: int = 1536  # width of both streams
    num_heads: int = 24  # head dim = hidden_size / num_heads (64 in every release)
    patch_size: int = 2  # latent pixels per token side
    in_channels: int = 16  # latent channels of the 16-channel VAE
    pos_embed_max_size: int = 192  # side of the stored sin-cos table, in patches (192 → up to 1536² px)
    pos_embed_base_size: int = 64  # table positions are scaled by base/max (diffusers: sample_size/patch_size)
    context_dim: int = 4096  # text feature width entering `context_embedder` (T5-XXL; CLIP zero-padded)
    pooled_dim: int = 2048  # pooled CLIP-L ‖ bigG vector entering `y_embedder`
    mlp_ratio: float = 4.0  # MLP hidden = mlp_ratio · hidden_size
    qk_norm: bool = False  # SD3.5: RMSNorm (eps 1e-6) on q and k of every head
    x_self_attn_blocks: tuple[int, ...] = field(default_factory=tuple)  # SD3.5-medium: 0…12 have `attn2`
    clip_text_positions: int = CLIP_TEXT_POSITIONS  # leading text positions labelled "clip" (rest "t5")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def sd3_medium() -> MMDiTConfig:
    return MMDiTConfig()


def sd35_medium() -> MMDiTConfig:
    return MMDiTConfig(pos_embed_max_size=384, qk_norm=True, x_self_attn_blocks=tuple(range(13)))


def sd35_large() -> MMDiTConfig:
    return MMDiTConfig(depth=38, hidden_size=2432, num_heads=38, qk_norm=True)


PRESETS = {"sd3-medium": sd3_medium, "sd35-medium": sd35_medium, "sd35-large": sd35_large}


def timestep_embedding(t: torch.Tensor, dim: int = TIMESTEP_FREQUENCIES, *, max_period: float = 10000.0):
    """(b,) → (b, dim) features `[cos(t·f_i) | sin(t·f_i)]`, f_i = max_period^(−i/(dim/2)) (DiT, `TimestepEmbedder`)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_table(dim: int, max_size: int, *, base_size: int) -> torch.Tensor:
    """(1, max_size², dim) 2-D sin-cos table (MAE/DiT): `[sincos(col) | sincos(row)]`, rows major, positions
    scaled by base_size/max_size as diffusers' `get_2d_sincos_pos_embed` does. Real checkpoints store it."""
    coords = torch.arange(max_size, dtype=torch.float64) * base_size / max_size
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    angles = coords[:, None] * omega  # (max_size, dim/4)
    axis = torch.cat([angles.sin(), angles.cos()], dim=1).float()  # (max_size, dim/2), the same for rows and cols
    cols = axis[None, :, :].expand(max_size, max_size, -1)
    rows = axis[:, None, :].expand(max_size, max_size, -1)
    return torch.cat([cols, rows], dim=-1).reshape(1, max_size * max_size, dim)


class RMSNorm(nn.Module):
    """RMSNorm with a `weight` (SD3.5's `ln_q` / `ln_k`, over the head dimension)."""

    def __init__(self, dim: int, *, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, eps=self.eps)


class Embedder(nn.Module):
    """Linear → SiLU → Linear (`t_embedder.mlp`, `y_embedder.mlp`)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x):
        return self.mlp(x)


class PatchEmbed(nn.Module):
    def __init__(self, c: MMDiTConfig):
        super().__init__()
        self.proj = nn.Conv2d(c.in_channels, c.hidden_size, c.patch_size, stride=c.patch_size)

    def forward(self, x):
        return rearrange(self.proj(x), "b c h w -> b (h w) c")


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SelfAttention(nn.Module):
    """The projections of one stream: fused `qkv`, optional `ln_q`/`ln_k`, `proj` (absent when pre_only).

    With `own_site=True` (SD3.5-medium's `attn2`) it also attends by itself, image tokens only, through its
    own hook site (kind "self").
    """

    def __init__(self, dim: int, heads: int, *, qk_norm: bool, pre_only: bool = False, own_site: bool = False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
        if qk_norm:
            self.ln_q, self.ln_k = RMSNorm(dim // heads), RMSNorm(dim // heads)
        if own_site:
            self.attention = JointAttention(kind="self")

    def pre_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(b, n, dim) → q, k, v each (b, heads, n, head_dim)."""
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        if hasattr(self, "ln_q"):
            q, k = self.ln_q(q), self.ln_k(k)
        return q, k, v

    def forward(self, x: torch.Tensor, *, query_hw: tuple[int, int]) -> torch.Tensor:
        q, k, v = self.pre_attention(x)
        return self.proj(self.attention(q, k, v, num_text=0, query_hw=query_hw))


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class DismantledBlock(nn.Module):
    """One stream of a joint block (adaLN-zero DiT block, Peebles & Xie 2023) split around the attention.

    adaLN_modulation.1 gives, in order: shift/scale/gate for attention, shift/scale/gate for the MLP
    (6 vectors), + shift/scale/gate for `attn2` (9, SD3.5-medium), or only shift/scale (2) when pre_only.
    """

    def __init__(self, c: MMDiTConfig, *, pre_only: bool = False, x_self_attn: bool = False):
        super().__init__()
        dim = c.hidden_size
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, c.num_heads, qk_norm=c.qk_norm, pre_only=pre_only)
        if x_self_attn:
            self.attn2 = SelfAttention(dim, c.num_heads, qk_norm=c.qk_norm, own_site=True)
        if not pre_only:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(dim, int(dim * c.mlp_ratio))
        self.num_vectors = 2 if pre_only else 9 if x_self_attn else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.num_vectors * dim))

    def pre_attention(self, x, c):
        """→ (q, k, v) of this stream, and the modulation vectors `post_attention` needs."""
        mods = self.adaLN_modulation(c).chunk(self.num_vectors, dim=1)
        normed = self.norm1(x)
        return self.attn.pre_attention(modulate(normed, mods[0], mods[1])), (normed, mods)

    def post_attention(self, attn_out, x, saved, *, query_hw):
        normed, mods = saved
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        x = x + gate_msa[:, None] * self.attn.proj(attn_out)
        if hasattr(self, "attn2"):
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            x = x + gate_msa2[:, None] * self.attn2(modulate(normed, shift_msa2, scale_msa2), query_hw=query_hw)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """Text and image streams, each with its own weights, meeting in one attention (`block_mixing`)."""

    def __init__(self, c: MMDiTConfig, *, last: bool, x_self_attn: bool):
        super().__init__()
        self.context_block = DismantledBlock(c, pre_only=last)
        self.x_block = DismantledBlock(c, x_self_attn=x_self_attn)
        self.attention = JointAttention()

    def forward(self, context, x, c, *, query_hw, text_segments):
        """context (b, n_text, dim), x (b, H·W, dim), c (b, dim) → (context or None after the last block, x)."""
        num_text = context.shape[1]
        (ctx_q, ctx_k, ctx_v), ctx_saved = self.context_block.pre_attention(context, c)
        (x_q, x_k, x_v), x_saved = self.x_block.pre_attention(x, c)
        joint = self.attention(
            torch.cat([ctx_q, x_q], dim=2),
            torch.cat([ctx_k, x_k], dim=2),
            torch.cat([ctx_v, x_v], dim=2),
            num_text=num_text,
            query_hw=query_hw,
            text_segments=text_segments,
        )  # (b, n_text + H·W, dim), text first
        context_out, x_out = joint[:, :num_text], joint[:, num_text:]
        if self.context_block.pre_only:
            context = None
        else:
            context = self.context_block.post_attention(context_out, context, ctx_saved, query_hw=query_hw)
        return context, self.x_block.post_attention(x_out, x, x_saved, query_hw=query_hw)


class FinalLayer(nn.Module):
    def __init__(self, c: MMDiTConfig):
        super().__init__()
        self.norm_final = nn.LayerNorm(c.hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(c.hidden_size, c.patch_size**2 * c.in_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c.hidden_size, 2 * c.hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class MMDiT(nn.Module):
    """SD3 / SD3.5 velocity model: v ≈ ε − x0 at σ (Esser et al. 2024, Eq. 2 with the rectified-flow path)."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        c = self.config = config
        self.x_embedder = PatchEmbed(c)
        self.register_buffer(
            "pos_embed", sincos_pos_table(c.hidden_size, c.pos_embed_max_size, base_size=c.pos_embed_base_size)
        )
        self.t_embedder = Embedder(TIMESTEP_FREQUENCIES, c.hidden_size)
        self.y_embedder = Embedder(c.pooled_dim, c.hidden_size)
        self.context_embedder = nn.Linear(c.context_dim, c.hidden_size)
        self.joint_blocks = nn.ModuleList(
            JointBlock(c, last=i == c.depth - 1, x_self_attn=i in c.x_self_attn_blocks) for i in range(c.depth)
        )
        self.final_layer = FinalLayer(c)
        name_attention_sites(self)

    def cropped_pos_embed(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        """The centre (h, w) crop of the stored table → (1, h·w, dim)."""
        h, w = grid_hw
        side = self.config.pos_embed_max_size
        if h > side or w > side:
            raise UserError(
                f"a latent of {h}×{w} patches is larger than this model's position table "
                f"({side}×{side} patches, i.e. {side * self.config.patch_size * 8} px at most per side)"
            )
        top, left = (side - h) // 2, (side - w) // 2
        table = rearrange(self.pos_embed, "1 (h w) c -> 1 h w c", h=side)
        return rearrange(table[:, top : top + h, left : left + w], "1 h w c -> 1 (h w) c")

    def text_segments(self, num_text: int) -> tuple[tuple[str, int, int], ...]:
        """Which text columns are CLIP and which T5 (SD3 pipelines: 77 CLIP positions, then T5)."""
        clip = min(self.config.clip_text_positions, num_text)
        return (("clip", 0, clip),) + ((("t5", clip, num_text),) if num_text > clip else ())

    def forward(
        self,
        x: torch.Tensor,
        *,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor,
        text_segments: tuple[tuple[str, int, int], ...] | None = None,
    ) -> torch.Tensor:
        """x (b, 16, H, W) latents at σ; timesteps (b,) = 1000·σ; context (b, n_text, 4096) text features
        (any n_text); pooled (b, 2048) → velocity (b, 16, H, W). `text_segments` overrides the CLIP/T5 labels."""
        p = self.config.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise UserError(f"latent size {tuple(x.shape[-2:])} is not divisible by the patch size {p}")
        grid_hw = (x.shape[-2] // p, x.shape[-1] // p)
        x = self.x_embedder(x) + self.cropped_pos_embed(grid_hw).to(x.dtype)
        c = self.t_embedder(timestep_embedding(timesteps).to(x.dtype)) + self.y_embedder(pooled)
        context = self.context_embedder(context)
        segments = self.text_segments(context.shape[1]) if text_segments is None else tuple(text_segments)
        for block in self.joint_blocks:
            context, x = block(context, x, c, query_hw=grid_hw, text_segments=segments)
        x = self.final_layer(x, c)  # (b, h·w, p·p·channels)
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=grid_hw[0], p=p, q=p)
