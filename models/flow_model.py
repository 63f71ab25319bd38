"""The whole rectified-flow model: SD3 / SD3.5 (MM-DiT) or FLUX.1, their 16-channel VAE and their text encoders,
under the top-level names of the SD3 single files.

`FlowModel(config).state_dict()` (through `original_state_dict`) has exactly the keys of an SD3 `*_incl_clips_t5xxl`
file: `model.diffusion_model.*` (MMDiT or Flux), `first_stage_model.*` (VAE), `text_encoders.clip_l.transformer.*`,
`text_encoders.clip_g.transformer.*` (HF CLIP names, mapped by rule onto our open_clip-layout towers) and
`text_encoders.t5xxl.transformer.*`. FLUX's separate files (BFL transformer, `ae.safetensors`, CLIP-L, T5) are read
under those same prefixes by `models/flow_loader.py`, so there is one layout for both families.

Text conditioning, as the reference pipelines build it (diffusers `StableDiffusion3Pipeline.encode_prompt`,
`FluxPipeline.encode_prompt`):
- SD3/SD3.5: context = [CLIP-L ‖ bigG penultimate states (77 × 2048, zero-padded to 4096) ; T5 (t5_length × 4096)]
  and pooled = CLIP-L pooled (unprojected) ‖ bigG pooled-and-projected (2048). Without T5 (`t5=False`) its
  rows are zeros, as the pipeline does when `text_encoder_3` is None.
- FLUX: context = T5 (512 dev / 256 schnell); pooled = CLIP-L pooled (768).
Any part may be absent (None) while it is not loaded: the CPU path encodes text, releases the text encoders and
only then reads the transformer (`ensure_loaded`, `release_text_encoders`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from models.errors import UserError
from models.flow import SD3_SHIFT, flux_sigmas, sd3_sigmas
from models.flux import Flux, FluxConfig, flux_dev, flux_schnell, image_ids, pack, unpack
from models.mmdit import MMDiT, MMDiTConfig, sd3_medium, sd35_large, sd35_medium
from models.precision import cast_weights_in_forward
from models.t5 import T5Config, T5Encoder, T5Tokenizer, WordTokens, t5_xxl
from models.text import TextConfig, TextEncoder, clip_tokenizer, openclip_bigg
from models.vae import FLUX_LATENT_SCALING, SD3_LATENT_SCALING, AutoencoderKL, LatentScaling, VAEConfig, flow_vae

CLIP_LENGTH = 77  # CLIP positions per prompt in SD3's context (start + 75 + end), and FLUX's CLIP-L input
FAMILIES = ("sd3", "flux")
# the parts that can be loaded and released separately, and the module prefix of each
PARTS = {
    "transformer": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "clip_l": "text_encoders.clip_l.",
    "clip_g": "text_encoders.clip_g.",
    "t5xxl": "text_encoders.t5xxl.",
}
TEXT_PARTS = ("clip_l", "clip_g", "t5xxl")


@dataclass
class FlowModelConfig:
    name: str = "sd3-medium"
    family: str = "sd3"  # "sd3" (MM-DiT, classifier-free guidance) or "flux" (guidance-distilled or not)
    mmdit: MMDiTConfig | None = field(default_factory=sd3_medium)  # SD3/SD3.5 transformer
    flux: FluxConfig | None = None  # FLUX transformer
    vae: VAEConfig = field(default_factory=flow_vae)
    clip_l: TextConfig = field(default_factory=lambda: sd3_clip_l())
    clip_g: TextConfig | None = field(default_factory=lambda: sd3_clip_g())  # SD3 only (bigG)
    t5_encoder: T5Config = field(default_factory=t5_xxl)
    # settings (`model.<name>=…`) -------------------------------------------------------------------------------
    t5: bool = True  # False: no T5 is loaded; SD3 gets zeros in its place (the reference pipeline without it)
    t5_length: int = 256  # T5 positions per prompt: SD3 256 (diffusers' default, up to 512), FLUX-dev 512, schnell 256
    image_size: int = 1024  # default height and width
    steps: int = 28  # the reference pipeline's default number of Euler steps
    guidance: float = 7.0  # SD3: CFG scale w; FLUX-dev: the distilled guidance embedded; schnell: unused
    shift: float = SD3_SHIFT  # SD3's static σ shift; FLUX-dev shifts by resolution (`dynamic_shift`)
    dynamic_shift: bool = False  # FLUX-dev: σ shifted by the number of image tokens (flux_mu)
    # a VAE trained here (tiny_mmdit) states its own latent scaling, 1/std and mean of its posterior means;
    # None = the family's constants (SD3_LATENT_SCALING / FLUX_LATENT_SCALING)
    latent_scale: float | None = None
    latent_shift: float | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise UserError(f"model family {self.family!r} is unknown; use one of {FAMILIES}")
        if (self.mmdit is None) == (self.flux is None):
            raise ValueError("a flow model has exactly one transformer: set mmdit (SD3) or flux (FLUX)")
        if self.family == "flux" and not self.t5:
            raise UserError(
                f"model={self.name} cannot run without T5 (model.t5=false): T5 is FLUX's only per-token text"
            )
        if isinstance(self.t5_length, bool) or not isinstance(self.t5_length, int) or not 1 <= self.t5_length <= 512:
            raise UserError(
                f"model.t5_length={self.t5_length!r} must be an integer from 1 to 512 (T5 positions; "
                "SD3 uses 256 by default, FLUX-dev 512, FLUX-schnell 256)"
            )

    @property
    def latent_factor(self) -> int:
        return self.vae.downsampling_factor

    @property
    def size_multiple(self) -> int:
        """Heights/widths must be multiples of the VAE factor × the 2×2 patch (16)."""
        return self.latent_factor * 2

    @property
    def text_parts(self) -> tuple[str, ...]:
        return ("clip_l",) + (("clip_g",) if self.clip_g is not None else ()) + (("t5xxl",) if self.t5 else ())

    def check_image_size(self, *, height, width) -> None:
        multiple = self.size_multiple
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
                nearest = (
                    max(multiple, round(value / multiple) * multiple)
                    if isinstance(value, (int, float)) and not isinstance(value, bool)
                    else self.image_size
                )
                raise UserError(
                    f"{name}={value!r} is not a positive multiple of {multiple} for model {self.name!r} "
                    f"(the VAE's factor {self.latent_factor} × the 2×2 patch); try {nearest}"
                )

    def with_settings(self, **settings) -> FlowModelConfig:
        accepted = ("t5", "t5_length", "image_size", "steps", "guidance", "shift", "dynamic_shift")
        unknown = sorted(set(settings) - set(accepted))
        if unknown:
            raise UserError(
                f"model settings {unknown} are unknown for model {self.name!r}; accepted are "
                f"{sorted(accepted)} and checkpoint, text_encoders, vae, t5_tokenizer, release_text_encoders"
            )
        return dataclasses.replace(self, **settings)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> FlowModelConfig:
        """Inverse of `to_json` (lists back to tuples, the nested configs rebuilt)."""

        def build(kind, fields):
            return (
                None
                if fields is None
                else kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
            )

        d = json.loads(text)
        nested = dict(
            mmdit=MMDiTConfig, flux=FluxConfig, vae=VAEConfig, clip_l=TextConfig, clip_g=TextConfig, t5_encoder=T5Config
        )
        return cls(**{k: build(nested[k], v) if k in nested else v for k, v in d.items()})


def sd3_clip_l() -> TextConfig:
    """CLIP ViT-L/14 as SD3 uses it: penultimate states without the final norm, unprojected pooled EOT."""
    return TextConfig(hf_layout=True, context_layers=11, context_norm=False, pooled_unprojected=True)


def sd3_clip_g() -> TextConfig:
    """OpenCLIP bigG/14 (in the SD3 files under HF names): penultimate states, projected pooled EOT; pads with 0."""
    return openclip_bigg(hf_layout=True)


def flux_clip_l() -> TextConfig:
    return TextConfig(hf_layout=True, pooled_unprojected=True)  # FluxPipeline: CLIPTextModel's pooler_output


def _sd3(name: str, mmdit: MMDiTConfig, *, steps: int, guidance: float) -> FlowModelConfig:
    return FlowModelConfig(name=name, mmdit=mmdit, steps=steps, guidance=guidance)


def _flux(name: str, flux: FluxConfig, *, dev: bool) -> FlowModelConfig:
    return FlowModelConfig(
        name=name,
        family="flux",
        mmdit=None,
        flux=flux,
        clip_l=flux_clip_l(),
        clip_g=None,
        t5_length=512 if dev else 256,
        steps=28 if dev else 4,
        guidance=3.5 if dev else 0.0,
        shift=1.0,
        dynamic_shift=dev,
    )


# Defaults of the reference pipelines / model cards (diffusers docs of each repository).
FLOW_PRESETS: dict[str, Callable[[], FlowModelConfig]] = {
    "sd3-medium": lambda: _sd3("sd3-medium", sd3_medium(), steps=28, guidance=7.0),
    "sd35-medium": lambda: _sd3("sd35-medium", sd35_medium(), steps=40, guidance=4.5),
    "sd35-large": lambda: _sd3("sd35-large", sd35_large(), steps=28, guidance=3.5),
    "flux-dev": lambda: _flux("flux-dev", flux_dev(), dev=True),
    "flux-schnell": lambda: _flux("flux-schnell", flux_schnell(), dev=False),
}

TINY_CLIP_WIDTH = 64  # both tiny CLIP towers; together they fill the tiny T5's 128 features, as L ‖ bigG fill 4096
TINY_T5_VOCAB = 128  # ≥ the world tokenizer's 76 pieces (p2p/shapes/flow_training.py), a multiple of 128 as T5's
TINY_CONTEXT_LENGTH = 16  # CLIP positions of tiny_mmdit: the shapes world's longest caption needs 13 (+ start/end)


def tiny_mmdit_config() -> FlowModelConfig:
    """The built-in shapes-world flow model (issue 33), SD3's architecture and file layout at toy size:
    32×32 RGB → 16×16×16 latents (a 16-channel VAE of factor 2), 2×2 patches → 8×8 = 64 image tokens (the tiny
    UNet's cross-attention resolution), 6 joint blocks of width 128 (4 heads of 32); CLIP-L-like and bigG-like towers trained
    from scratch (width 64, 4 layers, penultimate states, pooled EOT: unprojected / projected as in SD3) and a
    tiny T5 v1.1 (width 128) with a SentencePiece model trained on the world's captions, shipped beside the
    weights. Trained by `scripts/train_tiny.py arch=mmdit` (models/weights/README.md); the file's metadata
    holds the trained config (latent scaling, guidance). No σ shift: it is trained and sampled at one size."""
    clip = dict(width=TINY_CLIP_WIDTH, heads=4, layers=4, context_length=TINY_CONTEXT_LENGTH, hf_layout=True)
    return FlowModelConfig(
        name="tiny_mmdit",
        mmdit=MMDiTConfig(
            depth=6,
            hidden_size=128,
            num_heads=4,
            pos_embed_max_size=8,
            pos_embed_base_size=8,
            context_dim=2 * TINY_CLIP_WIDTH,
            pooled_dim=2 * TINY_CLIP_WIDTH,
            clip_text_positions=TINY_CONTEXT_LENGTH,
        ),
        vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16, embed_dim=16, quant_conv=False),
        clip_l=TextConfig(**clip, context_layers=3, context_norm=False, pooled_unprojected=True),
        clip_g=TextConfig(
            **clip, act="gelu", pad_token=0, context_layers=3, context_norm=False, projection_dim=TINY_CLIP_WIDTH
        ),
        t5_encoder=T5Config(
            vocab_size=TINY_T5_VOCAB, d_model=2 * TINY_CLIP_WIDTH, d_kv=32, d_ff=256, num_layers=2, num_heads=4
        ),
        t5_length=24,  # the world's longest caption is 18 pieces of its tokenizer, + </s>
        image_size=32,
        steps=28,
        guidance=5.0,
        shift=1.0,
    )


# Models this project trains and ships (models/weights/), selectable like the presets.
BUILT_IN_FLOW_MODELS: dict[str, Callable[[], FlowModelConfig]] = {"tiny_mmdit": tiny_mmdit_config}


def flow_preset(name: str) -> FlowModelConfig:
    known = {**FLOW_PRESETS, **BUILT_IN_FLOW_MODELS}
    if name not in known:
        raise UserError(f"flow model preset {name!r} is unknown; choose one of {sorted(known)}")
    return known[name]()


@dataclass
class FlowConditioning:
    """What the transformer is conditioned on, per batch row."""

    context: torch.Tensor  # (b, n_text, context_dim): SD3 [CLIP 77 | T5]; FLUX T5
    pooled: torch.Tensor  # (b, pooled_dim): SD3 2048, FLUX 768
    text_segments: tuple[tuple[str, int, int], ...]  # which text columns each encoder fills

    def expand(self, batch: int) -> FlowConditioning:
        return FlowConditioning(self.context.expand(batch, -1, -1), self.pooled.expand(batch, -1), self.text_segments)


def concat(*parts: FlowConditioning) -> FlowConditioning:
    return FlowConditioning(
        torch.cat([p.context for p in parts]), torch.cat([p.pooled for p in parts]), parts[0].text_segments
    )


class DiffusionWrapper(nn.Module):
    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.diffusion_model = transformer


class T5Holder(nn.Module):
    """`text_encoders.t5xxl.transformer`: the level the SD3 bundles put above transformers' names."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.transformer = T5Encoder(config)


class TextEncoders(nn.Module):
    def __init__(self, config: FlowModelConfig, parts: set[str]):
        super().__init__()
        if "clip_l" in parts:
            self.clip_l = TextEncoder(config.clip_l)
        if "clip_g" in parts:
            self.clip_g = TextEncoder(config.clip_g)
        if "t5xxl" in parts:
            self.t5xxl = T5Holder(config.t5_encoder)


def clip_word_positions(prompt: str) -> tuple[WordTokens, ...]:
    """Per whitespace-separated word, its CLIP token positions (1 = the first after the start token).

    CLIP's BPE never merges across whitespace, so each word is tokenised alone; `word_positions` leaves out the
    tokens of leading/trailing punctuation (as `p2p/tokens.py` and `T5Tokenizer.word_positions` do)."""
    words, position = [], 1
    for word in prompt.split():
        ids = clip_tokenizer().encode(word)
        core = re.search(r"[^\W_].*[^\W_]|[^\W_]", word)
        lead = len(clip_tokenizer().encode(word[: core.start()])) if core else 0
        own = len(clip_tokenizer().encode(core.group())) if core else len(ids)
        positions = tuple(range(position, position + len(ids)))
        words.append(WordTokens(word, tuple(ids), positions, positions[lead : lead + own]))
        position += len(ids)
    return tuple(words)


class FlowModel(nn.Module):
    """SD3 / SD3.5 / FLUX.1 with the parts in `parts` built (the others None until `ensure_loaded`)."""

    def __init__(self, config: FlowModelConfig, *, parts: set[str] | None = None):
        super().__init__()
        self.config = config
        parts = set(PARTS) if parts is None else set(parts)
        parts -= {p for p in TEXT_PARTS if p not in config.text_parts}
        self.model = None
        if "transformer" in parts:
            self.model = DiffusionWrapper(MMDiT(config.mmdit) if config.family == "sd3" else Flux(config.flux))
        self.first_stage_model = AutoencoderKL(config.vae) if "vae" in parts else None
        self.text_encoders = TextEncoders(config, parts) if parts & set(TEXT_PARTS) else None
        self.compute_dtype: torch.dtype | None = None
        self.t5_tokenizer: T5Tokenizer | None = None
        self.part_loader: Callable[[FlowModel, set[str]], None] | None = None  # set by the loader: reads parts
        self.release_text_encoders_after_encoding = False
        cast_weights_in_forward(self)

    # --- parts ---------------------------------------------------------------------------------------------
    @property
    def loaded_parts(self) -> set[str]:
        loaded = {p for p, m in (("transformer", self.model), ("vae", self.first_stage_model)) if m is not None}
        return loaded | {p for p in TEXT_PARTS if self.text_encoders is not None and hasattr(self.text_encoders, p)}

    def ensure_loaded(self, *parts: str) -> None:
        """Read the given parts from their files if they are not in memory yet (the loader knows the files)."""
        wanted = {p for p in parts if p in self.config.text_parts or p not in TEXT_PARTS} - self.loaded_parts
        if wanted:
            if self.part_loader is None:
                raise RuntimeError(f"parts {sorted(wanted)} of {self.config.name} are not loaded and no loader is set")
            self.part_loader(self, wanted)

    def release_text_encoders(self) -> None:
        """Drop the text encoders (CPU memory: SD3's T5-XXL alone is 9.5 GB in bf16); `ensure_loaded` re-reads them."""
        self.text_encoders = None

    @property
    def transformer(self) -> MMDiT | Flux:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype or next(self.parameters()).dtype

    @property
    def latent_scaling(self) -> LatentScaling:
        c = self.config
        if c.latent_scale is not None:
            return LatentScaling(scale_factor=c.latent_scale, shift_factor=c.latent_shift or 0.0)
        return SD3_LATENT_SCALING if c.family == "sd3" else FLUX_LATENT_SCALING

    # --- text ----------------------------------------------------------------------------------------------
    def clip_segment(self) -> int:
        """Leading text positions that are CLIP's: SD3 its CLIP context (77; tiny_mmdit 16), none for FLUX (its
        CLIP gives only `pooled`)."""
        return self.config.clip_l.context_length if self.config.family == "sd3" else 0

    def text_segments(self) -> tuple[tuple[str, int, int], ...]:
        clip, t5 = self.clip_segment(), self.config.t5_length
        return ((("clip", 0, clip),) if clip else ()) + (("t5", clip, clip + t5),)

    def word_positions(self, prompt: str) -> dict[str, tuple[WordTokens, ...]]:
        """Every encoder's words of `prompt`, positions counted in the transformer's text sequence: "clip"
        (SD3: columns 1…; FLUX has no CLIP columns) and "t5" (after SD3's 77 CLIP columns; from 0 in FLUX)."""
        out = {"clip": clip_word_positions(prompt)} if self.clip_segment() else {}
        if self.config.t5:
            offset = self.clip_segment()
            out["t5"] = tuple(
                dataclasses.replace(
                    w,
                    positions=tuple(p + offset for p in w.positions),
                    word_positions=tuple(p + offset for p in w.word_positions),
                )
                for w in self._tokenizer().word_positions(prompt, length=self.config.t5_length)
            )
        return out

    def _tokenizer(self) -> T5Tokenizer:
        if self.t5_tokenizer is None:
            raise UserError(
                f"model {self.config.name!r} needs T5's tokenizer: pass model.t5_tokenizer=PATH to its "
                "spiece.model or tokenizer.json (e.g. the tokenizer_3/ or tokenizer_2/ folder of the "
                "diffusers repository)"
            )
        return self.t5_tokenizer

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> FlowConditioning:
        """Prompts → context and pooled vector in the compute dtype (see the module docstring)."""
        if isinstance(prompts, str):
            raise TypeError(f"encode_text takes a list of prompts, got the string {prompts!r}; wrap it in a list")
        self.ensure_loaded(*self.config.text_parts)
        return self.conditioning_from_tokens(self.tokenize(list(prompts)))

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids per text encoder ("clip_l", "clip_g", "t5xxl" as the config has them), on the CPU."""
        c, ids = self.config, {"clip_l": self.text_encoders.clip_l.tokenize(prompts)}
        if c.clip_g is not None:
            ids["clip_g"] = self.text_encoders.clip_g.tokenize(prompts)
        if c.t5:
            ids["t5xxl"] = self._tokenizer()(prompts, length=c.t5_length)
        return ids

    def conditioning_from_tokens(self, ids: dict[str, torch.Tensor]) -> FlowConditioning:
        """`tokenize`'s ids → FlowConditioning; differentiable (training the tiny model runs it with gradients)."""
        c, encoders = self.config, self.text_encoders
        dtype, context_dim = self.dtype, self._context_dim()
        clip_l = self._clip(encoders.clip_l, ids["clip_l"], dtype)
        if c.t5:
            t5 = self._t5(
                encoders.t5xxl.transformer, ids["t5xxl"].to(encoders.t5xxl.transformer.shared.weight.device), dtype
            )
        else:
            batch = ids["clip_l"].shape[0]
            t5 = torch.zeros(batch, c.t5_length, context_dim, dtype=dtype, device=clip_l.context.device)
        if c.family == "flux":
            return FlowConditioning(t5, clip_l.pooled, self.text_segments())
        clip_g = self._clip(encoders.clip_g, ids["clip_g"], dtype)
        clip = torch.cat([clip_l.context, clip_g.context], dim=-1)  # (b, 77, 768 + 1280)
        clip = torch.nn.functional.pad(clip, (0, context_dim - clip.shape[-1]))  # zeros up to T5's width
        return FlowConditioning(
            torch.cat([clip, t5.to(clip.device)], dim=1),
            torch.cat([clip_l.pooled, clip_g.pooled], dim=-1),
            self.text_segments(),
        )

    def _context_dim(self) -> int:
        return self.config.mmdit.context_dim if self.config.family == "sd3" else self.config.flux.context_in_dim

    @staticmethod
    def _clip(encoder: TextEncoder, ids: torch.Tensor, dtype):
        return encoder.features(ids.to(encoder.model.token_embedding.weight.device), dtype=dtype)

    @staticmethod
    def _t5(t5: T5Encoder, ids: torch.Tensor, dtype) -> torch.Tensor:
        """T5 in the compute dtype; its embedding rows (an nn.Embedding, not cast in forward) cast here."""
        weight = t5.shared.weight
        if weight.dtype == dtype:
            return t5(ids)
        x = t5.shared(ids).to(dtype)
        position_bias = t5.encoder.block[0].layer[0].SelfAttention.position_bias(ids.shape[1]).to(dtype)
        for block in t5.encoder.block:
            x = block(x, position_bias)
        return t5.encoder.final_layer_norm(x)

    # --- sampling ------------------------------------------------------------------------------------------
    def latent_shape(self, *, height: int, width: int) -> tuple[int, int, int, int]:
        f = self.config.latent_factor
        return (1, self.config.vae.z_channels, height // f, width // f)

    def sigmas(self, steps: int, *, latent_hw: tuple[int, int]) -> torch.Tensor:
        """(steps + 1,) σ from 1 to 0 with this model's shift (static SD3; by image tokens for FLUX-dev)."""
        if self.config.family == "sd3":
            return sd3_sigmas(steps, shift=self.config.shift)
        tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2)
        return flux_sigmas(steps, image_seq_len=tokens if self.config.dynamic_shift else None)

    def velocity(
        self, x: torch.Tensor, *, sigma: float, conditioning: FlowConditioning, guidance: float | None = None
    ) -> torch.Tensor:
        """The transformer's v at σ for latents x (b, 16, h, w), in float32. SD3 gets 1000·σ, FLUX σ itself
        (computed as the pipeline does, timestep / 1000) and, for dev, the distilled `guidance`."""
        dtype, batch = self.dtype, x.shape[0]
        timestep = torch.full((batch,), sigma * 1000.0, dtype=torch.float32, device=x.device)  # float32 like diffusers
        context, pooled = conditioning.context.to(dtype), conditioning.pooled.to(dtype)
        if self.config.family == "sd3":
            return self.transformer(
                x.to(dtype),
                timesteps=timestep.to(dtype),
                context=context,
                pooled=pooled,
                text_segments=conditioning.text_segments,
            ).float()
        grid_hw = (x.shape[-2] // 2, x.shape[-1] // 2)
        ids = image_ids(batch, grid_hw).to(x.device, dtype)
        text_ids = torch.zeros(batch, context.shape[1], 3, device=x.device, dtype=dtype)
        guidance_vector = None
        if self.config.flux.guidance_embed:
            guidance_vector = torch.full((batch,), float(guidance), dtype=torch.float32, device=x.device).to(dtype)
        out = self.transformer(
            pack(x.to(dtype)),
            img_ids=ids,
            txt=context,
            txt_ids=text_ids,
            timesteps=(timestep / 1000.0).to(dtype),
            y=pooled,
            guidance=guidance_vector,
            grid_hw=grid_hw,
            text_segments=conditioning.text_segments,
        )
        return unpack(out, grid_hw).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Model latents → images (b, 3, H, W) in [-1, 1], decoded in float32."""
        self.ensure_loaded("vae")
        z = self.latent_scaling.from_model(latents.to(self.device, torch.float32))
        images = self.first_stage_model.decode(z)
        if not torch.isfinite(images).all():
            raise UserError("the VAE's decoded images hold NaN/inf: the weights or the sampling diverged")
        return images.clamp(-1, 1)
