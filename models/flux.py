"""FLUX.1 [dev] / [schnell] (Black Forest Labs 2024), keys as in BFL's `flux1-dev.safetensors` (no prefix).

Names follow black-forest-labs/flux `src/flux/model.py` and `modules/layers.py`: `img_in` / `txt_in` project
the packed latents (2×2 patches of 16 channels = 64) and the T5 features; `time_in`, `guidance_in` (dev only)
and `vector_in` (CLIP-L pooled) sum into the conditioning `vec`; `double_blocks.N` keep separate text and
image weights (`img_mod`, `img_attn.qkv`, `img_attn.norm.query_norm.scale`, `img_mlp.0`, and `txt_*`);
`single_blocks.N` run one stream over `[text | image]` with one fused projection (`linear1` = q|k|v|mlp-in)
and attention and MLP in parallel (`linear2` takes [attention | mlp]); `final_layer` as in DiT.
Positions enter as RoPE over (0, row, col) ids (axes 16/56/56 of the 128-d head), no stored table.

Every attention is a joint hook site (`double_blocks.N`, `single_blocks.N`): `[text | image]`, text first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from models.attention import JointAttention, name_attention_sites, rms_norm
from models.mmdit import TIMESTEP_FREQUENCIES, timestep_embedding

TIME_FACTOR = 1000.0  # BFL `timestep_embedding(t, dim, time_factor=1000)`: σ ∈ [0, 1] and guidance scaled by 1000


@dataclass
class FluxConfig:
    in_channels: int = 64  # packed latents: 16 channels × 2×2 patch
    vec_in_dim: int = 768  # CLIP-L pooled vector
    context_in_dim: int = 4096  # T5-XXL features
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24  # head dim 128 = sum(axes_dim)
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)  # RoPE dims per id axis (0 / row / col); sums to the head dim
    theta: float = 10000.0  # RoPE base
    qkv_bias: bool = True
    guidance_embed: bool = True  # dev is guidance-distilled (a guidance embedding); schnell is not

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def flux_dev() -> FluxConfig:
    return FluxConfig()


def flux_schnell() -> FluxConfig:
    return FluxConfig(guidance_embed=False)


PRESETS = {"flux-dev": flux_dev, "flux-schnell": flux_schnell}


def rope(pos: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """(b, n) positions → (b, n, dim/2, 2, 2) rotation matrices, angle pos·θ^(−2i/dim) (RoFormer Eq. 15)."""
    omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
    angles = torch.einsum("...n,d->...nd", pos.double(), omega)
    matrices = torch.stack([angles.cos(), -angles.sin(), angles.sin(), angles.cos()], dim=-1)
    return rearrange(matrices, "b n d (i j) -> b n d i j", i=2, j=2).float()


def position_rotations(ids: torch.Tensor, *, axes_dim: tuple[int, ...], theta: float) -> torch.Tensor:
    """(b, n, axes) ids → (b, 1, n, head_dim/2, 2, 2): one RoPE per id axis, concatenated (BFL `EmbedND`)."""
    return torch.cat([rope(ids[..., i], d, theta) for i, d in enumerate(axes_dim)], dim=-3).unsqueeze(1)


def image_ids(batch: int, grid_hw: tuple[int, int]) -> torch.Tensor:
    """(b, h·w, 3) ids (0, row, col) of a packed latent grid, rows major (BFL `prepare`)."""
    h, w = grid_hw
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return repeat(ids, "h w c -> b (h w) c", b=batch)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(b, 16, H, W) → (b, H/2·W/2, 64): 2×2 patches, channels major, as BFL and diffusers pack."""
    return rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack(tokens: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=grid_hw[0], ph=2, pw=2)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer, self.out_layer = nn.Linear(in_dim, hidden), nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))  # BFL's name for the RMSNorm weight

    def forward(self, x):
        return rms_norm(x, self.scale)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)


