"""SDXL base 1.0 as a model of this stack: its checkpoint's names, strict loading, the text conditioning and
micro-conditioning `y`, the sizes it takes, weights stored in half precision and computed in fp32, and a VAE
decode that never returns NaN silently. Fast tests on `tiny_sdxl_config()`; the real file through its key list.
"""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers.models.embeddings import Timesteps
from test_parity_text import clip_tokenizer_files, hf_clip_tokenizer

from models import loader
from models.conditioner import size_conditioning
from models.errors import UserError
from models.loader import (
    CheckpointError,
    check_checkpoint,
    detect_config,
    is_ignored,
    load_checkpoint,
    original_state_dict,
    save_checkpoint,
)
from models.stable_diffusion import ModelConfig, StableDiffusion, preset, tiny_sdxl_config
from models.text import END_TOKEN, START_TOKEN
from p2p.experiments.random_files import read_key_list


def meta_model(config: ModelConfig) -> StableDiffusion:
    with torch.device("meta"):
        return StableDiffusion(config)


@pytest.fixture(scope="module")
def tiny_sdxl(random_model) -> StableDiffusion:
    return random_model(lambda: StableDiffusion(tiny_sdxl_config()), seed=7)


@pytest.fixture(scope="module")
def tiny_sdxl_file(tiny_sdxl, tmp_path_factory):
    return save_checkpoint(tiny_sdxl, tmp_path_factory.mktemp("sdxl") / "tiny-sdxl.safetensors")


# --- the checkpoint ------------------------------------------------------------------------------------------


def test_state_dict_equals_the_real_sdxl_file(sd_keys_dir):
    """Every name and shape of sd_xl_base_1.0.safetensors, and nothing else (CLIP-L in its HF names: our module
    holds it in open_clip's layout, `original_state_dict` maps it back by rule, as for SD 1.x)."""
    config = preset("sdxl")
    ours = {k: tuple(v.shape) for k, v in original_state_dict(meta_model(config)).items()}
    real = read_key_list(sd_keys_dir / "keys_sdxl.txt")
    assert ours == real
    assert not [k for k in ours if is_ignored(k, config)], "a key of the file is declared ignorable: strict means all"
    extras = read_key_list(sd_keys_dir / "keys_sdxl_extras.txt")
    assert extras and all(is_ignored(k, config) for k in extras)  # denoiser.sigmas, CLIP-L position_ids


def test_sdxl_files_are_detected(sd_keys_dir):
    keys = read_key_list(sd_keys_dir / "keys_sdxl.txt")
    assert detect_config(keys, path="sd_xl_base_1.0.safetensors") == preset("sdxl")
    with_extras = {**keys, **read_key_list(sd_keys_dir / "keys_sdxl_extras.txt")}
    check_checkpoint(with_extras, meta_model(preset("sdxl")), path="sd_xl_base_1.0.safetensors")  # no error


def test_sdxl_file_under_another_preset_says_pass_model_sdxl(sd_keys_dir):
    with pytest.raises(CheckpointError, match="looks like SDXL base 1.0: pass model=sdxl"):
        check_checkpoint(read_key_list(sd_keys_dir / "keys_sdxl.txt"), meta_model(preset("sd15")), path="x.safetensors")


def test_bad_sdxl_files_are_refused_with_the_names(sd_keys_dir):
    keys = read_key_list(sd_keys_dir / "keys_sdxl.txt")
    label, text_layer = (
        "model.diffusion_model.label_emb.0.2.weight",
        ("conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.bias"),
    )
    bad = {k: v for k, v in keys.items() if k != text_layer}  # missing
    bad["conditioner.embedders.1.model.ln_final.weight_renamed"] = bad.pop(
        "conditioner.embedders.1.model.ln_final.weight"
    )
    bad[label] = (1280, 1281)  # mis-shaped
    bad["model.diffusion_model.extra.weight"] = (4,)  # unexpected
    with pytest.raises(CheckpointError) as error:
        check_checkpoint(bad, meta_model(preset("sdxl")), path="bad.safetensors")
    message = str(error.value)
    for name in (
        text_layer,
        "conditioner.embedders.1.model.ln_final.weight",
        "ln_final.weight_renamed",
        f"{label}: file (1280, 1281), model (1280, 1280)",
        "model.diffusion_model.extra.weight",
    ):
        assert name in message
    assert isinstance(error.value, UserError)


def test_tiny_sdxl_round_trip(tiny_sdxl, tiny_sdxl_file):
    loaded = load_checkpoint(tiny_sdxl_file)
    assert loaded.config == tiny_sdxl.config
    assert loaded.state_dict().keys() == tiny_sdxl.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in tiny_sdxl.state_dict().items())


