"""Checkpoint loading on the inputs real users bring: the layouts of the public files (SD 1.x HF-CLIP names with
EMA copies, schedule buffers and `position_ids`; SD 2.x's unused last text layer), other model families
(SD-XL, inpainting, LoRA, diffusers folders) named and refused, and broken files named with what is wrong.

Small files are made from the tiny architecture (in SD 1.x naming where that matters); the real SD files are
stood in for by their headers (tests/data/sd-keys: every tensor name and shape), checked against a model
built on the meta device, which is exactly what `load_checkpoint` does before it reads any tensor.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models import loader
from models.loader import (
    CheckpointError,
    check_checkpoint,
    detect_config,
    load_checkpoint,
    original_state_dict,
    save_checkpoint,
)
from models.stable_diffusion import StableDiffusion, preset
from models.text import END_TOKEN, HF_PREFIX
from p2p.experiments.random_files import read_key_list


def tiny_sd1_config():
    """The tiny architecture with SD 1.x's text conventions: HF CLIP names in the file, quick-GELU, end-token padding."""
    config = preset("tiny")
    return dataclasses.replace(
        config,
        name="tiny-sd1",
        text=dataclasses.replace(config.text, hf_layout=True, act="quick_gelu", pad_token=END_TOKEN),
    )


@pytest.fixture(scope="module")
def sd1_model(random_model) -> StableDiffusion:
    return random_model(lambda: StableDiffusion(tiny_sd1_config()), seed=3)


@pytest.fixture(scope="module")
def sd1_file(sd1_model, tmp_path_factory):
    return save_checkpoint(sd1_model, tmp_path_factory.mktemp("sd1") / "tiny-sd1.safetensors")


def rewrite(path, out, edit, metadata=True):
    with safe_open(str(path), framework="pt") as f:
        kept = f.metadata() if metadata else None
    save_file(edit(load_file(str(path))), str(out), metadata=kept)
    return out


def meta_model(name: str) -> StableDiffusion:
    with torch.device("meta"):
        return StableDiffusion(preset(name))


# --- the layouts of real files ----------------------------------------------------------------------------


def test_sd1_layout_with_the_extras_of_a_full_file(sd1_model, sd1_file, tmp_path):
    """A 'full' SD 1.x file: EMA copies and counters, DDPM buffers, HF's int64 position_ids; stored in fp16."""
    extras = {
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(7, dtype=torch.int32),
        "model_ema.diffusion_modelout2bias": torch.zeros(4),
        "betas": torch.zeros(1000),
        "alphas_cumprod": torch.ones(1000),
        HF_PREFIX + "embeddings.position_ids": torch.arange(77)[None],
    }
    path = rewrite(sd1_file, tmp_path / "full.safetensors", lambda s: {**{k: v.half() for k, v in s.items()}, **extras})
    for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        loaded = load_checkpoint(path, dtype=dtype)
        for key, value in sd1_model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value.half().to(torch_dtype)), key
    assert loaded.dtype == torch.bfloat16


def test_sd1_text_keys_round_trip(sd1_model, sd1_file):
    """HF names → open_clip layout → HF names gives back the very tensors of the file."""
    with safe_open(str(sd1_file), framework="pt") as f:
        text_keys = [k for k in f.keys() if k.startswith(HF_PREFIX)]
        assert any(".self_attn.k_proj." in k for k in text_keys)
        exported = original_state_dict(load_checkpoint(sd1_file))
        for key in text_keys:
            assert torch.equal(exported[key], f.get_tensor(key)), key


def test_sd1_missing_attention_part_is_named_in_the_files_own_names(sd1_file, tmp_path):
    key = HF_PREFIX + "encoder.layers.1.self_attn.k_proj.weight"
    path = rewrite(sd1_file, tmp_path / "no-k.safetensors", lambda s: {k: v for k, v in s.items() if k != key})
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(path) in str(error.value) and f"1 missing keys:\n    {key}" in str(error.value)


