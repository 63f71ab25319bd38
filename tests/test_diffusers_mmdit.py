"""diffusers' SD3 transformer names → the original SD3 / SD3.5 names (models/diffusers_mmdit.py) is the inverse of
diffusers' own `convert_sd3_transformer_checkpoint_to_diffusers`: original → theirs → ours gives back the same keys
and tensors, on toy widths of SD3-medium, SD3.5-medium (image-only attn2, q/k RMSNorm) and SD3.5-large (q/k norm),
and as names and shapes at the real widths (meta tensors)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import randomize_
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

from models.diffusers_mmdit import sd3_transformer_to_original
from models.mmdit import CHECKPOINT_PREFIX, MMDiT, MMDiTConfig
from models.mmdit import PRESETS as MMDIT_PRESETS

TOY = dict(
    depth=3, hidden_size=64, num_heads=2, pos_embed_max_size=8, pos_embed_base_size=4, context_dim=32, pooled_dim=16
)
TOYS = {
    "sd3-medium": MMDiTConfig(**TOY),
    "sd35-medium": MMDiTConfig(**TOY, qk_norm=True, x_self_attn_blocks=(0, 1)),
    "sd35-large": MMDiTConfig(**TOY, qk_norm=True),
}


def round_trip(model: MMDiT) -> tuple[dict, dict]:
    original = {CHECKPOINT_PREFIX + k: v for k, v in model.state_dict().items()}
    theirs = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    return original, sd3_transformer_to_original(theirs, model.config)


@pytest.mark.parametrize("name", sorted(TOYS))
def test_toy_sd3_transformers_round_trip(name):
    original, mapped = round_trip(randomize_(MMDiT(TOYS[name]), seed=3))
    assert sorted(mapped) == sorted(original)
    assert [k for k in original if not torch.equal(mapped[k], original[k])] == []


@pytest.mark.parametrize("name", sorted(MMDIT_PRESETS))
def test_real_sd3_transformer_names_and_shapes_round_trip(name):
    with torch.device("meta"):
        model = MMDiT(MMDIT_PRESETS[name]())
    original, mapped = round_trip(model)
    assert sorted(mapped) == sorted(original)
    assert [k for k in original if mapped[k].shape != original[k].shape] == []


def test_unknown_and_partial_keys_keep_their_names():
    config = dataclasses.replace(TOYS["sd3-medium"], depth=1)
    mapped = sd3_transformer_to_original(
        {"transformer_blocks.0.attn.to_q.weight": torch.zeros(2), "mystery.weight": torch.zeros(1)}, config
    )
    assert sorted(mapped) == ["transformer/mystery.weight", "transformer/transformer_blocks.0.attn.to_q.weight"]
