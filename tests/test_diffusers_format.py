"""The diffusers → original names mapping (models/diffusers_format.py) is the inverse of diffusers' own single-file
converters, and a folder's configs name the right preset.

Both ways: our model's state_dict under the original names → diffusers' `convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint` → our `to_original` →
the same keys and the same tensors. On toy SD 1.x / 2.x / SDXL shapes (random values), on the real SD 1.5, SD 2.1 and
SDXL shapes as names and shapes (meta tensors, instant), and as values at the real shapes (`slow`).
"""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import randomize_
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from diffusers_folders import (
    diffusers_unet_config,
    diffusers_vae_config,
    tiny_sd1_config,
    tiny_sd2_config,
    write_configs,
)
from test_sdxl_parity import _clip_text_config
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from models.diffusers_config import architecture, config_from_folder
from models.diffusers_folder import folder_config
from models.diffusers_format import LOGIT_SCALE, SDXL_BIGG_PREFIX, components, to_original
from models.loader import CheckpointError, original_state_dict
from models.stable_diffusion import StableDiffusion, preset, tiny_sdxl_config

CONFIGS = {"sd1": tiny_sd1_config, "sd2": tiny_sd2_config, "sdxl": tiny_sdxl_config}


def to_diffusers(component: str, state: dict, config) -> dict:
    """diffusers' own converters: original names → one component's diffusers names."""
    if component == "unet":
        return convert_ldm_unet_checkpoint(state, diffusers_unet_config(config))
    if component == "vae":
        return convert_ldm_vae_checkpoint(state, diffusers_vae_config(config))
    if component == "text_encoder" and config.text.hf_layout:  # SD 1.x and SDXL's CLIP-L: a prefix off
        return convert_ldm_clip_checkpoint(state)
    text, cls, prefix = config.text, CLIPTextModel, "cond_stage_model.model."
    if component == "text_encoder_2":
        text, cls, prefix = config.text_2, CLIPTextModelWithProjection, SDXL_BIGG_PREFIX
    with torch.device("meta"):  # only its config is read
        reference = cls(_clip_text_config(text, projection_dim=text.projection_dim or 512))
    return convert_open_clip_checkpoint(reference, state, prefix=prefix)


def assert_round_trip(model: StableDiffusion, *, values: bool) -> int:
    """Every component: original → diffusers (theirs) → original (ours) gives back the same keys (and tensors)."""
    config, original = model.config, original_state_dict(model)
    mapped = {}
    for component in components(config):
        mapped.update(to_original(component, to_diffusers(component, original, config), config))
    if config.text_2 is not None:  # diffusers drops bigG's unused temperature; ours fills CLIP's initial value
        scale = mapped.pop(SDXL_BIGG_PREFIX + "logit_scale")
        assert scale.is_meta or scale.item() == pytest.approx(LOGIT_SCALE)
        original.pop(SDXL_BIGG_PREFIX + "logit_scale")
    assert sorted(mapped) == sorted(original)
    wrong = [k for k in original if mapped[k].shape != original[k].shape]
    if values:
        wrong += [k for k in original if not torch.equal(mapped[k], original[k])]
    assert not wrong, f"{len(wrong)} tensors differ, e.g. {wrong[:3]}"
    return len(original)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tiny_mapping_inverts_diffusers_converters(name, random_model):
    assert assert_round_trip(random_model(lambda: StableDiffusion(CONFIGS[name]()), seed=7), values=True) > 100


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_real_shapes_names_and_shapes_invert_diffusers_converters(name):
    with torch.device("meta"):
        model = StableDiffusion(preset(name))
    assert assert_round_trip(model, values=False) > 1000  # every tensor of the original layout (test_loader: the
    # original layout is exactly the released files' key lists)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sd21"])  # SDXL values at full size: not yet run within 24 GiB (issue 26)
def test_real_shapes_values_invert_diffusers_converters(name):
    """Random fp16 values at the real shapes (SDXL ~7 GB: run under the big-memory lock)."""
    with torch.device("meta"):
        model = StableDiffusion(preset(name)).half()
    randomize_(model.to_empty(device="cpu"), seed=8)
    assert_round_trip(model, values=True)
    del model
    gc.collect()


def test_older_vae_attention_names_and_unknown_keys(random_model):
    """Folders saved before diffusers 0.14 name the VAE attention query/key/value/proj_attn; unknown keys are
    reported under their own names."""
    config = tiny_sd1_config()
    model = random_model(lambda: StableDiffusion(config), seed=7)
    original = original_state_dict(model)
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    diffusers = to_diffusers("vae", original, config)
    old = {}
    for key, value in diffusers.items():
        for new, former in renames.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{former}.")
        old[key] = value
    assert any(".query." in k for k in old)
    mapped = to_original("vae", old, config)
    expected = {k: v for k, v in original.items() if k.startswith("first_stage_model.")}
    assert sorted(mapped) == sorted(expected) and all(torch.equal(mapped[k], expected[k]) for k in expected)
    extra = to_original("unet", {"down_blocks.0.resnets.0.mystery.weight": torch.zeros(1)}, config)
    assert list(extra) == ["unet/down_blocks.0.resnets.0.mystery.weight"]


@pytest.mark.parametrize("name", ["sd15", "sd21-base", "sd21", "sdxl"])
def test_real_folder_configs_name_their_preset(name, tmp_path):
    folder = write_configs(preset(name), tmp_path)
    found = config_from_folder(folder)
    assert found.name == name and architecture(found) == architecture(preset(name))


def test_folder_of_another_model_is_one_line_naming_both(tmp_path):
    sdxl = write_configs(preset("sdxl"), tmp_path / "sdxl")
    with pytest.raises(CheckpointError) as error:
        folder_config(sdxl, config=preset("sd15"))
    assert str(error.value) == f"{sdxl} holds model=sdxl but model=sd15 was asked for; pass model=sdxl"
    v_model = write_configs(preset("sd21"), tmp_path / "sd21")
    with pytest.raises(CheckpointError, match="holds model=sd21 but model=sd21-base"):  # v- vs ε-prediction
        folder_config(v_model, config=preset("sd21-base"))
    sd15 = write_configs(preset("sd15"), tmp_path / "sd15")
    assert folder_config(sd15, config=preset("sd14")).name == "sd14"  # the same architecture
    assert folder_config(sd15, config=None).name == "sd15"
