"""Our SD3 / SD3.5 MM-DiT has the original checkpoints' names and equals diffusers' `SD3Transformer2DModel`.

Weights move through diffusers' own single-file converter (`convert_sd3_transformer_checkpoint_to_diffusers`)
and a strict load, as a real `model.diffusion_model.*` file would: equal outputs prove the names *and* the
computation. Random weights, CPU, fp32. Full-size runs hold one model at a time (reference first, output
saved, freed, then ours) under the shared big-memory lock's discipline.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

from models.errors import UserError
from models.mmdit import CHECKPOINT_PREFIX, PRESETS, MMDiT, MMDiTConfig, sincos_pos_table

TOLERANCE = 1e-4  # relative: max |ours − reference| / max |reference|
KEY_FILES = {
    "sd3-medium": "keys_sd3_medium.txt",
    "sd35-medium": "keys_sd35_medium.txt",
    "sd35-large": "keys_sd35_large.txt",
}
KEYS_DIR = Path(__file__).parent / "data" / "sd-keys"


def read_keys(path: Path, prefix: str = "") -> dict[str, list[int]]:
    """`name<TAB>[shape]` lines of a key list, those starting with `prefix`."""
    keys = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape = line.split("\t")
        if name.startswith(prefix):
            keys[name] = [int(d) for d in shape.strip("[]").split(",") if d.strip()]
    return keys


def diffusers_config(c: MMDiTConfig) -> dict:
    return dict(
        sample_size=c.pos_embed_base_size * c.patch_size,
        patch_size=c.patch_size,
        in_channels=c.in_channels,
        num_layers=c.depth,
        attention_head_dim=c.head_dim,
        num_attention_heads=c.num_heads,
        joint_attention_dim=c.context_dim,
        caption_projection_dim=c.hidden_size,
        pooled_projection_dim=c.pooled_dim,
        out_channels=c.in_channels,
        pos_embed_max_size=c.pos_embed_max_size,
        dual_attention_layers=tuple(c.x_self_attn_blocks),
        qk_norm="rms_norm" if c.qk_norm else None,
    )


def random_mmdit(config: MMDiTConfig, randomize, *, seed: int = 0) -> MMDiT:
    """Our model with seeded random parameters; the stored sin-cos table is kept (it is data, not learnt)."""
    with torch.device("meta"):
        model = MMDiT(config)
    model = model.to_empty(device="cpu")
    model.pos_embed.copy_(
        sincos_pos_table(config.hidden_size, config.pos_embed_max_size, base_size=config.pos_embed_base_size)
    )
    return randomize(model, seed=seed).eval().requires_grad_(False)


def reference_from_ours(model: MMDiT) -> SD3Transformer2DModel:
    checkpoint = {CHECKPOINT_PREFIX + k: v for k, v in model.state_dict().items()}
    converted = convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    assert not checkpoint, f"converter left keys over: {sorted(checkpoint)[:4]}"
    with torch.device("meta"):
        reference = SD3Transformer2DModel(**diffusers_config(model.config))
    reference.load_state_dict(converted, strict=True, assign=True)
    return reference.eval()


def inputs(c: MMDiTConfig, *, batch=2, size=(8, 12), num_text=21, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(batch, c.in_channels, *size, generator=g),
        timesteps=torch.tensor([999.0, 312.5])[:batch],
        context=torch.randn(batch, num_text, c.context_dim, generator=g),
        pooled=torch.randn(batch, c.pooled_dim, generator=g),
    )


def reference_output(reference, kw):
    with torch.no_grad():
        return reference(
            hidden_states=kw["x"],
            encoder_hidden_states=kw["context"],
            pooled_projections=kw["pooled"],
            timestep=kw["timesteps"],
            return_dict=False,
        )[0]


def relative_error(actual, expected) -> float:
    assert actual.shape == expected.shape
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    print(f"relative max error {error:.2e} (max |reference| {expected.abs().max():.2f})")
    return error


def tiny(**changes) -> MMDiTConfig:
    fields = dict(
        depth=3,
        hidden_size=64,
        num_heads=2,
        pos_embed_max_size=16,
        pos_embed_base_size=8,
        context_dim=48,
        pooled_dim=40,
    )
    return MMDiTConfig(**(fields | changes))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_state_dict_equals_the_checkpoint_key_list(preset):
    with torch.device("meta"):
        model = MMDiT(PRESETS[preset]())
    ours = {CHECKPOINT_PREFIX + k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == read_keys(KEYS_DIR / KEY_FILES[preset], CHECKPOINT_PREFIX)


def test_sincos_table_equals_diffusers():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    expected = get_2d_sincos_pos_embed(64, 12, base_size=4)
    assert torch.allclose(sincos_pos_table(64, 12, base_size=4)[0], expected.float(), atol=1e-6)


@pytest.mark.parametrize("variant", ["sd3", "sd35-large", "sd35-medium"])
def test_tiny_matches_diffusers(variant, randomize):
    config = {
        "sd3": tiny(),
        "sd35-large": tiny(qk_norm=True),
        "sd35-medium": tiny(qk_norm=True, x_self_attn_blocks=(0, 1)),
    }[variant]
    ours = random_mmdit(config, randomize, seed=1)
    reference = reference_from_ours(ours)
    kw = inputs(config)
    expected = reference_output(reference, kw)
    with torch.no_grad():
        actual = ours(**kw)
    assert relative_error(actual, expected) <= TOLERANCE


def test_text_length_is_read_from_the_context(randomize):
    """Any number of text tokens works, and the output depends on every one of them (text first, joint softmax)."""
    config = tiny()
    ours = random_mmdit(config, randomize)
    for num_text in (5, 90):
        kw = inputs(config, num_text=num_text)
        with torch.no_grad():
            out = ours(**kw)
            kw["context"][:, -1] += 1.0
            changed = ours(**kw)
        assert out.shape == kw["x"].shape
        assert not torch.allclose(out, changed)


def test_too_large_a_latent_is_refused(randomize):
    ours = random_mmdit(tiny(), randomize)
    with pytest.raises(UserError, match="16×16 patches"):
        ours(**inputs(tiny(), size=(34, 8)))


def run_real_width(preset: str, depth: int, randomize, tmp_path, *, x_self_attn_blocks=None, size=(16, 16)):
    """Reference first (its output saved), freed, then ours: never both full models in memory."""
    config = PRESETS[preset]()
    config.depth = depth
    if x_self_attn_blocks is not None:
        config.x_self_attn_blocks = x_self_attn_blocks
    kw = inputs(config, size=size, num_text=77 + 16)
    ours = random_mmdit(config, randomize, seed=3)
    reference = reference_from_ours(ours)  # assign=True: the reference now holds our tensors
    del ours
    gc.collect()
    torch.save(reference_output(reference, kw), tmp_path / "expected.pt")
    del reference
    gc.collect()
    ours = random_mmdit(config, randomize, seed=3)  # the same weights again, from the same seed
    with torch.no_grad():
        actual = ours(**kw)
    return relative_error(actual, torch.load(tmp_path / "expected.pt"))


@pytest.mark.slow
def test_sd3_medium_full_depth_matches_diffusers(randomize, tmp_path):
    assert run_real_width("sd3-medium", 24, randomize, tmp_path) <= TOLERANCE


@pytest.mark.slow
def test_sd35_medium_real_width_matches_diffusers(randomize, tmp_path):
    """3 blocks: block 0 with the image-only attn2 (a dual block), block 1 without, the last (pre_only text)."""
    assert run_real_width("sd35-medium", 3, randomize, tmp_path, x_self_attn_blocks=(0,)) <= TOLERANCE


@pytest.mark.slow
def test_sd35_large_real_width_matches_diffusers(randomize, tmp_path):
    assert run_real_width("sd35-large", 3, randomize, tmp_path) <= TOLERANCE
