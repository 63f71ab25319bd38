"""diffusers' FLUX transformer names → BFL's original names (models/diffusers_flux.py) is the inverse of diffusers'
own `convert_flux_transformer_checkpoint_to_diffusers`: original → theirs → ours gives back the same keys and tensors.
Their converter assumes FLUX.1's width (3072, fixed in its code), so the values are checked at that width with one
block of each kind (fp16, ~1 GB), the names and shapes of the whole dev and schnell transformers on meta tensors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import randomize_
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

from models.diffusers_flux import flux_transformer_to_original
from models.flux import Flux, flux_dev, flux_schnell
from models.mmdit import CHECKPOINT_PREFIX


def round_trip(model: Flux) -> tuple[dict, dict]:
    original = {CHECKPOINT_PREFIX + k: v for k, v in model.state_dict().items()}
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    return original, flux_transformer_to_original(theirs, model.config)


def test_one_block_of_each_kind_at_flux_width_round_trips():
    with torch.device("meta"):
        model = Flux(dataclasses.replace(flux_dev(), depth=1, depth_single_blocks=1)).half()
    original, mapped = round_trip(randomize_(model.to_empty(device="cpu"), seed=4))
    assert sorted(mapped) == sorted(original)
    assert [k for k in original if not torch.equal(mapped[k], original[k])] == []


@pytest.mark.parametrize("config", [flux_dev, flux_schnell])
def test_real_flux_transformer_names_and_shapes_round_trip(config):
    with torch.device("meta"):
        model = Flux(config())
    original, mapped = round_trip(model)
    assert sorted(mapped) == sorted(original)
    assert [k for k in original if mapped[k].shape != original[k].shape] == []
