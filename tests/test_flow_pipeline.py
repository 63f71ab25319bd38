"""End to end: `scripts/generate.py model=sd3-medium|flux-dev model.checkpoint=FILE …` on random original-layout files
gives the images diffusers' `StableDiffusion3Pipeline` / `FluxPipeline` give (FlowMatchEulerDiscreteScheduler as the
real repositories configure it, the same seed), within 2/255.

Tiny architectures of each family (the file states its shapes in its metadata; the names and the code paths are
the real ones): CLIP-L + bigG + T5 + MM-DiT + 16-channel VAE for SD3, CLIP-L + T5 + FLUX (2 double + 2 single blocks)
+ VAE for FLUX. The weights reach diffusers through its own single-file converters and strict loads; the tokenizers
are CLIP's BPE written as Hugging Face files and a SentencePiece model trained offline (`test_mmdit_t5.py`).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from PIL import Image
from safetensors.torch import save_file
from test_mmdit_flux import reference_from_ours as diffusers_flux_from_ours
from test_mmdit_sd3 import reference_from_ours as diffusers_mmdit_from_ours
from test_mmdit_t5 import reference_from_ours as transformers_t5_from_ours
from test_mmdit_t5 import reference_tokenizer, spiece_model  # noqa: F401 (fixtures)
from test_mmdit_vae import diffusers_config as diffusers_vae_config
from test_parity_text import clip_tokenizer_files, hf_clip_tokenizer
from test_sdxl_parity import _clip_text_config
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from models.flow_loader import FILE_PREFIXES, FLOW_CONFIG_METADATA_KEY, original_state_dict, save_flow_checkpoint
from models.flow_model import FlowModel, FlowModelConfig
from models.flux import FluxConfig, flux_dev
from models.mmdit import MMDiTConfig, sd3_medium
from models.t5 import T5Config
from models.text import TextConfig
from models.vae import VAEConfig

REPO = Path(__file__).resolve().parents[1]
MAX_PIXEL_DIFF = 2  # out of 255
PROMPT = "a cat riding a bicycle"
SEED, STEPS, HEIGHT, WIDTH, T5_LENGTH = 5, 3, 64, 96, 24
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=16, embed_dim=16, quant_conv=False)
TINY_T5 = T5Config(vocab_size=64, d_model=128, d_kv=16, d_ff=96, num_layers=2, num_heads=4)
TINY_CLIP_L = dict(width=32, heads=2, layers=3, hf_layout=True, pooled_unprojected=True)


def tiny_sd3_config() -> FlowModelConfig:
    return FlowModelConfig(
        name="tiny-sd3",
        mmdit=MMDiTConfig(
            depth=2,
            hidden_size=64,
            num_heads=2,
            pos_embed_max_size=16,
            pos_embed_base_size=8,
            context_dim=128,
            pooled_dim=32 + 64,
        ),
        vae=TINY_VAE,
        clip_l=TextConfig(context_layers=2, context_norm=False, **TINY_CLIP_L),
        clip_g=TextConfig(
            width=64,
            heads=2,
            layers=3,
            act="gelu",
            pad_token=0,
            context_layers=2,
            context_norm=False,
            projection_dim=64,
            hf_layout=True,
        ),
        t5_encoder=TINY_T5,
        t5_length=T5_LENGTH,
        image_size=64,
        steps=STEPS,
        guidance=5.0,
    )


def tiny_flux_config() -> FlowModelConfig:
    return FlowModelConfig(
        name="tiny-flux",
        family="flux",
        mmdit=None,
        flux=FluxConfig(
            vec_in_dim=32,
            context_in_dim=128,
            hidden_size=64,
            num_heads=2,
            depth=2,
            depth_single_blocks=2,
            axes_dim=(8, 12, 12),
        ),
        vae=TINY_VAE,
        clip_l=TextConfig(**TINY_CLIP_L),
        clip_g=None,
        t5_encoder=TINY_T5,
        t5_length=T5_LENGTH,
        image_size=64,
        steps=STEPS,
        guidance=3.5,
        shift=1.0,
        dynamic_shift=True,
    )


def random_flow_model(config: FlowModelConfig, randomize, *, seed: int) -> FlowModel:
    model = FlowModel(config)  # built normally: MMDiT's stored sin-cos table is data, kept
    table = model.transformer.pos_embed.clone() if config.family == "sd3" else None
    randomize(model, seed=seed)
    if table is not None:
        model.transformer.pos_embed.copy_(table)
    return model.eval().requires_grad_(False)


def part_state(model: FlowModel, part: str) -> dict[str, torch.Tensor]:
    prefix = FILE_PREFIXES[part]
    return {k[len(prefix) :]: v for k, v in original_state_dict(model).items() if k.startswith(prefix)}


def transformers_clip(model: FlowModel, part: str, *, kind, **config):
    """A transformers CLIP text model holding our tower's weights (file names, without the `text_model.` level
    that transformers ≥ 5 drops)."""
    text_config = getattr(model.config, part)
    reference = kind(_clip_text_config(text_config, **config)).eval()
    state = part_state(model, part)
    if not hasattr(reference, "text_model"):
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    if kind is CLIPTextModelWithProjection and "text_projection.weight" not in state:
        state["text_projection.weight"] = torch.eye(text_config.width)  # SD3's CLIP-L: identity (diffusers' loader)
    reference.load_state_dict(state, strict=True)
    return reference


def diffusers_vae(model: FlowModel, *, scaling) -> DiffusersAutoencoderKL:
    config = diffusers_vae_config(model.config.vae) | dict(
        scaling_factor=scaling.scale_factor, shift_factor=scaling.shift_factor
    )
    checkpoint = {"first_stage_model." + k: v for k, v in model.vae.state_dict().items()}
    reference = DiffusersAutoencoderKL(**config)
    reference.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, config), strict=True)
    return reference.eval()


def run_generate(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "generate.py"), *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"},
    )


def generated_image(tmp_path: Path, *overrides: str) -> np.ndarray:
    run = tmp_path / "run"
    result = run_generate(
        f"prompts=[{PROMPT!r}]".replace("'", '"'),
        f"seed={SEED}",
        f"steps={STEPS}",
        f"height={HEIGHT}",
        f"width={WIDTH}",
        "progress=false",
        f"hydra.run.dir={run}",
        *overrides,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (png,) = run.glob("*.png")
    return np.asarray(Image.open(png))


def compare(actual: np.ndarray, expected: np.ndarray, *, what: str) -> None:
    diff = abs(actual.astype("float64") - expected * 255).max()
    print(f"{what}: max pixel diff {diff:.3f}/255 (image std {expected.std() * 255:.1f}/255)")
    assert actual.shape == expected.shape == (HEIGHT, WIDTH, 3)
    assert expected.std() > 0.02, "degenerate reference image: the comparison would prove little"
    assert diff <= MAX_PIXEL_DIFF, f"{what}: generated pixels differ by {diff:.2f}/255 from diffusers"


def real_width(config: FlowModelConfig) -> FlowModelConfig:
    """The transformer at its released width with two blocks (SD3-medium: 1536 wide, 192² position table;
    FLUX: 3072 wide, 24 heads of 128, 1 double + 1 single block); tiny text encoders and VAE."""
    if config.family == "sd3":
        return dataclasses.replace(
            config, mmdit=dataclasses.replace(sd3_medium(), depth=2, context_dim=128, pooled_dim=32 + 64)
        )
    return dataclasses.replace(
        config, flux=dataclasses.replace(flux_dev(), depth=1, depth_single_blocks=1, vec_in_dim=32, context_in_dim=128)
    )


@pytest.mark.parametrize("shapes", ["tiny", "tiny-without-t5", pytest.param("real-width", marks=pytest.mark.slow)])
def test_sd3_generate_script_matches_diffusers_pipeline(
    shapes,
    randomize,
    spiece_model,
    reference_tokenizer,  # noqa: F811
    tmp_path,
):
    """`model.t5=false` ↔ the pipeline without `text_encoder_3` (zeros in T5's positions)."""
    config = tiny_sd3_config() if shapes != "real-width" else real_width(tiny_sd3_config())
    with_t5 = shapes != "tiny-without-t5"
    config = config.with_settings(t5=with_t5)
    model = random_flow_model(config, randomize, seed=21)
    checkpoint = save_flow_checkpoint(model, tmp_path / "tiny-sd3.safetensors")
    files = clip_tokenizer_files(tmp_path)
    pipe = StableDiffusion3Pipeline(
        transformer=diffusers_mmdit_from_ours(model.transformer),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=diffusers_vae(model, scaling=model.latent_scaling),
        text_encoder=transformers_clip(model, "clip_l", kind=CLIPTextModelWithProjection, projection_dim=32),
        tokenizer=hf_clip_tokenizer(files, pad_token="<|endoftext|>"),
        text_encoder_2=transformers_clip(model, "clip_g", kind=CLIPTextModelWithProjection, projection_dim=64),
        tokenizer_2=hf_clip_tokenizer(files, pad_token="!"),
        text_encoder_3=transformers_t5_from_ours(model.text_encoders.t5xxl.transformer) if with_t5 else None,
        tokenizer_3=reference_tokenizer if with_t5 else None,
    )
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        PROMPT,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        max_sequence_length=T5_LENGTH,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
    ).images[0]
    text = [f"model.t5_tokenizer={spiece_model}"] if with_t5 else ["model.t5=false"]
    actual = generated_image(
        tmp_path,
        "model=sd3-medium",
        f"model.checkpoint={checkpoint}",
        *text,
        f"model.t5_length={T5_LENGTH}",
        "guidance=5.0",
    )
    compare(actual, expected, what=f"{shapes} SD3 generate.py")


