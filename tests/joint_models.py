"""Tiny random SD3, SD3.5 (QK norm, an image-only `attn2`) and FLUX flow models with a SentencePiece T5 tokenizer,
shared by the joint-attention editing tests (the architectures of `test_flow_pipeline.py`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from test_flow_pipeline import random_flow_model, tiny_flux_config, tiny_sd3_config

from models.flow_model import FlowModel, FlowModelConfig
from models.t5 import T5Tokenizer

FAMILIES = ("sd3", "sd35", "flux")
HEIGHT, WIDTH, STEPS = 48, 32, 3  # a 3×2 patch grid: 6 image tokens per joint site


def tiny_config(family: str) -> FlowModelConfig:
    if family == "flux":
        return tiny_flux_config()
    config = tiny_sd3_config()
    if family == "sd35":
        mmdit = dataclasses.replace(config.mmdit, qk_norm=True, x_self_attn_blocks=(0,))
        config = dataclasses.replace(config, name="tiny-sd35", mmdit=mmdit)
    return config


def tiny_model(family: str, randomize, spiece_model: Path, *, seed: int = 31) -> FlowModel:
    model = random_flow_model(tiny_config(family), randomize, seed=seed)
    model.t5_tokenizer = T5Tokenizer(spiece_model)
    return model


def words_only_model(family: str, spiece_model: Path) -> FlowModel:
    """A flow model without any part built: enough for word positions and mappers."""
    model = FlowModel(tiny_config(family), parts=set())
    model.t5_tokenizer = T5Tokenizer(spiece_model)
    return model
