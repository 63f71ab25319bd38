"""The whole latent-diffusion model: UNet + VAE + text encoder, with the checkpoint's top-level names.

`StableDiffusion(config).state_dict()` has exactly the keys of an SD single-file checkpoint
(`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`), less the keys that
`models/loader.py` declares ignorable. Presets for the public models are at the bottom.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import torch
from torch import nn

from models.ddim import NUM_TRAIN_TIMESTEPS, PREDICTIONS, SD_BETA_END, SD_BETA_START, Schedule, scaled_linear_schedule
from models.errors import UserError
from models.text import TextConfig, TextEncoder
from models.unet import UNetConfig, UNetModel
from models.vae import AutoencoderKL, VAEConfig

SD_SCALE_FACTOR = 0.18215  # LDM's latent scale for the SD VAE: makes latents roughly unit-variance


@dataclass
class ModelConfig:
    name: str = "sd15"
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    prediction: str = "epsilon"  # "epsilon" (SD 1.x, SD 2.1-base) or "v" (SD 2.1 768-v)
    scale_factor: float = SD_SCALE_FACTOR  # latents = VAE mean × scale_factor
    image_size: int = 512  # the resolution the model was trained at (default height and width)
    beta_start: float = SD_BETA_START
    beta_end: float = SD_BETA_END
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
    guidance: float = 7.5  # default classifier-free guidance scale for this model

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise UserError(f"prediction {self.prediction!r} is not supported; use one of {PREDICTIONS}")

    @property
    def latent_factor(self) -> int:
        return self.vae.downsampling_factor

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        tuples = lambda sub: {k: tuple(v) if isinstance(v, list) else v for k, v in sub.items()}
        return cls(unet=UNetConfig(**tuples(d.pop("unet"))), vae=VAEConfig(**tuples(d.pop("vae"))),
                   text=TextConfig(**d.pop("text")), **d)

    @classmethod
    def from_json(cls, s: str) -> ModelConfig:
        return cls.from_dict(json.loads(s))


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `diffusion_model`, so its keys start with `model.diffusion_model.` as in LDM."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


class StableDiffusion(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DiffusionWrapper(UNetModel(config.unet))
        self.first_stage_model = AutoencoderKL(config.vae)
        self.cond_stage_model = TextEncoder(config.text)
        self.schedule: Schedule = scaled_linear_schedule(
            beta_start=config.beta_start, beta_end=config.beta_end, num_train_timesteps=config.num_train_timesteps)

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoder(self) -> TextEncoder:
        return self.cond_stage_model

    @property
    def context_length(self) -> int:
        """Text positions per prompt that cross-attention sees: CLIP's 77 for SD, fewer for the tiny model."""
        return self.config.text.context_length

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts → (b, context_length, context_dim) text features in the model's dtype."""
        return self.cond_stage_model.encode(list(prompts)).to(self.dtype)

    def encode_images(self, images: torch.Tensor, *, sample: bool = False,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (b, 3, H, W) in [-1, 1] → scaled latents: the posterior mean (or a sample) × scale_factor."""
        posterior = self.first_stage_model.encode(images.to(self.device, self.dtype))
        latents = posterior.sample(generator) if sample else posterior.mean
        return latents * self.config.scale_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images (b, 3, H, W) in [-1, 1] (clamped)."""
        return self.first_stage_model.decode(latents.to(self.dtype) / self.config.scale_factor).clamp(-1, 1)


# --- presets of the public checkpoints (the model config is not stored in their files) -------------

def _sd1(name: str) -> ModelConfig:
    return ModelConfig(name=name, text=TextConfig(hf_layout=True))  # the other defaults above are SD 1.x


def _sd2(name: str, *, prediction: str, image_size: int) -> ModelConfig:
    return ModelConfig(
        name=name,
        unet=UNetConfig(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True, upcast_attention=True),
        text=TextConfig(width=1024, heads=16, layers=23, act="gelu", pad_token=0),  # 23 of 24: penultimate
        prediction=prediction, image_size=image_size)


def tiny_config() -> ModelConfig:
    """The built-in shapes-world model (issue 7): 32×32 RGB, 8×8×4 latents (VAE factor 4), a UNet with
    cross-attention at 8×8 and Imagen-style hybrid attention at 4×4 and 2×2, a 4-layer open_clip text
    transformer (width 64, padding with 0). ~13 M parameters, ~24 MB in fp16 (most of it CLIP's 49408-token
    embedding table). `scale_factor`, `guidance` and the text `context_length` are set by the training script
    (the shipped file: 16 positions, `conf/train_tiny.yaml`; this preset keeps CLIP's 77, which the tests of
    P2P at SD's length use)."""
    return ModelConfig(
        name="tiny",
        unet=UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(1, 2, 4),
                        attention_kinds=("cross", "hybrid", "hybrid"), num_head_channels=32, context_dim=64),
        vae=VAEConfig(ch=32, ch_mult=(1, 2, 4), num_res_blocks=1),
        text=TextConfig(width=64, heads=4, layers=4, act="gelu", pad_token=0),
        image_size=32, scale_factor=1.0, guidance=5.0)


PRESETS = {
    "sd14": lambda: _sd1("sd14"),
    "sd15": lambda: _sd1("sd15"),
    "sd21-base": lambda: _sd2("sd21-base", prediction="epsilon", image_size=512),
    "sd21": lambda: _sd2("sd21", prediction="v", image_size=768),
    "tiny": tiny_config,  # architecture only; the trained weights ship in models/weights/tiny.safetensors
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"model preset {name!r} is unknown; choose one of {sorted(PRESETS)} or a file with "
                         "its config in the metadata (the built-in tiny model)")
    return PRESETS[name]()