# --- text ------------------------------------------------------------------------------------------------------

PROMPTS = ["a cat riding a bicycle", "A photo of a Squirrel, eating a burger", "two  spaces, café and 3.14"]


def test_both_tokenizers_put_words_at_the_same_positions(tmp_path):
    """diffusers' SDXL tokenizers: `tokenizer` pads with <|endoftext|> (49407), `tokenizer_2` with "!" (id 0).
    Ours give the same ids, and the two differ only after the end token, so P2P's positions hold for both."""
    clip_l, big_g = meta_model(preset("sdxl")).conditioner.embedders
    files = clip_tokenizer_files(tmp_path)
    for ours, pad in ((clip_l, "<|endoftext|>"), (big_g, "!")):
        expected = hf_clip_tokenizer(files, pad_token=pad)(
            PROMPTS, padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        assert torch.equal(ours.tokenize(PROMPTS), expected), pad
    ids_l, ids_g = clip_l.tokenize(PROMPTS), big_g.tokenize(PROMPTS)
    for row_l, row_g in zip(ids_l.tolist(), ids_g.tolist()):
        end = row_l.index(END_TOKEN)
        assert row_l[: end + 1] == row_g[: end + 1] and row_l[0] == START_TOKEN
        assert set(row_l[end + 1 :]) == {END_TOKEN} and set(row_g[end + 1 :]) == {0}


def test_text_conditioning_shapes_and_pooled(tiny_sdxl):
    text = tiny_sdxl.encode_text(PROMPTS)
    c = tiny_sdxl.config
    assert text.context.shape == (3, 77, c.text.width + c.text_2.width) == (3, 77, c.unet.context_dim)
    assert text.pooled.shape == (3, c.text_2.projection_dim)
    assert torch.equal(tiny_sdxl.encode_prompts(PROMPTS), text.context)
    with torch.device("meta"):
        assert StableDiffusion(preset("sd15")).encode_text(["a cat"]).pooled is None


def test_empty_prompt_gives_zeros_unless_turned_off(tiny_sdxl):
    text = tiny_sdxl.encode_text(["", "a cat"])
    assert not text.context[0].any() and not text.pooled[0].any()
    assert text.context[1].abs().sum() > 0 and text.pooled[1].abs().sum() > 0
    tiny_sdxl.config.force_zeros_for_empty_prompt = False
    try:
        off = tiny_sdxl.encode_text([""])
    finally:
        tiny_sdxl.config.force_zeros_for_empty_prompt = True
    assert off.context.abs().sum() > 0 and off.pooled.abs().sum() > 0


# --- micro-conditioning y ---------------------------------------------------------------------------------------


def test_size_conditioning_equals_diffusers_add_time_proj():
    """y = [pooled | emb(original h, w) | emb(crop top, left) | emb(target h, w)], 256 each, embedded like
    diffusers' `add_time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)`."""
    pooled = torch.randn(2, 1280, generator=torch.Generator().manual_seed(0))
    y = size_conditioning(pooled, original_size=(768, 1024), crop=(16, 32), target_size=(832, 1216))
    time_ids = torch.tensor([[768, 1024, 16, 32, 832, 1216]] * 2, dtype=torch.float32)
    expected = torch.cat([pooled, Timesteps(256, True, 0)(time_ids.flatten()).reshape(2, -1)], dim=1)
    assert y.shape == (2, 2816) == (2, preset("sdxl").unet.adm_in_channels)
    assert torch.allclose(y, expected, rtol=0, atol=1e-6)


def test_added_conditioning_defaults_and_settings(tiny_sdxl):
    pooled = tiny_sdxl.encode_text(["a cat"]).pooled
    k = tiny_sdxl.config.size_embedding_dim
    y = tiny_sdxl.added_conditioning(pooled, height=64, width=96)
    assert torch.equal(
        y, size_conditioning(pooled, original_size=(64, 96), crop=(0, 0), target_size=(64, 96), embedding_dim=k)
    )
    settings = dict(original_size=(1024, 1024), crop=(8, 0), target_size=(64, 64))
    changed = tiny_sdxl.config.with_settings(**{k: list(v) for k, v in settings.items()})  # lists, as from YAML
    assert changed.original_size == (1024, 1024)
    with pytest.raises(UserError, match=r"model settings \['crop_size'\] are unknown; accepted are \[.*'crop'"):
        tiny_sdxl.config.with_settings(crop_size=[0, 0])
    tiny_sdxl.config, original = changed, tiny_sdxl.config
    try:
        y = tiny_sdxl.added_conditioning(pooled, height=64, width=96)
    finally:
        tiny_sdxl.config = original
    assert torch.equal(y, size_conditioning(pooled, **settings, embedding_dim=k))
    assert meta_model(preset("sd15")).added_conditioning(None, height=512, width=512) is None


def test_unet_needs_y_and_uses_it(tiny_sdxl):
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    text = tiny_sdxl.encode_text(["a cat"])
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"vector y of shape \(batch, 160\)"):
            tiny_sdxl.unet(x, 500, text.context)
        small = tiny_sdxl.unet(x, 500, text.context, y=tiny_sdxl.added_conditioning(text.pooled, height=64, width=64))
        large = tiny_sdxl.unet(x, 500, text.context, y=tiny_sdxl.added_conditioning(text.pooled, height=1024, width=64))
    assert (small - large).abs().max() > 1e-3  # the sizes reach the output


