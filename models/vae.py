"""The KL autoencoder of latent diffusion (Rombach et al. 2022, §3.1), keys under `first_stage_model.`.

Layout follows CompVis `ldm/modules/diffusionmodules/model.py` (`Encoder`, `Decoder`) and
`ldm/models/autoencoder.py` (`AutoencoderKL`): `encoder.down.1.block.0.nin_shortcut`,
`decoder.up.3.upsample.conv`, `encoder.mid.attn_1.q` are real module paths.
Images are in [-1, 1]; latents are multiplied by `scale_factor` (0.18215 for SD 1.x/2.x,
chosen by the LDM authors to give the latents unit variance) outside this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass
class VAEConfig:
    ch: int = 128  # width of the first level
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # per level; the image shrinks by 2**(len-1) (8 for SD)
    num_res_blocks: int = 2  # per level in the encoder (decoder has one more)
    in_channels: int = 3  # RGB
    z_channels: int = 4  # latent channels
    embed_dim: int = 4  # channels after quant_conv (== z_channels in SD)
    quant_conv: bool = True  # 1×1 quant_conv/post_quant_conv exist (SD 1.x/2.x/XL); the 16-channel VAE has none

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels with 1×1-conv projections (weights shaped (c, c, 1, 1))."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        height = x.shape[-2]
        h = self.norm(x)
        # contiguous rows: with the permuted views (last-dim stride h·w) the CPU's fused kernel is refused and SDPA
        # falls back to materialising the (h·w)² map: 2 GiB per image for a 1024² SDXL decode
        q, k, v = (rearrange(f(h), "b c h w -> b 1 (h w) c").contiguous() for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        # back in x's memory layout: a channels-last view added to an NCHW x (or the reverse) would spread mixed
        # layouts, and a copy, through every later layer
        layout = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
        return x + self.proj_out(rearrange(out, "b 1 (h w) c -> b c h w", h=height).contiguous(memory_format=layout))


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM pads right/bottom only, then a valid stride-2 conv


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: `block.N` ResnetBlocks, an empty `attn` list (SD uses none), a resampler."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(num_blocks)
        )
        self.attn = nn.ModuleList()


class Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        widths = [c.ch * m for m in c.ch_mult]
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down = nn.ModuleList()
        for i, width in enumerate(widths):
            level = Level(c.ch * (1 if i == 0 else c.ch_mult[i - 1]), width, c.num_res_blocks)
            if i != len(widths) - 1:
                level.downsample = Downsample(width)
            self.down.append(level)
        self.mid = Mid(widths[-1])
        self.norm_out = Normalize(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * c.z_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        widths = [c.ch * m for m in c.ch_mult]
        self.conv_in = nn.Conv2d(c.z_channels, widths[-1], 3, padding=1)
        self.mid = Mid(widths[-1])
        # `up` is indexed by level like `down` (up.0 is the full-resolution level) but runs in reverse
        self.up = nn.ModuleList()
        for i, width in enumerate(widths):
            level = Level(widths[i + 1] if i + 1 < len(widths) else widths[-1], width, c.num_res_blocks + 1)
            if i != 0:
                level.upsample = Upsample(width)
            self.up.append(level)
        self.norm_out = Normalize(widths[0])
        self.conv_out = nn.Conv2d(widths[0], c.in_channels, 3, padding=1)

    def forward(self, z):
        # channels-last throughout: oneDNN's CPU convolutions then need no reorder copies of their input and output
        # (measured at SD's widths, 256² decode on a 1-thread CPU: ~15% faster, 394 vs 475 MiB peak); NCHW out
        h = self.mid(self.conv_in(z.contiguous(memory_format=torch.channels_last)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        h = self.norm_out(h)  # rebinding h frees the full-resolution input before the SiLU's output exists
        return self.conv_out(F.silu(h)).contiguous()


@dataclass
class Posterior:
    """Diagonal Gaussian q(z|x) (Kingma & Welling 2014); `mean` is what inversion and editing use."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype, device="cpu")
        return self.mean + self.std * noise.to(self.mean.device)

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) ‖ N(0, I)) summed over latent dimensions, per image."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.quant_conv:
            self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
            self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        else:  # parameterless stand-ins: no keys in the state_dict, encode/decode unchanged
            self.quant_conv, self.post_quant_conv = nn.Identity(), nn.Identity()

    def encode(self, images: torch.Tensor) -> Posterior:
        """images (b, 3, H, W) in [-1, 1] → posterior over unscaled latents (b, 4, H/f, W/f)."""
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return Posterior(mean, logvar.clamp(-30.0, 20.0))  # LDM's clamp keeps exp() finite

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """unscaled latents → images in (roughly) [-1, 1]."""
        return self.decoder(self.post_quant_conv(latents))


def flow_vae() -> VAEConfig:
    """The 16-channel VAE of SD3 / SD3.5 (`first_stage_model.*`) and FLUX.1 (`ae.safetensors`, no prefix):
    SD's architecture with 16 latent channels and no quant convs (Esser et al. 2024, §5.2.1)."""
    return VAEConfig(z_channels=16, embed_dim=16, quant_conv=False)


@dataclass(frozen=True)
class LatentScaling:
    """What the diffusion model sees: (z − shift)·scale, chosen per VAE to give unit-variance, zero-mean latents."""

    scale_factor: float
    shift_factor: float = 0.0

    def to_model(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift_factor) * self.scale_factor

    def from_model(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.scale_factor + self.shift_factor


# diffusers `vae/config.json` of stabilityai/stable-diffusion-3-medium-diffusers (= SD3.5) and of
# black-forest-labs/FLUX.1-dev (= BFL `AutoEncoderParams(scale_factor=0.3611, shift_factor=0.1159)`)
SD3_LATENT_SCALING = LatentScaling(scale_factor=1.5305, shift_factor=0.0609)
FLUX_LATENT_SCALING = LatentScaling(scale_factor=0.3611, shift_factor=0.1159)