def test_unused_last_text_layer_is_dropped(random_model, tmp_path):
    """SD 2.x files hold all 24 OpenCLIP layers; the model runs 23 (penultimate output) and ignores the last."""
    config = preset("tiny")
    deeper = dataclasses.replace(config, text=dataclasses.replace(config.text, layers=config.text.layers + 1))
    path = save_checkpoint(random_model(lambda: StableDiffusion(deeper), seed=1), tmp_path / "deeper.safetensors")
    loaded = load_checkpoint(path, config=config)
    assert len(loaded.cond_stage_model.model.transformer.resblocks) == config.text.layers


@pytest.mark.parametrize(
    "name, filenames",
    [
        ("sd15", ["v1-5-pruned-emaonly.safetensors", "v1-5-pruned.safetensors"]),
        ("sd14", ["sd-v1-4.safetensors", "sd14-full.safetensors"]),
        ("sd21", ["v2-1_768-ema-pruned.safetensors", "768-v-ema.safetensors", "sd21-v.safetensors"]),
        ("sd21-base", ["v2-1_512-ema-pruned.safetensors", "512-base-ema.safetensors", "sd21-base.safetensors"]),
    ],
)
def test_real_file_headers_pass_the_strict_check(name, filenames, sd_keys_dir, caplog):
    """Both published layouts (EMA-only and full with `model_ema.*`) pass, and the name picks the variant."""
    file = "keys_sd15" if name in ("sd14", "sd15") else "keys_sd21"
    header = {**read_key_list(sd_keys_dir / f"{file}.txt"), **read_key_list(sd_keys_dir / f"{file}_extras.txt")}
    with caplog.at_level(logging.WARNING, logger=loader.__name__):
        for filename in filenames:
            config = detect_config(header, path=filename)
            assert config.name == name, filename
            with torch.device("meta"):
                check_checkpoint(header, StableDiffusion(config), path=filename)
    assert not caplog.text  # every one of these names is unambiguous


@pytest.mark.parametrize("filename", ["my-finetune-v2.safetensors", "dreamlike-512-768.safetensors"])
def test_sd2_names_without_a_clear_hint_warn(filename, sd_keys_dir, caplog):
    header = read_key_list(sd_keys_dir / "keys_sd21.txt")
    with caplog.at_level(logging.WARNING, logger=loader.__name__):
        assert detect_config(header, path=filename).name == "sd21"
    assert "model=sd21-base" in caplog.text


@pytest.mark.parametrize(
    "chosen, file, says",
    [
        ("sd15", "keys_sd21", "looks like SD 2.x: pass model=sd21-base (512, ε) or model=sd21 (768, v)"),
        ("sd21", "keys_sd15", "looks like SD 1.x: pass model=sd15"),
    ],
)
def test_wrong_preset_says_what_the_file_is(chosen, file, says, sd_keys_dir):
    with pytest.raises(CheckpointError) as error:
        check_checkpoint(
            read_key_list(sd_keys_dir / f"{file}.txt"), meta_model(chosen), path=f"/data/{file}.safetensors"
        )
    message = str(error.value)
    assert message.startswith(f"/data/{file}.safetensors does not match model config {chosen!r}")
    assert "missing keys" in message and "unexpected keys" in message and says in message


def _sdxl(keys):
    out = {k.replace("cond_stage_model.model.", "conditioner.embedders.1.model."): v for k, v in keys.items()}
    return {**out, "model.diffusion_model.label_emb.0.0.weight": (1280, 2816)}