def test_gradient_checkpointing_gives_the_same_gradients(tiny_sdxl):
    """Null-text inversion's memory lever: the same loss and gradient w.r.t. the context, blocks recomputed."""
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    text = tiny_sdxl.encode_text(["a cat"])
    y = tiny_sdxl.added_conditioning(text.pooled, height=64, width=64)
    results = []
    for checkpointing in (False, True):
        context = text.context.clone().requires_grad_(True)
        tiny_sdxl.unet.gradient_checkpointing = checkpointing
        try:
            loss = tiny_sdxl.unet(x, 500, context, y=y).square().mean()
            loss.backward()
        finally:
            tiny_sdxl.unet.gradient_checkpointing = False
        results.append((loss.detach(), context.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-8)


# --- sizes ---------------------------------------------------------------------------------------------------


def test_size_multiple_per_model():
    assert preset("sdxl").size_multiple == 32  # VAE 8 × 2**(3 levels - 1)
    assert preset("sd15").size_multiple == preset("sd21").size_multiple == 8  # their UNet takes any latent size
    assert preset("tiny").size_multiple == 4 and tiny_sdxl_config().size_multiple == 32
    preset("sdxl").check_image_size(height=832, width=1216)  # non-square SDXL sizes are fine


@pytest.mark.parametrize(
    "height, width, says",
    [
        (1000, 1024, "height=1000 is not a positive multiple of 32 for model 'sdxl'"),
        (
            1024,
            1016,
            "width=1016 is not a positive multiple of 32 for model 'sdxl' (the VAE's downsampling factor 8 × "
            "the UNet's latent multiple 4); try 1024",
        ),
        (0, 1024, "height=0 is not a positive multiple of 32"),
    ],
)
def test_sizes_sdxl_cannot_take_are_named(height, width, says):
    with pytest.raises(UserError) as error:
        preset("sdxl").check_image_size(height=height, width=width)
    assert says in str(error.value)


def test_unet_refuses_a_latent_it_cannot_take(tiny_sdxl):
    text = tiny_sdxl.encode_text(["a cat"])
    y = tiny_sdxl.added_conditioning(text.pooled, height=80, width=64)
    with pytest.raises(UserError, match="latent size 10×8 is not a multiple of 4"):
        tiny_sdxl.unet(torch.zeros(1, 4, 10, 8), 500, text.context, y=y)


# --- weights dtype and the VAE's precision -------------------------------------------------------------------


def rounded_copy(model: StableDiffusion, dtype: torch.dtype) -> StableDiffusion:
    """An fp32 model whose weights were rounded to `dtype`."""
    copy = StableDiffusion(model.config)
    copy.load_state_dict({k: v.to(dtype).float() for k, v in model.state_dict().items()})
    return copy.eval().requires_grad_(False)


def sdxl_outputs(model: StableDiffusion) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    x, image = torch.randn(2, 4, 8, 8, generator=generator), torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    with torch.no_grad():
        text = model.encode_text(["a cat", "a dog"])
        y = model.added_conditioning(text.pooled, height=64, width=64)
        return {
            "context": text.context,
            "pooled": text.pooled,
            "eps": model.unet(x, 981, text.context, y=y),
            "decoded": model.decode_latents(x),
            "encoded": model.encode_images(image),
        }


@pytest.mark.parametrize("weights_dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_weights_fp32_compute_equal_rounded_fp32_model(tiny_sdxl, tiny_sdxl_file, weights_dtype, torch_dtype):
    """`weights_dtype=bf16 dtype=fp32` computes exactly what an fp32 model with bf16-rounded weights computes."""
    stored = load_checkpoint(tiny_sdxl_file, weights_dtype=weights_dtype, dtype="fp32")
    assert {p.dtype for p in stored.parameters()} == {torch_dtype} and stored.dtype == torch.float32
    expected = sdxl_outputs(rounded_copy(tiny_sdxl, torch_dtype))
    for what, actual in sdxl_outputs(stored).items():
        assert actual.dtype == torch.float32 and torch.equal(actual, expected[what]), what


def test_fp16_file_keeps_fp16_weights(tiny_sdxl, tmp_path):
    """An fp16 file (as SDXL ships) loads into fp16 storage untouched, and computes in fp32 like the rounded model."""
    path = save_checkpoint(tiny_sdxl, tmp_path / "fp16.safetensors", dtype="fp16")
    stored = load_checkpoint(path, weights_dtype="fp16", dtype="fp32")
    rounded = rounded_copy(tiny_sdxl, torch.float16)
    assert all(torch.equal(v.float(), rounded.state_dict()[k]) for k, v in stored.state_dict().items())
    expected = sdxl_outputs(rounded)
    for what, actual in sdxl_outputs(stored).items():
        assert torch.equal(actual, expected[what]), what


def test_half_weights_fp32_compute_gives_the_same_image_on_the_tiny_model(random_model, tmp_path):
    """Every layer type of the SD-style tiny model (hybrid attention, open_clip MHA) through the whole pipeline."""
    from p2p.pipeline import SamplerSettings, generate

    tiny = random_model(lambda: StableDiffusion(preset("tiny")), seed=4)
    path = save_checkpoint(tiny, tmp_path / "tiny.safetensors")
    stored = load_checkpoint(path, weights_dtype="bf16", dtype="fp32")
    settings = SamplerSettings(steps=3, guidance=5.0)
    images = [
        generate(m, ["a red circle"], seed=0, settings=settings, progress=False)
        for m in (stored, rounded_copy(tiny, torch.bfloat16))
    ]
    assert (images[0] == images[1]).all()


def test_vae_decodes_in_fp32_and_never_returns_nan_silently(tiny_sdxl, tiny_sdxl_file):
    """SDXL's VAE overflows in fp16. Latents this large overflow any fp16 decode (values > 65504 after ÷ 0.13025)."""
    latents = torch.full((1, 4, 4, 4), 1.0e4)
    half = load_checkpoint(tiny_sdxl_file, dtype="fp16")
    assert half.config.vae_decode_fp32
    with torch.no_grad():
        decoded = half.decode_latents(latents)  # default: decoded in fp32
        assert decoded.dtype == torch.float32 and torch.isfinite(decoded).all()
        half.config.vae_decode_fp32 = False
        with pytest.raises(
            UserError,
            match=r"the VAE's decoded images: \d+ of 3072 values are NaN/inf \(computed in "
            r"torch.float16\); half precision overflowed",
        ):
            half.decode_latents(latents)
        with pytest.raises(UserError, match="the latents to decode: 1 of 64 values are NaN/inf"):
            tiny_sdxl.decode_latents(
                torch.zeros(1, 4, 4, 4).index_put_((torch.tensor([0]),) * 4, torch.tensor(float("nan")))
            )


def test_half_precision_compute_on_a_slow_cpu_warns(tiny_sdxl_file, monkeypatch, caplog):
    monkeypatch.setattr(loader, "_cpu_has_native_half", lambda: False)
    with caplog.at_level(logging.WARNING, logger=loader.__name__):
        load_checkpoint(tiny_sdxl_file, dtype="bf16")
    assert "weights_dtype=bf16 dtype=fp32" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=loader.__name__):
        load_checkpoint(tiny_sdxl_file, weights_dtype="bf16", dtype="fp32")
    assert not caplog.text


def test_safetensors_whose_first_byte_looks_like_a_pickle_loads(tiny_sdxl_file, tmp_path):
    """The header length's lowest byte is 0x80 (a pickle's first byte) for 1 file in 256, real SDXL files too."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(tiny_sdxl_file), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(str(tiny_sdxl_file))
    for padding in range(0, 256, 8):  # headers are padded to 8 bytes: 32 lengths cover every lowest byte
        path = tmp_path / f"padded-{padding}.safetensors"
        save_file(state, str(path), metadata={**metadata, "padding": "x" * padding})
        with open(path, "rb") as file:
            if file.read(1) == b"\x80":
                break
    else:
        pytest.fail("no metadata padding gave a header length ending in 0x80")
    assert load_checkpoint(path).config.name == "tiny-sdxl"  # read as safetensors, not refused as a pickle


def test_checkpoint_error_is_a_user_error():
    assert issubclass(CheckpointError, UserError) and issubclass(CheckpointError, ValueError)
