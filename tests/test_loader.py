"""Strict checkpoint loading: round trips, dtypes, every kind of bad file, variant detection, and the real SD key lists.

Files are small synthetic ones made from the tiny model; the SD key lists (names and shapes of the public
SD 1.5 / 2.1 checkpoints, in the shared folder) stand in for the 4 GB files.
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models import loader
from models.loader import (
    CONFIG_METADATA_KEY,
    CheckpointError,
    detect_config,
    is_ignored,
    load_checkpoint,
    original_state_dict,
    save_checkpoint,
)
from models.stable_diffusion import PRESETS, ModelConfig, StableDiffusion, preset
from p2p.experiments.random_files import read_key_list


@pytest.fixture(scope="module")
def tiny_model(random_model) -> StableDiffusion:
    return random_model(lambda: StableDiffusion(preset("tiny")), seed=5)


@pytest.fixture(scope="module")
def tiny_file(tiny_model, tmp_path_factory):
    return save_checkpoint(tiny_model, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def rewrite(path, out, edit):
    """Copy a checkpoint through `edit(state) -> state`, keeping its metadata."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(edit(load_file(str(path))), str(out), metadata=metadata)
    return out


def assert_same_weights(a: StableDiffusion, b: StableDiffusion, *, dtype=torch.float32):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sb[key].dtype == dtype, key
        assert torch.equal(sa[key].to(dtype), sb[key]), key


def test_round_trip(tiny_model, tiny_file):
    loaded = load_checkpoint(tiny_file)
    assert loaded.config == tiny_model.config  # from the file's metadata, tuples and all
    assert_same_weights(tiny_model, loaded)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


@pytest.mark.parametrize("dtype, torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_load_in_half_precision(tiny_model, tiny_file, dtype, torch_dtype):
    assert_same_weights(tiny_model, load_checkpoint(tiny_file, dtype=dtype), dtype=torch_dtype)


def test_half_precision_file_loads_as_fp32(tiny_model, tmp_path):
    path = save_checkpoint(tiny_model, tmp_path / "tiny-fp16.safetensors", dtype="fp16")
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
    loaded = load_checkpoint(path, dtype="fp32")
    assert loaded.dtype == torch.float32
    expected = tiny_model.unet.out[2].weight.half().float()
    assert torch.equal(loaded.unet.out[2].weight, expected)


def test_save_refuses_to_overwrite(tiny_model, tiny_file):
    with pytest.raises(FileExistsError, match="exists"):
        save_checkpoint(tiny_model, tiny_file)


def test_metadata_config_round_trip():
    for name in PRESETS:
        config = preset(name)
        assert ModelConfig.from_json(config.to_json()) == config, name


def test_load_uses_meta_device_and_assign(tiny_file, monkeypatch):
    """The model is built on `meta` and takes the file's tensors themselves (`assign=True`): no second copy."""
    calls = []
    original = torch.nn.Module.load_state_dict

    def spy(self, state_dict, *args, **kwargs):
        calls.append((dict(state_dict), kwargs))
        return original(self, state_dict, *args, **kwargs)

    monkeypatch.setattr(StableDiffusion, "load_state_dict", spy, raising=False)
    model = load_checkpoint(tiny_file)
    ((state, kwargs),) = calls
    assert kwargs.get("strict") is True and kwargs.get("assign") is True
    assert not any(p.is_meta for p in model.parameters())
    for key, param in model.state_dict().items():
        assert param.data_ptr() == state[key].data_ptr(), f"{key} was copied"


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        load_checkpoint("/nonexistent/nowhere.safetensors")


def test_refuses_pickles(tmp_path):
    path = tmp_path / "sd-v1-5.ckpt"
    path.write_bytes(b"not even opened")
    with pytest.raises(CheckpointError, match=r"refusing to unpickle a '\.ckpt' file.*safetensors"):
        load_checkpoint(path)


def test_truncated_file(tiny_file, tmp_path):
    data = tiny_file.read_bytes()
    for cut in (len(data) // 2, 100):  # inside the tensor data; inside the header
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated"):
            load_checkpoint(path)


def test_renamed_key_is_reported_by_name(tiny_file, tmp_path):
    key = "model.diffusion_model.out.2.weight"
    path = rewrite(
        tiny_file,
        tmp_path / "renamed.safetensors",
        lambda s: {("model.diffusion_model.out.2.weights" if k == key else k): v for k, v in s.items()},
    )
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "1 missing keys" in message and key in message
    assert "1 unexpected keys" in message and "out.2.weights" in message


def test_wrong_shape_is_reported_with_both_shapes(tiny_file, tmp_path):
    key = "first_stage_model.quant_conv.bias"
    path = rewrite(tiny_file, tmp_path / "misshaped.safetensors", lambda s: {**s, key: torch.zeros(3)})
    with pytest.raises(CheckpointError, match=rf"{key}: file \(3,\), model \(8,\)"):
        load_checkpoint(path)


def test_ignorable_keys_are_dropped(tiny_file, tmp_path):
    """Real files carry EMA copies and schedule buffers; they are dropped by declaration, not by strict=False."""
    path = rewrite(
        tiny_file,
        tmp_path / "extras.safetensors",
        lambda s: {**s, "betas": torch.zeros(1000), "model_ema.decay": torch.tensor(0.999)},
    )
    load_checkpoint(path)


# --- the public SD checkpoints, through their key lists -------------------------------------------------


@pytest.mark.parametrize("name, file", [("sd15", "keys_sd15"), ("sd21", "keys_sd21")])
def test_exported_keys_equal_the_real_checkpoint(name, file, sd_keys_dir):
    config = preset(name)
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in original_state_dict(StableDiffusion(config)).items()}
    real = read_key_list(sd_keys_dir / f"{file}.txt")
    assert not [k for k in ours if is_ignored(k, config)], "a key of ours is declared ignorable"
    assert ours == {k: v for k, v in real.items() if not is_ignored(k, config)}
    # every key the files carry (also the full, non-EMA-only variants' extras) is ours or declared ignorable
    for listing in (f"{file}.txt", f"{file}_extras.txt"):
        dropped = [k for k in read_key_list(sd_keys_dir / listing) if k not in ours and not is_ignored(k, config)]
        assert not dropped, f"{listing}: keys neither loaded nor declared ignorable: {dropped[:5]}"


@pytest.mark.parametrize(
    "file, filename, expected",
    [
        ("keys_sd15", "v1-5-pruned-emaonly.safetensors", "sd15"),
        ("keys_sd21", "v2-1_512-ema-pruned.safetensors", "sd21-base"),
        ("keys_sd21", "v2-1_768-ema-pruned.safetensors", "sd21"),
    ],
)
def test_variant_detection_from_keys(file, filename, expected, sd_keys_dir):
    assert detect_config(read_key_list(sd_keys_dir / f"{file}.txt"), path=filename) == preset(expected)


def test_ambiguous_sd2_name_warns(caplog):
    shapes = {"cond_stage_model.model.token_embedding.weight": (49408, 1024)}
    with caplog.at_level(logging.WARNING, logger=loader.__name__):
        assert detect_config(shapes, path="my-finetune.safetensors").name == "sd21"
    assert "model=sd21-base" in caplog.text


def test_unrecognised_file_without_metadata(tiny_file, tmp_path):
    path = tmp_path / "no-metadata.safetensors"
    save_file(load_file(str(tiny_file)), str(path))  # same tensors, no p2p_model_config
    with pytest.raises(CheckpointError, match=CONFIG_METADATA_KEY):
        load_checkpoint(path)
