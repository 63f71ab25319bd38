"""SD3 and FLUX.1 diffusers folders (models/diffusers_flow.py): pipelines holding random weights in the toy SD3 and
FLUX shapes of test_flow_pipeline.py, written by diffusers' `save_pretrained` (fp32 sharded, fp16 variant), load
into exactly the original model's tensors, part by part; T5's tokenizer comes from the folder; a folder of another
family or preset is one line naming both; the real repos' transformer configs name their presets."""

from __future__ import annotations

import json

import pytest
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from test_flow_loading import states_equal
from test_flow_pipeline import (
    diffusers_flux_from_ours,
    diffusers_mmdit_from_ours,
    diffusers_vae,
    random_flow_model,
    tiny_flux_config,
    tiny_sd3_config,
    transformers_clip,
    transformers_t5_from_ours,
)
from test_mmdit_t5 import reference_tokenizer, spiece_model  # noqa: F401 (fixtures)
from test_parity_text import clip_tokenizer_files, hf_clip_tokenizer
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from models.diffusers_flow import check_flow_folder, folder_fingerprint, load_flow_folder, transformer_fingerprint
from models.errors import UserError
from models.flow_model import FLOW_PRESETS, flow_preset
from models.loader import CheckpointError


def pipeline(model, tmp_path, tokenizer):
    files = clip_tokenizer_files(tmp_path)
    common = dict(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=diffusers_vae(model, scaling=model.latent_scaling),
        tokenizer=hf_clip_tokenizer(files, pad_token="<|endoftext|>"),
    )
    t5 = transformers_t5_from_ours(model.text_encoders.t5xxl.transformer)
    if model.config.family == "flux":
        return FluxPipeline(
            transformer=diffusers_flux_from_ours(model.transformer),
            text_encoder=transformers_clip(model, "clip_l", kind=CLIPTextModel),
            text_encoder_2=t5,
            tokenizer_2=tokenizer,
            **common,
        )
    return StableDiffusion3Pipeline(
        transformer=diffusers_mmdit_from_ours(model.transformer),
        text_encoder=transformers_clip(model, "clip_l", kind=CLIPTextModelWithProjection, projection_dim=32),
        text_encoder_2=transformers_clip(model, "clip_g", kind=CLIPTextModelWithProjection, projection_dim=64),
        tokenizer_2=hf_clip_tokenizer(clip_tokenizer_files(tmp_path), pad_token="!"),
        text_encoder_3=t5,
        tokenizer_3=tokenizer,
        **common,
    )


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_folders_load_the_original_tensors(family, randomize, reference_tokenizer, tmp_path):  # noqa: F811
    config = tiny_sd3_config() if family == "sd3" else tiny_flux_config()
    model = random_flow_model(config, randomize, seed=23)
    pipe = pipeline(model, tmp_path, reference_tokenizer)
    pipe.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    pipe.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert (tmp_path / "sharded" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = load_flow_folder(config, folder=tmp_path / "sharded", release_text_encoders=True)
    assert loaded.model is None and loaded.t5_tokenizer is not None  # the transformer is read when asked
    loaded.ensure_loaded("transformer", "vae")
    states_equal(loaded, model)
    half = load_flow_folder(config, folder=tmp_path / "fp16", weights_dtype="fp16", release_text_encoders=False)
    states_equal(half, model.half())
    other = tiny_flux_config() if family == "sd3" else tiny_sd3_config()
    with pytest.raises(
        CheckpointError, match=f"holds a {family.upper()} transformer of no preset's shapes but model=tiny"
    ):
        load_flow_folder(other, folder=tmp_path / "sharded")


# transformer/config.json of the public repos, the fields the preset check reads
REAL_TRANSFORMERS = {
    "sd3-medium": ("StableDiffusion3Pipeline", dict(num_layers=24, num_attention_heads=24, attention_head_dim=64)),
    "sd35-medium": (
        "StableDiffusion3Pipeline",
        dict(
            num_layers=24,
            num_attention_heads=24,
            attention_head_dim=64,
            qk_norm="rms_norm",
            dual_attention_layers=list(range(13)),
        ),
    ),
    "sd35-large": (
        "StableDiffusion3Pipeline",
        dict(num_layers=38, num_attention_heads=38, attention_head_dim=64, qk_norm="rms_norm"),
    ),
    "flux-dev": (
        "FluxPipeline",
        dict(num_layers=19, num_single_layers=38, num_attention_heads=24, attention_head_dim=128, guidance_embeds=True),
    ),
    "flux-schnell": (
        "FluxPipeline",
        dict(
            num_layers=19, num_single_layers=38, num_attention_heads=24, attention_head_dim=128, guidance_embeds=False
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(REAL_TRANSFORMERS))
def test_real_transformer_configs_name_their_preset(name, tmp_path):
    pipeline_class, transformer = REAL_TRANSFORMERS[name]
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(transformer))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    assert folder_fingerprint(tmp_path) == transformer_fingerprint(flow_preset(name))
    check_flow_folder(tmp_path, flow_preset(name))
    for other in sorted(set(FLOW_PRESETS) - {name}):
        with pytest.raises(CheckpointError) as error:
            check_flow_folder(tmp_path, flow_preset(other))
        assert str(error.value) == f"{tmp_path} holds model={name} but model={other} was asked for; pass model={name}"


def test_scripts_take_flow_folders_and_refuse_single_file_options(tmp_path):
    """`model.checkpoint=FOLDER` reaches the folder loader (its preset check answers); model.vae is for files."""
    import sys

    from test_generate_script import REPO, compose_generate

    sys.path.insert(0, str(REPO))
    from scripts._common import load_model

    pipeline_class, transformer = REAL_TRANSFORMERS["flux-dev"]
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(transformer))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    with pytest.raises(CheckpointError, match="holds model=flux-dev but model=flux-schnell was asked for"):
        load_model(compose_generate("model=flux-schnell", f"model.checkpoint={tmp_path}"), flow=True)
    with pytest.raises(UserError, match="is a diffusers folder, which holds its text encoders and VAE"):
        load_model(
            compose_generate("model=flux-dev", f"model.checkpoint={tmp_path}", "model.vae=ae.safetensors"), flow=True
        )