@pytest.mark.parametrize("shapes", ["tiny", "tiny-schnell", pytest.param("real-width", marks=pytest.mark.slow)])
def test_flux_generate_script_matches_diffusers_pipeline(
    shapes,
    randomize,
    spiece_model,
    reference_tokenizer,  # noqa: F811
    tmp_path,
):
    """FLUX's layout in separate files: BFL transformer, ae.safetensors, CLIP-L and T5 each on their own.
    dev: guidance embedded, σ shifted by resolution; schnell: neither (its scheduler: shift 1, static)."""
    config = tiny_flux_config() if shapes != "real-width" else real_width(tiny_flux_config())
    dev = shapes != "tiny-schnell"
    if not dev:
        config = dataclasses.replace(
            config, flux=dataclasses.replace(config.flux, guidance_embed=False), dynamic_shift=False, guidance=0.0
        )
    model = random_flow_model(config, randomize, seed=22)
    paths = {}
    for part in ("transformer", "vae", "clip_l", "t5xxl"):
        paths[part] = tmp_path / f"{part}.safetensors"
        metadata = {FLOW_CONFIG_METADATA_KEY: model.config.to_json()} if part == "transformer" else None
        save_file({k: v.contiguous() for k, v in part_state(model, part).items()}, str(paths[part]), metadata=metadata)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0 if dev else 1.0,
        use_dynamic_shifting=dev,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
    )  # the scheduler configs of FLUX.1-dev / schnell
    files = clip_tokenizer_files(tmp_path)
    pipe = FluxPipeline(
        transformer=diffusers_flux_from_ours(model.transformer),
        scheduler=scheduler,
        vae=diffusers_vae(model, scaling=model.latent_scaling),
        text_encoder=transformers_clip(model, "clip_l", kind=CLIPTextModel),
        tokenizer=hf_clip_tokenizer(files, pad_token="<|endoftext|>"),
        text_encoder_2=transformers_t5_from_ours(model.text_encoders.t5xxl.transformer),
        tokenizer_2=reference_tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    guidance = 3.5 if dev else 0.0
    expected = pipe(
        PROMPT,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        max_sequence_length=T5_LENGTH,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
    ).images[0]
    actual = generated_image(
        tmp_path,
        f"model=flux-{'dev' if dev else 'schnell'}",
        f"model.checkpoint={paths['transformer']}",
        f"model.vae={paths['vae']}",
        f"model.text_encoders.clip_l={paths['clip_l']}",
        f"model.text_encoders.t5xxl={paths['t5xxl']}",
        f"model.t5_tokenizer={spiece_model}",
        f"model.t5_length={T5_LENGTH}",
        f"guidance={guidance}",
    )
    compare(actual, expected, what=f"{shapes} FLUX generate.py")
