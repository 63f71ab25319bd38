"""`model.checkpoint=` takes a diffusers model folder, or a repo id from the local Hugging Face cache (issue 26).

Folders are written by diffusers itself (`save_pretrained`: fp32, `variant="fp16"`, sharded) from pipelines holding
random weights in toy SD 1.x, SD 2.x and SDXL shapes (`tests/diffusers_folders.py`). Each loads into exactly the
weights of the equivalent single-file checkpoint, `scripts/generate.py` makes the same pixels from either, and
those match diffusers' own pipeline with DDIMScheduler within 2/255. The real shapes (SD 1.5, 2.1, SDXL folders) are left for a machine run that fits: see issue 26.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys

import numpy as np
import pytest
import torch
from diffusers_folders import pipeline_from_ours, pipeline_image, tiny_sd1_config, tiny_sd2_config
from PIL import Image
from test_generate_script import REPO, compose_generate, run_script
from test_parity_text import clip_tokenizer_files, hf_clip_tokenizer

from models.diffusers_config import architecture, check_tokenizers
from models.diffusers_folder import load_diffusers_folder, weight_files
from models.diffusers_format import LOGIT_SCALE
from models.errors import MissingFileError, UserError
from models.hub import resolve_checkpoint
from models.loader import load_checkpoint, original_state_dict, save_checkpoint
from models.stable_diffusion import StableDiffusion, tiny_sdxl_config
from p2p.pipeline import SamplerSettings, generate

MAX_PIXEL_DIFF = 2  # out of 255
PROMPT, SEED, STEPS, HEIGHT, WIDTH = "a cat riding a bicycle", 0, 3, 64, 96
CONFIGS = {"sd1": tiny_sd1_config, "sd2": tiny_sd2_config, "sdxl": tiny_sdxl_config}
SHARD_SIZE = "500KB"  # splits the toy UNets into dozens of shards


def random_sd(config, random_model, *, seed: int) -> StableDiffusion:
    model = random_model(lambda: StableDiffusion(config), seed=seed)
    if config.text_2 is not None:  # diffusers drops bigG's unused temperature; the loader fills CLIP's initial one
        model.conditioner.embedders[1].model.logit_scale.fill_(LOGIT_SCALE)
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def written(request, random_model, tmp_path_factory):
    """One model as a single file and as diffusers folders: fp32, fp16 variant, sharded; and the pipeline's image."""
    root = tmp_path_factory.mktemp(request.param)
    model = random_sd(CONFIGS[request.param](), random_model, seed=5)
    pipe = pipeline_from_ours(model, root)
    image = pipeline_image(pipe, PROMPT, seed=SEED, steps=STEPS, guidance=5.0, height=HEIGHT, width=WIDTH)
    pipe.save_pretrained(root / "fp32")
    pipe.save_pretrained(root / "fp16", variant="fp16")
    pipe.save_pretrained(root / "sharded", max_shard_size=SHARD_SIZE)
    return dict(name=request.param, root=root, image=image, file=save_checkpoint(model, root / "model.safetensors"))