@pytest.mark.parametrize(
    "file, edit, says",
    [
        ("keys_sd21", _sdxl, "an SD-XL checkpoint"),
        ("keys_sd15", lambda k: {**k, "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}, "inpainting"),
        (
            "keys_sd15",
            lambda k: {**k, "model.diffusion_model.input_blocks.0.0.weight": (320, 8, 3, 3)},
            "InstructPix2Pix",
        ),
        ("keys_sd21", lambda k: {**k, "model.diffusion_model.label_emb.0.0.weight": (1024, 1024)}, "label_emb"),
        (
            "keys_sd15",
            lambda k: {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320, 1, 1)},
            "LoRA",
        ),
        (
            "keys_sd15",
            lambda k: {"conv_in.weight": (320, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)},
            "diffusers-format",
        ),
    ],
)
def test_other_model_families_are_named(file, edit, says, sd_keys_dir):
    header = edit(read_key_list(sd_keys_dir / f"{file}.txt"))
    with pytest.raises(CheckpointError) as error:
        detect_config(header, path="/data/model.safetensors")
    message = str(error.value)
    assert message.startswith("/data/model.safetensors: ") and says in message
    assert "supported are SD 1.x (model=sd14|sd15), SD 2.x (model=sd21-base|sd21)" in message
    with pytest.raises(CheckpointError, match=says):  # an explicit preset gets the same explanation
        check_checkpoint(header, meta_model("sd15" if file == "keys_sd15" else "sd21"), path="/data/model.safetensors")


# --- broken files and bad arguments -------------------------------------------------------------------------


def test_problems_are_found_in_the_header_before_any_tensor_is_read(sd1_file, tmp_path, monkeypatch):
    key = "first_stage_model.quant_conv.bias"
    path = rewrite(sd1_file, tmp_path / "misshaped.safetensors", lambda s: {**s, key: torch.zeros(3)})
    reads = []

    class CountingFile:
        def __init__(self, file):
            self.file = file

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def get_tensor(self, name):
            reads.append(name)
            return self.file.get_tensor(name)

    real_open = loader.safe_open
    monkeypatch.setattr(loader, "safe_open", lambda *a, **k: CountingFile(real_open(*a, **k)))
    with pytest.raises(CheckpointError, match=rf"{key}: file \(3,\), model \(8,\)"):
        load_checkpoint(path)
    assert reads == []


def test_non_float_weights_are_listed(sd1_file, tmp_path):
    key = "model.diffusion_model.out.2.weight"
    path = rewrite(sd1_file, tmp_path / "int8.safetensors", lambda s: {**s, key: s[key].to(torch.int8)})
    with pytest.raises(CheckpointError, match=rf"1 keys that are not floating point \(weights must be\):\n    {key}"):
        load_checkpoint(path)


def test_a_pickle_named_safetensors_is_refused_with_the_conversion(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert str(path) in message and "PyTorch pickle" in message and "model-converted.safetensors" in message


def test_folders_and_empty_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=rf"{tmp_path} is a folder; load_checkpoint reads one \.safetensors file"):
        load_checkpoint(tmp_path)
    empty = tmp_path / "empty.safetensors"
    empty.touch()
    with pytest.raises(CheckpointError, match=rf"{empty}: cannot read as safetensors"):
        load_checkpoint(empty)


def test_unreadable_config_metadata_is_named(sd1_file, tmp_path):
    path = tmp_path / "bad-metadata.safetensors"
    save_file(load_file(str(sd1_file)), str(path), metadata={loader.CONFIG_METADATA_KEY: '{"name": "x"'})
    with pytest.raises(CheckpointError, match=rf"{path}: its 'p2p_model_config' metadata is not a model config"):
        load_checkpoint(path)
    load_checkpoint(path, config=tiny_sd1_config())  # an explicit config does not need it


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, "fp64"])
def test_unsupported_dtypes_are_refused(sd1_file, dtype):
    with pytest.raises(ValueError, match=r"is not supported; use one of \['bf16'"):
        load_checkpoint(sd1_file, dtype=dtype)


def test_device_names_are_case_insensitive(sd1_file):
    assert load_checkpoint(sd1_file, dtype=torch.bfloat16, device="CPU").device == torch.device("cpu")