class SelfAttention(nn.Module):
    """One stream's projections in a double block: `qkv`, `norm` (QK RMSNorm), `proj`."""

    def __init__(self, dim: int, heads: int, *, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def pre_attention(self, x):
        """(b, n, dim) → q, k, v (b, heads, n, head_dim), q and k RMS-normed."""
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        return self.norm.query_norm(q), self.norm.key_norm(k), v


class Modulation(nn.Module):
    """`lin(silu(vec))` → (shift, scale, gate) once (single blocks) or twice (double: attention, MLP)."""

    def __init__(self, dim: int, *, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec):
        return self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


def layer_norm(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)  # the blocks' parameterless LayerNorms


class DoubleStreamBlock(nn.Module):
    def __init__(self, c: FluxConfig):
        super().__init__()
        dim, mlp_hidden = c.hidden_size, int(c.hidden_size * c.mlp_ratio)
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", Modulation(dim, double=True))
            setattr(self, f"{stream}_attn", SelfAttention(dim, c.num_heads, qkv_bias=c.qkv_bias))
            # index 1 is the parameterless GELU, so the checkpoint's `img_mlp.0` / `img_mlp.2` exist
            setattr(
                self,
                f"{stream}_mlp",
                nn.Sequential(nn.Linear(dim, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, dim)),
            )
        self.attention = JointAttention()

    def forward(self, img, txt, vec, *, rotations, query_hw, text_segments):
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(vec)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(vec)
        img_q, img_k, img_v = self.img_attn.pre_attention((1 + img_scale1) * layer_norm(img) + img_shift1)
        txt_q, txt_k, txt_v = self.txt_attn.pre_attention((1 + txt_scale1) * layer_norm(txt) + txt_shift1)
        num_text = txt.shape[1]
        joint = self.attention(
            torch.cat([txt_q, img_q], dim=2),
            torch.cat([txt_k, img_k], dim=2),
            torch.cat([txt_v, img_v], dim=2),
            num_text=num_text,
            query_hw=query_hw,
            text_segments=text_segments,
            rope=rotations,
        )  # (b, n_text + n_img, dim)
        txt_out, img_out = joint[:, :num_text], joint[:, num_text:]
        img = img + img_gate1 * self.img_attn.proj(img_out)
        img = img + img_gate2 * self.img_mlp((1 + img_scale2) * layer_norm(img) + img_shift2)
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_out)
        txt = txt + txt_gate2 * self.txt_mlp((1 + txt_scale2) * layer_norm(txt) + txt_shift2)
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over `[text | image]`; attention and MLP in parallel (Dehghani et al. 2023, ViT-22B §2.1)."""

    def __init__(self, c: FluxConfig):
        super().__init__()
        self.hidden_size, self.heads = c.hidden_size, c.num_heads
        self.mlp_hidden = int(c.hidden_size * c.mlp_ratio)
        self.linear1 = nn.Linear(c.hidden_size, 3 * c.hidden_size + self.mlp_hidden)  # q | k | v | mlp-in
        self.linear2 = nn.Linear(c.hidden_size + self.mlp_hidden, c.hidden_size)  # [attention | mlp] → out
        self.norm = QKNorm(c.head_dim)
        self.modulation = Modulation(c.hidden_size, double=False)
        self.attention = JointAttention()

    def forward(self, x, vec, *, num_text, rotations, query_hw, text_segments):
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = self.linear1((1 + scale) * layer_norm(x) + shift).split(
            [3 * self.hidden_size, self.mlp_hidden], dim=-1
        )
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.heads)
        q, k = self.norm.query_norm(q), self.norm.key_norm(k)
        attn = self.attention(
            q, k, v, num_text=num_text, query_hw=query_hw, text_segments=text_segments, rope=rotations
        )
        return x + gate * self.linear2(torch.cat([attn, F.gelu(mlp, approximate="tanh")], dim=2))


class LastLayer(nn.Module):
    def __init__(self, c: FluxConfig):
        super().__init__()
        self.linear = nn.Linear(c.hidden_size, c.in_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c.hidden_size, 2 * c.hidden_size))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear((1 + scale[:, None]) * layer_norm(x) + shift[:, None])


class Flux(nn.Module):
    """FLUX.1 velocity model on packed latents: v ≈ ε − x0 at σ (rectified flow, Esser et al. 2024)."""

    def __init__(self, config: FluxConfig):
        super().__init__()
        c = self.config = config
        if sum(c.axes_dim) != c.head_dim:
            raise ValueError(f"RoPE axes {c.axes_dim} must sum to the head dim {c.head_dim}")
        self.img_in = nn.Linear(c.in_channels, c.hidden_size)
        self.time_in = MLPEmbedder(TIMESTEP_FREQUENCIES, c.hidden_size)
        self.vector_in = MLPEmbedder(c.vec_in_dim, c.hidden_size)
        if c.guidance_embed:
            self.guidance_in = MLPEmbedder(TIMESTEP_FREQUENCIES, c.hidden_size)
        self.txt_in = nn.Linear(c.context_in_dim, c.hidden_size)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(c) for _ in range(c.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(c) for _ in range(c.depth_single_blocks))
        self.final_layer = LastLayer(c)
        name_attention_sites(self)

    def forward(
        self,
        img: torch.Tensor,
        *,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor,
        guidance: torch.Tensor | None = None,
        grid_hw: tuple[int, int] | None = None,
        text_segments: tuple[tuple[str, int, int], ...] | None = None,
    ) -> torch.Tensor:
        """img (b, n_img, 64) packed latents (`pack`), img_ids (b, n_img, 3) (`image_ids`), txt (b, n_txt, 4096)
        T5 features, txt_ids (b, n_txt, 3) zeros, timesteps (b,) σ ∈ [0, 1], y (b, 768) CLIP-L pooled,
        guidance (b,) the distilled guidance scale (dev only) → velocity (b, n_img, 64).
        `grid_hw` (packed rows, cols) labels the sites; by default read from the ids."""
        if self.config.guidance_embed and guidance is None:
            raise ValueError("this FLUX model is guidance-distilled (dev): pass `guidance`, e.g. 3.5")
        if grid_hw is None:
            grid_hw = (int(img_ids[0, :, 1].max()) + 1, int(img_ids[0, :, 2].max()) + 1)
        text_segments = (("t5", 0, txt.shape[1]),) if text_segments is None else tuple(text_segments)
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps * TIME_FACTOR).to(img.dtype))
        if self.config.guidance_embed:
            vec = vec + self.guidance_in(timestep_embedding(guidance * TIME_FACTOR).to(img.dtype))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        rotations = position_rotations(
            torch.cat([txt_ids, img_ids], dim=1), axes_dim=self.config.axes_dim, theta=self.config.theta
        )  # text first, as the tokens
        sites = dict(rotations=rotations, query_hw=grid_hw, text_segments=text_segments)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, **sites)
        num_text = txt.shape[1]
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = block(x, vec, num_text=num_text, **sites)
        return self.final_layer(x[:, num_text:], vec)
