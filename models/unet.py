"""The latent-diffusion UNet, with attribute paths equal to the checkpoint keys under `model.diffusion_model.`.

Layout follows CompVis `ldm/modules/diffusionmodules/openaimodel.py` (Rombach et al. 2022, §3.3),
so `input_blocks.4.1.transformer_blocks.0.attn2.to_q` is a real module path and loading is a plain
strict `load_state_dict`. Parameterless layers sit in `nn.Sequential` so indexes such as
`out_layers.3` and `time_embed.2` exist.

Each transformer level uses one of two attention kinds (`UNetConfig.attention_kinds`):
"cross" = SD's block (self-attention `attn1`, then text cross-attention `attn2`);
"hybrid" = Imagen's block (one `attn1` over text + pixels, no `attn2`).

SDXL is a configuration of this same UNet: three levels, transformer depth (0, 2, 10) per level (none at
the top), and `label_emb`, an MLP on the vector `y` (pooled text + size embeddings) whose output is added
to the time embedding (sgm's `openaimodel.py` with `num_classes="sequential"`).

References: Ho et al. 2020 (UNet + timestep embedding), Rombach et al. 2022 (cross-attention
conditioning, Eq. 3), Saharia et al. 2022 (Imagen, hybrid attention), Podell et al. 2023 (SDXL, §2.1-2.2).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from torch import nn

from models.attention import CrossAttention, HybridAttention, name_attention_sites
from models.errors import UserError


@dataclass
class UNetConfig:
    in_channels: int = 4  # latent channels
    out_channels: int = 4  # ε or v, same shape as the latent
    model_channels: int = 320  # width of the first level
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # width multiplier per level; len-1 downsamplings
    num_res_blocks: int = 2  # ResBlocks per level on the way down (one more on the way up)
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors that get a transformer
    attention_kinds: tuple[str, ...] = ()  # "cross" or "hybrid" per level; empty = all "cross" (SD)
    num_heads: int = 8  # SD 1.x: fixed head count ...
    num_head_channels: int = -1  # ... SD 2.x: fixed head width (64) instead; -1 = use num_heads
    transformer_depth: int | tuple[int, ...] = 1  # blocks per SpatialTransformer: one for all, or one per level
    # (SDXL: (0, 2, 10) — 0 = no transformer at that level); the middle block takes the last level's
    context_dim: int = 768  # text feature width: 768 (CLIP ViT-L), 1024 (OpenCLIP ViT-H)
    use_linear_in_transformer: bool = False  # SD 2.x: Linear proj_in/proj_out instead of 1×1 convs
    upcast_attention: bool = False  # SD 2.x: attention in float32 even when the model runs in fp16
    adm_in_channels: int = 0  # SDXL: width of the vector `y` (2816) that `label_emb` adds to the time embedding
    latent_multiple: int = 1  # latent sides must be multiples of this; 1 = any size (the up path follows the
    # skips' sizes, as diffusers' UNet does); SDXL: 4 = 2**(levels-1), the sizes its reference UNet (sgm) takes

    def kind_at(self, level: int) -> str:
        return self.attention_kinds[level] if self.attention_kinds else "cross"

    def depth_at(self, level: int) -> int:
        depth = self.transformer_depth
        return depth if isinstance(depth, int) else depth[level]


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding (b,) → (b, dim), [cos | sin] order as in LDM (diffusers: flip_sin_to_cos=True,
    freq_shift=0). SDXL embeds its size conditioning with the same function (`models/conditioner.py`)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (LDM's `normalization`), so fp16 models stay stable."""

    def forward(self, x):
        # weights in float32 too: CPU kernels refuse a float32 input with fp16/bf16 parameters
        weight, bias = (None if p is None else p.float() for p in (self.weight, self.bias))
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def normalization(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    return GroupNorm32(32, channels, eps=eps)  # 32 groups everywhere in SD


class ResBlock(nn.Module):
    """Two 3×3 convolutions with the timestep embedding added in between (Ho et al. 2020, App. B)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        # index 2 is dropout in the original; Identity keeps "out_layers.3" at its checkpoint index
        self.out_layers = nn.Sequential(
            normalization(out_channels), nn.SiLU(), nn.Identity(), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None].type(x.dtype)
        return self.skip_connection(x) + self.out_layers(h)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020), the first half of SD's feed-forward."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))  # .1 = dropout

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: attn1 → (attn2) → feed-forward, each with a residual."""

    def __init__(self, dim: int, *, heads: int, dim_head: int, context_dim: int, kind: str, upcast: bool):
        super().__init__()
        self.kind = kind
        if kind == "cross":
            self.attn1 = CrossAttention(query_dim=dim, heads=heads, dim_head=dim_head, upcast=upcast)
            self.attn2 = CrossAttention(
                query_dim=dim, context_dim=context_dim, heads=heads, dim_head=dim_head, upcast=upcast
            )
            self.norm2 = nn.LayerNorm(dim)
        elif kind == "hybrid":
            self.attn1 = HybridAttention(
                query_dim=dim, context_dim=context_dim, heads=heads, dim_head=dim_head, upcast=upcast
            )
        else:
            raise UserError(f"attention kind {kind!r} is not supported; use 'cross' or 'hybrid'")
        self.ff = FeedForward(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, *, query_hw: tuple[int, int]) -> torch.Tensor:
        if self.kind == "cross":
            x = self.attn1(self.norm1(x), query_hw=query_hw) + x
            x = self.attn2(self.norm2(x), context, query_hw=query_hw) + x
        else:
            x = self.attn1(self.norm1(x), context, query_hw=query_hw) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Image → token sequence → transformer blocks → image, with a residual (LDM §3.3)."""

    def __init__(
        self,
        channels: int,
        *,
        heads: int,
        dim_head: int,
        depth: int,
        context_dim: int,
        use_linear: bool,
        kind: str,
        upcast: bool,
    ):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = GroupNorm32(32, channels, eps=1e-6)  # LDM's `Normalize`: eps 1e-6 here, 1e-5 in ResBlocks
        proj = (lambda i, o: nn.Linear(i, o)) if use_linear else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = proj(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner, heads=heads, dim_head=dim_head, context_dim=context_dim, kind=kind, upcast=upcast
            )
            for _ in range(depth)
        )
        self.proj_out = proj(inner, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = rearrange(h, "b c h w -> b (h w) c")
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, query_hw=(height, width))
        if self.use_linear:
            h = self.proj_out(h)
        # contiguous, as diffusers' Transformer2DModel does: the permuted view is channels-last-strided, and a
        # conv or add on it would make every later activation channels-last, with a copy at each mixed-layout op
        h = rearrange(h, "b (h w) c -> b c h w", h=height, w=width).contiguous()
        if not self.use_linear:
            h = self.proj_out(h)
        return h + x


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size: tuple[int, int] | None = None):
        # `size` = the matching skip's size, so latents of any size (images of any multiple of 8) work
        up = F.interpolate(x, size=size, mode="nearest") if size else F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(up)


class TimestepEmbedSequential(nn.Sequential):
    """A sequential whose layers get what they need: ResBlocks the time embedding, transformers the text."""

    def forward(self, x, emb, context, upsample_size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        if c.attention_kinds and len(c.attention_kinds) != len(c.channel_mult):
            raise UserError(
                f"attention_kinds {c.attention_kinds} needs one entry per level "
                f"({len(c.channel_mult)} levels in channel_mult {c.channel_mult})"
            )
        emb_dim = c.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if c.adm_in_channels:  # sgm's `num_classes="sequential"`: an MLP inside a one-entry Sequential (label_emb.0.0)
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(c.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            )

        def transformer(ch: int, level: int) -> SpatialTransformer:
            heads, dim_head = (
                (ch // c.num_head_channels, c.num_head_channels)
                if c.num_head_channels > 0
                else (c.num_heads, ch // c.num_heads)
            )
            return SpatialTransformer(
                ch,
                heads=heads,
                dim_head=dim_head,
                depth=c.depth_at(level),
                context_dim=c.context_dim,
                use_linear=c.use_linear_in_transformer,
                kind=c.kind_at(level),
                upcast=c.upcast_attention,
            )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(c.in_channels, c.model_channels, 3, padding=1))]
        )
        skip_channels, ch, ds = [c.model_channels], c.model_channels, 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers = [ResBlock(ch, emb_dim, mult * c.model_channels)]
                ch = mult * c.model_channels
                if ds in c.attention_resolutions and c.depth_at(level):
                    layers.append(transformer(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        last = len(c.channel_mult) - 1
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch), transformer(ch, last), ResBlock(ch, emb_dim, ch)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mult * c.model_channels)]
                ch = mult * c.model_channels
                if ds in c.attention_resolutions and c.depth_at(level):
                    layers.append(transformer(ch, level))
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), nn.Conv2d(c.model_channels, c.out_channels, 3, padding=1)
        )
        name_attention_sites(self)
        # True: when gradients are needed (null-text inversion), keep only each block's input and recompute its
        # inside during backward: activation memory of one block instead of all, for ~1 more forward in time.
        # The recompute runs attention again, so a controller attached then sees each site twice per step.
        self.gradient_checkpointing = False

    @contextlib.contextmanager
    def checkpointing(self, enabled: bool = True) -> Iterator[None]:
        """Set `gradient_checkpointing` for the duration of a `with` block (null-text inversion), then restore it."""
        before, self.gradient_checkpointing = self.gradient_checkpointing, bool(enabled)
        try:
            yield
        finally:
            self.gradient_checkpointing = before

    @property
    def has_vector_conditioning(self) -> bool:
        """True when the forward needs `y` (SDXL's pooled text + size embeddings)."""
        return bool(self.config.adm_in_channels)

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (b, 4, h, w) latents, timesteps: (b,) or scalar, context: (b, 77, context_dim),
        y: (b, adm_in_channels) for SDXL (None otherwise) → (b, 4, h, w)."""
        self._check_inputs(x, y)
        timesteps = torch.as_tensor(timesteps, device=x.device).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y.to(x.dtype))  # SDXL: time + (pooled text, sizes) embeddings
        run = (
            self._checkpointed
            if self.gradient_checkpointing and torch.is_grad_enabled()
            else (lambda block, *args: block(*args))
        )
        skips, h = [], x
        for block in self.input_blocks:
            h = run(block, h, emb, context)
            skips.append(h)
        h = run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = run(block, h, emb, context, tuple(skips[-1].shape[-2:]) if skips else None)
        return self.out(h)

    @staticmethod
    def _checkpointed(block: nn.Module, *args) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)

    def _check_inputs(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        c = self.config
        if self.has_vector_conditioning and (y is None or y.shape != (x.shape[0], c.adm_in_channels)):
            raise ValueError(
                f"this UNet adds a vector y of shape (batch, {c.adm_in_channels}) to its time embedding "
                f"(SDXL's pooled text and sizes); got {None if y is None else tuple(y.shape)} for "
                f"batch {x.shape[0]}: pass y=model.added_conditioning(...)"
            )
        if not self.has_vector_conditioning and y is not None:
            raise ValueError("this UNet takes no vector conditioning (no label_emb); pass y=None")
        height, width = x.shape[-2:]
        if height % c.latent_multiple or width % c.latent_multiple:
            raise UserError(
                f"latent size {height}×{width} is not a multiple of {c.latent_multiple} on each side, "
                f"which this UNet needs ({len(c.channel_mult) - 1} downsamplings)"
            )
