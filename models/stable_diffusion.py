"""The whole latent-diffusion model: UNet + VAE + text encoder(s), with the checkpoint's top-level names.

`StableDiffusion(config).state_dict()` has exactly the keys of an SD single-file checkpoint
(`model.diffusion_model.*`, `first_stage_model.*`, and `cond_stage_model.*` or, for SDXL, `conditioner.*`),
less the keys that `models/loader.py` declares ignorable. Presets for the public models are at the bottom.

What the sampling loop calls, the same for every model:
- `encode_text(prompts)` → `TextConditioning(context (b, 77, d), pooled (b, 1280) for SDXL else None)`;
- `added_conditioning(pooled, height=, width=)` → SDXL's vector `y` for the UNet (None for SD 1.x/2.x);
- `unet(x, t, context, y=y)`; `decode_latents(latents)` / `encode_images(images)`.
The compute dtype (`dtype`) may differ from the weights' (`weights_dtype`): every layer casts its weights
to its input's dtype inside its forward (`models/precision.py`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import torch
from torch import nn

from models.conditioner import CLIP_L_HF_PREFIX, CLIP_L_PREFIX, SIZE_EMBEDDING_DIM, Conditioner, size_conditioning
from models.ddim import NUM_TRAIN_TIMESTEPS, PREDICTIONS, SD_BETA_END, SD_BETA_START, Schedule, scaled_linear_schedule
from models.errors import UserError
from models.precision import cast_weights_in_forward
from models.text import HF_PREFIX, OC_PREFIX, TextConditioning, TextConfig, TextEncoder, openclip_bigg
from models.unet import UNetConfig, UNetModel
from models.vae import AutoencoderKL, VAEConfig

SD_SCALE_FACTOR = 0.18215  # LDM's latent scale for the SD VAE: makes latents roughly unit-variance
SDXL_SCALE_FACTOR = 0.13025  # SDXL's VAE (retrained, same architecture): sgm's `scale_factor` in sd_xl_base.yaml


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
    # SDXL only ------------------------------------------------------------------------------------------------
    text_2: TextConfig | None = None  # a second text encoder (OpenCLIP bigG): `conditioner.embedders.0/1`
    size_embedding_dim: int = SIZE_EMBEDDING_DIM  # per number of the size conditioning (y = pooled + 6 of them)
    original_size: tuple[int, int] | None = None  # (height, width) for y; None = the output's size (reference)
    crop: tuple[int, int] = (0, 0)  # (top, left) crop corner for y
    target_size: tuple[int, int] | None = None  # (height, width) for y; None = the output's size (reference)
    force_zeros_for_empty_prompt: bool = False  # SDXL base: "" encodes to zero context and pooled (diffusers'
    # flag of that name; sgm's `force_uc_zero_embeddings`); False encodes "" through the text encoders
    # every model -----------------------------------------------------------------------------------------------
    vae_decode_fp32: bool = True  # decode in float32 whatever `dtype`: SDXL's VAE overflows in fp16 (NaN/black)

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise UserError(f"prediction {self.prediction!r} is not supported; use one of {PREDICTIONS}")
        if self.unet.adm_in_channels:
            pooled = self.text_2.projection_dim if self.text_2 else 0
            if self.unet.adm_in_channels != pooled + 6 * self.size_embedding_dim:
                raise ValueError(
                    f"unet.adm_in_channels {self.unet.adm_in_channels} must be the pooled text width "
                    f"{pooled} + 6 × size_embedding_dim {self.size_embedding_dim}"
                )

    @property
    def latent_factor(self) -> int:
        return self.vae.downsampling_factor

    @property
    def size_multiple(self) -> int:
        """Image heights and widths must be multiples of this: the VAE's factor × the UNet's latent multiple
        (8 for SD 1.x/2.x, whose UNet takes any latent size; 32 for SDXL)."""
        return self.latent_factor * self.unet.latent_multiple

    def check_image_size(self, *, height, width) -> None:
        """Raise a UserError naming the accepted multiple for a size this model cannot take."""
        multiple = self.size_multiple
        why = (
            f"the VAE's downsampling factor {self.latent_factor} × the UNet's latent multiple "
            f"{self.unet.latent_multiple}"
            if self.unet.latent_multiple > 1
            else "the VAE's downsampling factor"
        )
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
                nearest = (
                    max(multiple, round(value / multiple) * multiple)
                    if isinstance(value, (int, float)) and not isinstance(value, bool)
                    else self.image_size
                )
                model = f" for model {self.name!r}" if self.unet.latent_multiple > 1 else ""
                raise UserError(
                    f"{name}={value!r} is not a positive multiple of {multiple}{model} ({why}); try {nearest}"
                )

    def with_settings(self, **settings) -> ModelConfig:
        """A copy with top-level settings changed, e.g. from `conf/model/sdxl.yaml` (`original_size=[1024, 1024]`):
        lists become tuples; names that are not settings raise a UserError naming the accepted ones."""
        accepted = sorted(f.name for f in dataclasses.fields(self) if f.name not in ("unet", "vae", "text", "text_2"))
        unknown = sorted(set(settings) - set(accepted))
        if unknown:
            raise UserError(f"model settings {unknown} are unknown; accepted are {accepted}")
        return dataclasses.replace(self, **{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        tuples = lambda sub: {k: tuple(v) if isinstance(v, list) else v for k, v in sub.items()}
        d = tuples(d)
        text_2 = d.pop("text_2", None)
        return cls(
            unet=UNetConfig(**tuples(d.pop("unet"))),
            vae=VAEConfig(**tuples(d.pop("vae"))),
            text=TextConfig(**d.pop("text")),
            text_2=TextConfig(**text_2) if text_2 else None,
            **d,
        )

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
        if config.text_2 is None:
            self.cond_stage_model = TextEncoder(config.text)
        else:  # SDXL: sgm's `conditioner.embedders.0` (CLIP ViT-L) and `.1` (OpenCLIP bigG)
            self.conditioner = Conditioner((config.text, config.text_2))
        self.schedule: Schedule = scaled_linear_schedule(
            beta_start=config.beta_start, beta_end=config.beta_end, num_train_timesteps=config.num_train_timesteps
        )
        self.compute_dtype: torch.dtype | None = None  # set by the loader; None = the weights' dtype
        cast_weights_in_forward(self)

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoder(self) -> TextEncoder | Conditioner:
        return self.conditioner if self.config.text_2 is not None else self.cond_stage_model

    def hf_text_prefixes(self) -> list[tuple[str, str]]:
        """(file prefix with HF CLIP names, our open_clip-layout prefix) of each text encoder stored under HF names."""
        if self.config.text_2 is not None:
            return [(CLIP_L_HF_PREFIX, CLIP_L_PREFIX)]
        return [(HF_PREFIX, OC_PREFIX)] if self.config.text.hf_layout else []

    @property
    def context_length(self) -> int:
        """Text positions per prompt that cross-attention sees: CLIP's 77 for SD, fewer for the tiny model."""
        return self.config.text.context_length

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: inputs are cast to it; the weights may be stored in another (`weights_dtype`)."""
        return self.compute_dtype or next(self.parameters()).dtype

    @property
    def weights_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def encode_text(self, prompts: list[str]) -> TextConditioning:
        """Prompts → context (b, context_length, context_dim) and, for SDXL, pooled (b, 1280), in `dtype`.

        With `force_zeros_for_empty_prompt` (SDXL base), each empty prompt "" (the unconditional input of
        classifier-free guidance) gives zeros for both, as the reference pipeline does."""
        if isinstance(prompts, str):
            raise TypeError(f"encode_text takes a list of prompts, got the string {prompts!r}; wrap it in a list")
        prompts = list(prompts)
        if self.config.text_2 is not None:
            text = self.conditioner.features(prompts, dtype=self.dtype)
        else:
            ids = self.cond_stage_model.tokenize(prompts).to(self.cond_stage_model.model.token_embedding.weight.device)
            text = TextConditioning(self.cond_stage_model(ids, dtype=self.dtype))
        if self.config.force_zeros_for_empty_prompt:
            keep = torch.tensor([prompt != "" for prompt in prompts], device=text.context.device)
            text = TextConditioning(
                text.context * keep[:, None, None].to(text.context.dtype),
                None if text.pooled is None else text.pooled * keep[:, None].to(text.pooled.dtype),
            )
        return text

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts → (b, context_length, context_dim) text features in the model's dtype (`encode_text().context`)."""
        return self.encode_text(prompts).context

    def added_conditioning(self, pooled: torch.Tensor | None, *, height: int, width: int) -> torch.Tensor | None:
        """SDXL's UNet input `y` (b, 2816) for images of `height` × `width`: pooled text + embedded original size,
        crop and target size (`config.original_size`, `crop`, `target_size`; None = height, width).
        None for models without it (SD 1.x/2.x), whatever `pooled` is."""
        if not self.unet.has_vector_conditioning:
            return None
        if pooled is None:
            raise ValueError(
                f"model {self.config.name!r} needs the pooled text embedding: pass encode_text(...).pooled"
            )
        c = self.config
        return size_conditioning(
            pooled,
            original_size=c.original_size or (height, width),
            crop=c.crop,
            target_size=c.target_size or (height, width),
            embedding_dim=c.size_embedding_dim,
        ).to(self.dtype)

    def encode_images(
        self, images: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images (b, 3, H, W) in [-1, 1] → scaled latents: the posterior mean (or a sample) × scale_factor."""
        posterior = self.first_stage_model.encode(images.to(self.device, self.dtype))
        latents = posterior.sample(generator) if sample else posterior.mean
        check_finite(latents, what="the VAE's encoded latents", dtype=self.dtype)
        return latents * self.config.scale_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images (b, 3, H, W) in [-1, 1] (clamped); in float32 when `vae_decode_fp32`
        (the default), whatever the model's dtype. Non-finite results raise instead of decoding to black."""
        dtype = torch.float32 if self.config.vae_decode_fp32 else self.dtype
        check_finite(latents, what="the latents to decode", dtype=self.dtype)
        images = self.first_stage_model.decode(latents.to(self.device, dtype) / self.config.scale_factor)
        check_finite(images, what="the VAE's decoded images", dtype=dtype)
        return images.clamp(-1, 1)


def check_finite(tensor: torch.Tensor, *, what: str, dtype: torch.dtype) -> None:
    """Raise (never return NaN or black images silently) when `tensor` holds NaN or ±inf."""
    bad = (~torch.isfinite(tensor)).sum().item()
    if bad:
        half = dtype in (torch.float16, torch.bfloat16)
        raise UserError(
            f"{what}: {bad} of {tensor.numel()} values are NaN/inf (computed in {dtype}); "
            + (
                "half precision overflowed: compute in float32 (dtype=fp32, with weights_dtype=fp16 to "
                "keep the memory low) and keep vae_decode_fp32=true"
                if half
                else "the weights or inputs hold NaN/inf, or the sampling diverged"
            )
        )


# --- presets of the public checkpoints (the model config is not stored in their files) -------------


def _sd1(name: str) -> ModelConfig:
    return ModelConfig(name=name, text=TextConfig(hf_layout=True))  # the other defaults above are SD 1.x


def _sd2(name: str, *, prediction: str, image_size: int) -> ModelConfig:
    return ModelConfig(
        name=name,
        unet=UNetConfig(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True, upcast_attention=True),
        text=TextConfig(width=1024, heads=16, layers=23, act="gelu", pad_token=0),  # 23 of 24: penultimate
        prediction=prediction,
        image_size=image_size,
    )


def tiny_config() -> ModelConfig:
    """The built-in shapes-world model (issue 7): 32×32 RGB, 8×8×4 latents (VAE factor 4), a UNet with
    cross-attention at 8×8 and Imagen-style hybrid attention at 4×4 and 2×2, a 4-layer open_clip text
    transformer (width 64, padding with 0). ~13 M parameters, ~24 MB in fp16 (most of it CLIP's 49408-token
    embedding table). `scale_factor`, `guidance` and the text `context_length` are set by the training script
    (the shipped file: 16 positions, `conf/train_tiny.yaml`; this preset keeps CLIP's 77, which the tests of
    P2P at SD's length use)."""
    return ModelConfig(
        name="tiny",
        unet=UNetConfig(
            model_channels=64,
            channel_mult=(1, 2, 2),
            num_res_blocks=1,
            attention_resolutions=(1, 2, 4),
            attention_kinds=("cross", "hybrid", "hybrid"),
            num_head_channels=32,
            context_dim=64,
        ),
        vae=VAEConfig(ch=32, ch_mult=(1, 2, 4), num_res_blocks=1),
        text=TextConfig(width=64, heads=4, layers=4, act="gelu", pad_token=0),
        image_size=32,
        scale_factor=1.0,
        guidance=5.0,
    )


def _sdxl() -> ModelConfig:
    """SDXL base 1.0 (sgm's `configs/inference/sd_xl_base.yaml`; Podell et al. 2023)."""
    return ModelConfig(
        name="sdxl",
        unet=UNetConfig(
            channel_mult=(1, 2, 4),
            attention_resolutions=(4, 2),
            transformer_depth=(0, 2, 10),
            num_head_channels=64,
            context_dim=768 + 1280,
            use_linear_in_transformer=True,
            adm_in_channels=1280 + 6 * SIZE_EMBEDDING_DIM,
            latent_multiple=4,
        ),
        # the file holds all 12 CLIP-L layers and its final norm; layer 11's output, un-normed, is the context
        text=TextConfig(hf_layout=True, context_layers=11, context_norm=False),
        text_2=openclip_bigg(),
        scale_factor=SDXL_SCALE_FACTOR,
        image_size=1024,
        guidance=5.0,
        force_zeros_for_empty_prompt=True,
    )


def tiny_sdxl_config() -> ModelConfig:
    """SDXL's architecture at toy widths, for tests (no weights ship): three UNet levels with transformer depth
    (0, 1, 2), `label_emb` on y, two text encoders (HF-layout CLIP-like 32-wide and open_clip 64-wide with a
    projection), a VAE with SD's factor 8. Images of 64×64 give 8×8 latents; sizes are multiples of 32."""
    text = dict(heads=2, layers=3, context_layers=2, context_norm=False)
    return ModelConfig(
        name="tiny-sdxl",
        unet=UNetConfig(
            model_channels=32,
            channel_mult=(1, 2, 4),
            attention_resolutions=(4, 2),
            transformer_depth=(0, 1, 2),
            num_head_channels=32,
            context_dim=32 + 64,
            use_linear_in_transformer=True,
            adm_in_channels=64 + 6 * 16,
            latent_multiple=4,
        ),
        vae=VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
        text=TextConfig(width=32, hf_layout=True, **text),
        text_2=TextConfig(width=64, act="gelu", pad_token=0, projection_dim=64, **text),
        size_embedding_dim=16,
        scale_factor=SDXL_SCALE_FACTOR,
        image_size=64,
        guidance=5.0,
        force_zeros_for_empty_prompt=True,
    )


PRESETS = {
    "sd14": lambda: _sd1("sd14"),
    "sd15": lambda: _sd1("sd15"),
    "sd21-base": lambda: _sd2("sd21-base", prediction="epsilon", image_size=512),
    "sd21": lambda: _sd2("sd21", prediction="v", image_size=768),
    "sdxl": _sdxl,
    "tiny": tiny_config,  # architecture only; the trained weights ship in models/weights/tiny.safetensors
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(
            f"model preset {name!r} is unknown; choose one of {sorted(PRESETS)} or a file with "
            "its config in the metadata (the built-in tiny model)"
        )
    return PRESETS[name]()