def assert_same_weights(actual: StableDiffusion, expected: StableDiffusion) -> None:
    a, e = original_state_dict(actual), original_state_dict(expected)
    assert sorted(a) == sorted(e)
    different = [k for k in e if a[k].dtype != e[k].dtype or not torch.equal(a[k], e[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_folders_load_the_weights_of_the_single_file(written):
    single = load_checkpoint(written["file"])
    for variant in ("fp32", "sharded"):
        folder = written["root"] / variant
        loaded = load_diffusers_folder(folder)
        assert loaded.config.name == "diffusers" and architecture(loaded.config) == architecture(single.config)
        assert_same_weights(loaded, single)
    assert (written["root"] / "sharded" / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    # the fp16 variant holds the same values rounded to fp16, as fp16 storage of the single file does
    assert_same_weights(
        load_diffusers_folder(written["root"] / "fp16", weights_dtype="fp16"),
        load_checkpoint(written["file"], weights_dtype="fp16"),
    )


def test_variant_choice(written, tmp_path):
    """Both files present: fp16 storage reads the fp16 file, any other dtype the full-precision one."""
    unet = tmp_path / "unet"
    shutil.copytree(written["root"] / "fp32" / "unet", unet)
    shutil.copy(written["root"] / "fp16" / "unet" / "diffusion_pytorch_model.fp16.safetensors", unet)
    assert weight_files(unet, prefer_fp16=True)[0].name == "diffusion_pytorch_model.fp16.safetensors"
    assert weight_files(unet, prefer_fp16=False)[0].name == "diffusion_pytorch_model.safetensors"


def script_image(checkpoint, run) -> np.ndarray:
    result = run_script(
        "model=tiny",
        f"model.checkpoint={checkpoint}",
        f'prompts=["{PROMPT}"]',
        f"seed={SEED}",
        f"steps={STEPS}",
        "guidance=5",
        f"height={HEIGHT}",
        f"width={WIDTH}",
        "progress=false",
        f"hydra.run.dir={run}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return np.asarray(Image.open(next(run.glob("00_*.png"))))


def test_generate_script_folder_equals_single_file_and_diffusers(written, tmp_path):
    """`model=tiny` takes the config from what it is given: the file's metadata, or the folder's configs. The script
    runs once (SDXL; its start-up is most of this test's time); test_generate_script proves it equals `generate`."""
    settings = SamplerSettings(steps=STEPS, guidance=5.0)
    single = load_checkpoint(written["file"])
    from_file = generate(single, [PROMPT], seed=SEED, height=HEIGHT, width=WIDTH, settings=settings, progress=False)[0]
    if written["name"] == "sdxl":
        from_folder = script_image(written["root"] / "fp32", tmp_path / "folder")
    else:
        model = load_diffusers_folder(written["root"] / "sharded")
        from_folder = generate(
            model, [PROMPT], seed=SEED, height=HEIGHT, width=WIDTH, settings=settings, progress=False
        )[0]
    assert np.array_equal(from_folder, from_file)
    expected = written["image"]
    diff = abs(from_folder.astype("float64") - expected * 255).max()
    print(f"tiny {written['name']}: folder vs diffusers' pipeline max pixel diff {diff:.3f}/255")
    assert expected.std() > 0.02, "degenerate reference image: the comparison would prove little"
    assert diff <= MAX_PIXEL_DIFF, f"{written['name']}: pixels differ by {diff:.2f}/255 from diffusers'"


def fake_cache(folder, cache, repo_id: str, *, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """huggingface_hub's layout: files as blobs named by content, snapshots/<commit>/… symlinks, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for index, path in enumerate(sorted(p for p in folder.rglob("*") if p.is_file())):
        blob = repo / "blobs" / f"{index:040x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, blob)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_repo_id_resolves_from_the_cache_offline(written, tmp_path, monkeypatch):
    if written["name"] != "sdxl":
        pytest.skip("one model is enough for the cache layout")
    snapshot = fake_cache(written["root"] / "sharded", tmp_path / "hub", "stabilityai/tiny-xl")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert resolve_checkpoint("stabilityai/tiny-xl") == snapshot
    sys.path.insert(0, str(REPO))
    from scripts._common import load_model

    model = load_model(compose_generate("model=tiny", "model.checkpoint=stabilityai/tiny-xl"))
    assert_same_weights(model, load_checkpoint(written["file"]))


def test_cache_folders_and_snapshots(tmp_path, monkeypatch):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    snapshots = tmp_path / "home" / "hub" / "models--org--name" / "snapshots"
    (snapshots / "aaa").mkdir(parents=True)
    assert resolve_checkpoint("org/name") == snapshots / "aaa"  # no refs/main: the only snapshot
    (snapshots / "bbb").mkdir()
    with pytest.raises(UserError, match="2 snapshots .* and no refs/main"):
        resolve_checkpoint("org/name")
    with pytest.raises(MissingFileError) as error:
        resolve_checkpoint("org/other")
    message = str(error.value)
    assert "'org/other'" in message and str(tmp_path / "home" / "hub") in message
    assert str(tmp_path / "user" / ".cache" / "huggingface" / "hub") in message and "\n" not in message
    with pytest.raises(MissingFileError, match="checkpoint 'weights/sd15.safetensors' does not exist"):
        resolve_checkpoint("weights/sd15.safetensors")  # a file path, not a repo id


def cli_error(*overrides: str) -> str:
    result = run_script(*overrides, 'prompts=["a cat"]', "steps=1", "progress=false")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


def test_cli_errors_are_one_line(written, tmp_path, monkeypatch):
    if written["name"] != "sd1":
        pytest.skip("one model is enough for the errors")
    empty_cache = f"hydra.run.dir={tmp_path / 'run'}"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-cache"))  # the script inherits it
    line = cli_error("model.checkpoint=nobody/uncached-model", empty_cache)
    assert "'nobody/uncached-model'" in line and str(tmp_path / "no-cache") in line

    pickled = tmp_path / "pickled"
    shutil.copytree(written["root"] / "fp32", pickled)
    (pickled / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"conv_in.weight": torch.zeros(1)}, pickled / "unet" / "diffusion_pytorch_model.bin")
    line = cli_error(f"model.checkpoint={pickled}", empty_cache)
    assert "diffusion_pytorch_model.bin" in line and "safe_serialization=True" in line and "never unpickled" in line

    line = cli_error("model=sdxl", f"model.checkpoint={written['root'] / 'fp32'}", empty_cache)
    assert "model=sdxl" in line and str(written["root"] / "fp32") in line


def test_tokenizer_files_are_compared(written, tmp_path, caplog):
    if written["name"] != "sd1":
        pytest.skip("one model is enough for the tokenizer check")
    folder = tmp_path / "folder"
    shutil.copytree(written["root"] / "fp32", folder)
    config = load_diffusers_folder(folder).config
    assert check_tokenizers(folder, config) == []  # transformers' tokenizer.json, as save_pretrained writes it
    shutil.rmtree(folder / "tokenizer")  # the Hub's layout: vocab.json + merges.txt + special tokens
    hf_clip_tokenizer(clip_tokenizer_files(tmp_path), pad_token="<|endoftext|>").save_pretrained(folder / "tokenizer")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tmp_path / name, folder / "tokenizer" / name)
    (folder / "tokenizer" / "tokenizer.json").unlink()
    assert check_tokenizers(folder, config) == []
    vocab_path = folder / "tokenizer" / "vocab.json"
    vocab = json.loads(vocab_path.read_text())
    vocab["cat</w>"], vocab["dog</w>"] = vocab["dog</w>"], vocab["cat</w>"]  # a different vocabulary
    vocab_path.write_text(json.dumps(vocab))
    with caplog.at_level(logging.WARNING):
        warnings = check_tokenizers(folder, config)
    assert len(warnings) == 1 and "life; (round)" in warnings[0] and str(vocab["dog</w>"]) in warnings[0]
    assert warnings[0] in caplog.text


def test_a_folder_without_model_index_points_at_its_single_file(tmp_path):
    (tmp_path / "v1-5-pruned-emaonly.safetensors").touch()
    with pytest.raises(UserError, match=r"no model_index.json; it holds v1-5-pruned-emaonly.safetensors\); to load"):
        load_diffusers_folder(tmp_path)


def test_a_pad_token_split_out_of_words_is_explained(written, caplog):
    """diffusers' SD 2.x / SDXL tokenizers pad with "!", a special token to transformers: "!!" becomes two pads
    there, one BPE token in open_clip (the tokenizer the models were trained with). The check says so."""
    if written["name"] != "sdxl":
        pytest.skip("SDXL's tokenizer_2 is the one padding with '!'")
    folder = written["root"] / "fp32"
    warnings = check_tokenizers(folder, load_diffusers_folder(folder).config)
    assert len(warnings) == 1 and "tokenizer_2 tokenizes 'A photo of a Squirrel, eating a BURGER!!'" in warnings[0]
    assert "pad token '!', id 0, is a special token there" in warnings[0]
