"""Loading SD3 / SD3.5 / FLUX.1 files into `FlowModel`: the real key lists for every preset, strict loading of
original-layout files (bundled or separate text encoders, declared extras, the T5 alias), refusals naming both the
file and the model, the CPU memory refusal for FLUX, text encoders released before the transformer is read, the
word positions of every encoder, and the controller protocol of the flow loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_flow_pipeline import T5_LENGTH, random_flow_model, tiny_flux_config, tiny_sd3_config
from test_mmdit_sd3 import read_keys
from test_mmdit_t5 import spiece_model  # noqa: F401 (fixture)

from models import flow_loader
from models.errors import UserError
from models.flow_loader import (
    FILE_PREFIXES,
    T5_ALIAS,
    CheckpointError,
    load_flow_model,
    original_state_dict,
    save_flow_checkpoint,
)
from models.flow_model import CLIP_LENGTH, FLOW_PRESETS, FlowModel, flow_preset
from models.t5 import ALIAS_OF_SHARED
from p2p.flow import FlowSamplerSettings, conditioning, initial_noise, sample

KEYS = Path(__file__).parent / "data" / "sd-keys"
SD3_KEY_FILES = {
    "sd3-medium": "keys_sd3_medium.txt",
    "sd35-medium": "keys_sd35_medium.txt",
    "sd35-large": "keys_sd35_large.txt",
}


def preset_keys(name: str) -> dict[str, list[int]]:
    """The released files' tensors in the SD3 bundle layout: SD3 single file + bundled encoders, or FLUX's files
    under the prefixes the loader reads them into."""
    text = read_keys(KEYS / "keys_sd3_text_encoders.txt")
    if name in SD3_KEY_FILES:
        return read_keys(KEYS / SD3_KEY_FILES[name]) | text
    transformer = read_keys(KEYS / f"keys_{name.replace('-', '_')}.txt")
    return (
        {"model.diffusion_model." + k: v for k, v in transformer.items()}
        | {"first_stage_model." + k: v for k, v in read_keys(KEYS / "keys_flux_ae.txt").items()}
        | {k: v for k, v in text.items() if not k.startswith("text_encoders.clip_g.")}
    )


@pytest.mark.parametrize("name", sorted(FLOW_PRESETS))
def test_state_dict_equals_the_released_key_lists(name):
    with torch.device("meta"):
        model = FlowModel(flow_preset(name))
    assert {k: list(v.shape) for k, v in original_state_dict(model).items()} == preset_keys(name)


@pytest.fixture(scope="module")
def tiny_sd3(randomize):
    return random_flow_model(tiny_sd3_config(), randomize, seed=31)


def states_equal(loaded: FlowModel, reference: FlowModel) -> None:
    expected = original_state_dict(reference)
    actual = original_state_dict(loaded)
    assert set(actual) == set(expected)
    assert all(torch.equal(actual[k], expected[k]) for k in expected)


def test_bundled_file_loads_strictly(tiny_sd3, spiece_model, tmp_path):  # noqa: F811
    path = save_flow_checkpoint(tiny_sd3, tmp_path / "bundle.safetensors")
    model = load_flow_model(tiny_sd3.config, checkpoint=path, t5_tokenizer=spiece_model, release_text_encoders=False)
    states_equal(model, tiny_sd3)


def write_parts(model: FlowModel, path: Path, parts, *, extra=None, prefix_free=False) -> Path:
    state = {
        k: v.contiguous()
        for k, v in original_state_dict(model).items()
        if any(k.startswith(flow_loader.PARTS[p]) for p in parts)
    }
    if prefix_free:  # a standalone encoder file: its own names, no bundle prefix
        (part,) = parts
        state = {k[len(FILE_PREFIXES[part]) :]: v for k, v in state.items()}
    save_file(state | (extra or {}), str(path))
    return path


def test_separate_text_encoder_files_with_extras_and_the_t5_alias(tiny_sd3, spiece_model, tmp_path):  # noqa: F811
    extras = {"model.model_sampling.sigmas": torch.rand(1000), "text_encoders.clip_l.logit_scale": torch.tensor(4.6)}
    checkpoint = write_parts(tiny_sd3, tmp_path / "sd3.safetensors", ["transformer", "vae"], extra=extras)
    clip_l = write_parts(
        tiny_sd3,
        tmp_path / "clip_l.safetensors",
        ["clip_l"],
        prefix_free=True,
        extra={"text_model.embeddings.position_ids": torch.arange(77)[None]},
    )
    clip_g = write_parts(tiny_sd3, tmp_path / "clip_g.safetensors", ["clip_g"], prefix_free=True)
    t5 = {
        k[len(FILE_PREFIXES["t5xxl"]) :]: v.contiguous()
        for k, v in original_state_dict(tiny_sd3).items()
        if k.startswith(FILE_PREFIXES["t5xxl"])
    }
    t5[T5_ALIAS[len(FILE_PREFIXES["t5xxl"]) :]] = t5.pop("shared.weight")  # only the alias, as the reference saves it
    save_file(t5, str(tmp_path / "t5.safetensors"))
    model = load_flow_model(
        tiny_sd3.config,
        checkpoint=checkpoint,
        t5_tokenizer=spiece_model,
        text_encoders=dict(clip_l=clip_l, clip_g=clip_g, t5xxl=tmp_path / "t5.safetensors"),
        release_text_encoders=False,
    )
    states_equal(model, tiny_sd3)


def test_a_missing_text_encoder_is_named(tiny_sd3, spiece_model, tmp_path):  # noqa: F811
    checkpoint = write_parts(tiny_sd3, tmp_path / "sd3.safetensors", ["transformer", "vae", "clip_l", "clip_g"])
    with pytest.raises(UserError, match=r"t5xxl.*model.text_encoders.t5xxl=.*model.t5=false"):
        load_flow_model(tiny_sd3.config, checkpoint=checkpoint, t5_tokenizer=spiece_model)
    # without T5: nothing more is needed, and its positions are zeros (diffusers without text_encoder_3)
    model = load_flow_model(tiny_sd3.config.with_settings(t5=False), checkpoint=checkpoint)
    text = model.encode_text(["a cat"])
    assert text.context.shape == (1, CLIP_LENGTH + T5_LENGTH, 128)
    assert not text.context[:, CLIP_LENGTH:].any() and text.context[:, :CLIP_LENGTH].any()


def test_an_unknown_tensor_is_refused_by_name(tiny_sd3, spiece_model, tmp_path):  # noqa: F811
    path = write_parts(
        tiny_sd3,
        tmp_path / "sd3.safetensors",
        list(flow_loader.PARTS),
        extra={"model.diffusion_model.lora_up.weight": torch.zeros(2)},
    )
    with pytest.raises(CheckpointError, match="lora_up"):
        load_flow_model(tiny_sd3.config, checkpoint=path, t5_tokenizer=spiece_model)


def test_files_of_the_other_family_or_size_are_refused_naming_both(tiny_sd3, randomize, spiece_model, tmp_path):  # noqa: F811
    sd3 = write_parts(tiny_sd3, tmp_path / "sd3.safetensors", list(flow_loader.PARTS))
    with pytest.raises(CheckpointError, match=r"SD3-medium.*model=tiny-flux"):
        load_flow_model(tiny_flux_config(), checkpoint=sd3, vae=sd3)
    flux = random_flow_model(tiny_flux_config(), randomize, seed=1)
    transformer = tmp_path / "flux.safetensors"
    save_file(
        {
            k[len("model.diffusion_model.") :]: v.contiguous()
            for k, v in original_state_dict(flux).items()
            if k.startswith("model.diffusion_model.")
        },
        str(transformer),
    )
    with pytest.raises(CheckpointError, match=r"FLUX.1-dev transformer \(model=flux-dev\).*model=tiny-sd3"):
        load_flow_model(tiny_sd3.config, checkpoint=transformer, t5_tokenizer=spiece_model)
    # same family, other size: the header's shapes are refused before any tensor is read, naming both
    with pytest.raises(
        CheckpointError, match=r"(?s)does not match model config 'sd35-large'.*looks like an SD3-medium"
    ):
        load_flow_model(flow_preset("sd35-large"), checkpoint=sd3, t5_tokenizer=spiece_model, weights_dtype="bf16")


def test_flux_on_a_small_cpu_machine_is_refused_in_one_line_before_any_file(monkeypatch, tmp_path):
    monkeypatch.setattr(flow_loader, "machine_memory_bytes", lambda: 24 * 2**30)
    with pytest.raises(UserError, match=r"does not fit this machine.*GPU") as error:
        load_flow_model(
            flow_preset("flux-dev"), checkpoint=tmp_path / "absent.safetensors", weights_dtype="bf16", device="cpu"
        )
    assert "\n" not in str(error.value)
    # SD3-medium in bf16 with the text encoders released first fits the same machine (then the file is missing)
    with pytest.raises(UserError, match="does not exist"):
        load_flow_model(flow_preset("sd3-medium"), checkpoint=tmp_path / "absent.safetensors", weights_dtype="bf16")


def test_text_encoders_run_first_and_are_released_before_the_transformer(tiny_sd3, spiece_model, tmp_path):  # noqa: F811
    path = save_flow_checkpoint(tiny_sd3, tmp_path / "bundle.safetensors")
    model = load_flow_model(tiny_sd3.config, checkpoint=path, t5_tokenizer=spiece_model, release_text_encoders=True)
    assert model.loaded_parts == {"clip_l", "clip_g", "t5xxl"}
    cond, uncond = conditioning(model, ["a cat"], negative_prompt="", guidance=5.0)
    assert model.text_encoders is None and uncond is not None
    latent = initial_noise(model, 0, height=64, width=64)
    sample(
        model, cond, uncond=uncond, latent=latent, settings=FlowSamplerSettings(steps=1, guidance=5.0), progress=False
    )
    assert model.loaded_parts == {"transformer"}


def test_word_positions_of_every_encoder(tiny_sd3, spiece_model, tmp_path):  # noqa: F811
    path = save_flow_checkpoint(tiny_sd3, tmp_path / "bundle.safetensors")
    model = load_flow_model(tiny_sd3.config, checkpoint=path, t5_tokenizer=spiece_model)
    words = model.word_positions("a photograph of a cat, sitting")
    assert [w.text for w in words["clip"]] == [w.text for w in words["t5"]] == "a photograph of a cat, sitting".split()
    assert words["clip"][0].positions == (1,)  # after CLIP's start token
    cat = words["clip"][4]
    assert len(cat.positions) == 2 and cat.word_positions == cat.positions[:1]  # 'cat' ',' → own token 'cat'
    assert min(words["t5"][0].positions) == CLIP_LENGTH  # T5 columns follow SD3's 77 CLIP columns
    assert model.text_segments() == (("clip", 0, CLIP_LENGTH), ("t5", CLIP_LENGTH, CLIP_LENGTH + T5_LENGTH))


class CountingController:
    def __init__(self):
        self.steps, self.sites = [], set()

    def begin_step(self, step):
        self.steps.append(step)

    def wants(self, site):
        self.sites.add((site.name, site.num_text_keys))
        return site.kind == "joint"

    def __call__(self, probs, site):
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
        return probs


def test_flow_loop_tells_the_controller_its_step_and_reaches_every_site(randomize, spiece_model):  # noqa: F811
    model = random_flow_model(tiny_flux_config(), randomize, seed=3)
    from models.t5 import T5Tokenizer

    model.t5_tokenizer = T5Tokenizer(spiece_model)
    cond, uncond = conditioning(model, ["a cat", "a dog"], negative_prompt="", guidance=3.5)
    assert uncond is None  # FLUX-dev: guidance embedded, no unconditional batch
    with pytest.raises(UserError, match="no negative prompt"):
        conditioning(model, ["a cat"], negative_prompt="blurry", guidance=3.5)
    controller = CountingController()
    sample(
        model,
        cond,
        latent=initial_noise(model, 0, height=64, width=64),
        controller=controller,
        settings=FlowSamplerSettings(steps=2, guidance=3.5),
        progress=False,
    )
    assert controller.steps == [0, 1]
    assert {name for name, _ in controller.sites} == {
        f"{kind}.{i}" for kind in ("double_blocks", "single_blocks") for i in range(2)
    }
    assert {n for _, n in controller.sites} == {T5_LENGTH}  # text length from the shapes


@pytest.mark.parametrize("name, expected", [("sd3-medium", "model=sd3-medium"), ("flux-dev", "model=flux-dev")])
def test_the_sd_loader_names_flow_files(name, expected):
    """A released SD3 or FLUX file passed as an SD 1.x/2.x/XL checkpoint is named, with the preset to use."""
    from models.loader import detect_config

    shapes = {k: tuple(v) for k, v in preset_keys(name).items()}
    if name.startswith("flux"):  # BFL's file alone: no prefix
        shapes = {
            k.removeprefix("model.diffusion_model."): v
            for k, v in shapes.items()
            if k.startswith("model.diffusion_model.")
        }
    with pytest.raises(CheckpointError, match=expected):
        detect_config(shapes, path="file.safetensors")


def compose_generate(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return compose(config_name="generate", overrides=list(overrides))


@pytest.mark.parametrize("name", sorted(FLOW_PRESETS))
def test_presets_compose_with_the_reference_defaults(name):
    from scripts._common import model_config

    config = model_config(compose_generate(f"model={name}"))
    reference = flow_preset(name)
    assert config == reference and config.image_size == 1024
    assert (config.steps, config.guidance, config.t5_length) == {
        "sd3-medium": (28, 7.0, 256),
        "sd35-medium": (40, 4.5, 256),
        "sd35-large": (28, 3.5, 256),
        "flux-dev": (28, 3.5, 512),
        "flux-schnell": (4, 0.0, 256),
    }[name]
    assert model_config(compose_generate(f"model={name}", "model.t5_length=77")).t5_length == 77


def test_generate_refuses_a_missing_checkpoint_and_a_bad_size_before_loading():
    from scripts._common import load_model
    from scripts.generate import check_request

    with pytest.raises(UserError, match="model=flux-dev needs its weights"):
        load_model(compose_generate("model=flux-dev"), flow=True)
    with pytest.raises(UserError, match="runs in generate.py, edit.py, figure.py, ablate.py and eval_joint.py only"):
        load_model(compose_generate("model=sd3-medium", "model.checkpoint=x.safetensors"))
    cfg = compose_generate("model=sd3-medium", "height=1000")
    from scripts._common import model_config

    with pytest.raises(UserError, match="height=1000 is not a positive multiple of 16"):
        check_request(cfg, model_config(cfg))


def test_half_precision_weights_computed_in_fp32(tiny_sd3, spiece_model, tmp_path):  # noqa: F811
    """`weights_dtype=bf16 dtype=fp32` (the CPU setting): parameters held in bf16, every layer computing in fp32,
    and an image close to the fp32 one (bf16 rounding of the weights only)."""
    from p2p.flow import generate

    path = save_flow_checkpoint(tiny_sd3, tmp_path / "bundle.safetensors")
    images = {}
    for weights_dtype in ("fp32", "bf16"):
        model = load_flow_model(
            tiny_sd3.config, checkpoint=path, t5_tokenizer=spiece_model, weights_dtype=weights_dtype, dtype="fp32"
        )
        images[weights_dtype] = generate(model, ["a cat"], seed=0, height=64, width=64, progress=False).astype(int)
        assert model.dtype == torch.float32
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16 if weights_dtype == "bf16" else torch.float32}
    assert abs(images["fp32"] - images["bf16"]).max() <= 16


def released_headers(name: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """File name → header (name → shape) of the released files of a preset, from the shared key lists, every
    optional tensor of the *_extras lists included (position_ids are int64, as in the files that carry them)."""

    def keys(file, prefix="", strip=""):
        return {k[len(strip) :]: tuple(v) for k, v in read_keys(KEYS / file, prefix).items()}

    if name in SD3_KEY_FILES:
        extras = SD3_KEY_FILES[name].replace(".txt", "_extras.txt")
        return {
            "bundle.safetensors": keys(SD3_KEY_FILES[name])
            | keys(extras)
            | keys("keys_sd3_text_encoders.txt")
            | keys("keys_sd3_text_encoders_extras.txt")
        }
    clip_l = "text_encoders.clip_l.transformer."
    return {
        "flux.safetensors": keys(f"keys_{name.replace('-', '_')}.txt"),
        "ae.safetensors": keys("keys_flux_ae.txt"),
        "clip_l.safetensors": keys("keys_sd3_text_encoders.txt", clip_l, clip_l)
        | keys("keys_sd3_text_encoders_extras.txt", clip_l, clip_l),
        "t5.safetensors": {ALIAS_OF_SHARED: (32128, 4096)}
        | {  # the alias only, as the reference saves T5
            k: v for k, v in keys("keys_t5xxl_encoder.txt").items() if k != "shared.weight"
        },
    }


@pytest.mark.parametrize("name", sorted(FLOW_PRESETS))
def test_the_released_files_headers_pass_the_strict_check(name, monkeypatch, spiece_model, tmp_path):  # noqa: F811
    """Every preset's real files, as their key lists describe them, are accepted and fully accounted for: each
    model tensor is read from exactly one file, the declared extras are dropped (no tensor is read here)."""
    headers = released_headers(name)
    monkeypatch.setattr(
        flow_loader.FlowFiles,
        "_read_header",
        lambda self, path: (headers[path.name], [k for k in headers[path.name] if "position_ids" in k]),
    )
    monkeypatch.setattr(flow_loader, "machine_memory_bytes", lambda: 2**40)
    files = {n: tmp_path / n for n in headers}
    extra = (
        {}
        if name in SD3_KEY_FILES
        else dict(
            vae=files["ae.safetensors"],
            text_encoders=dict(clip_l=files["clip_l.safetensors"], t5xxl=files["t5.safetensors"]),
        )
    )
    checked = flow_loader.FlowFiles(
        flow_preset(name), checkpoint=next(iter(files.values())), t5_tokenizer=spiece_model, **extra
    )
    read = {k for source in checked.sources.values() for k in source.file_keys}
    assert read == set(checked.expected)
