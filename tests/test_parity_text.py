"""Our text encoder equals the references SD itself used (random weights, full SD 1.x / 2.x shapes, CPU).

- SD 1.x: `FrozenCLIPEmbedder` = Hugging Face `CLIPTextModel` (OpenAI ViT-L/14), `last_hidden_state`,
  tokens padded to 77 with the end token. Our weights reach it under the checkpoint's own HF names
  (`models.loader.original_state_dict`).
- SD 2.x: `FrozenOpenCLIPEmbedder(layer="penultimate")` = open_clip ViT-H/14, the output of resblock 23 of 24,
  then `ln_final`; tokens from `open_clip.tokenize`, padded with 0.
The tokenizers are compared too, so the whole prompt → features path is covered.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer, default_bpe
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from models.loader import original_state_dict
from models.stable_diffusion import StableDiffusion, preset
from models.text import END_TOKEN, HF_PREFIX, OC_PREFIX, START_TOKEN

TOLERANCE = 1e-4
PROMPTS = [
    "a cat riding a bicycle",
    "A photo of a Squirrel, eating a burger!!",
    "",
    "two  spaces, café and 3.14 ... the end",
]
# open_clip un-escapes HTML (`&amp;`) and Hugging Face does not: avoid entities in prompts compared across both.

# text_encoder/config.json of runwayml/stable-diffusion-v1-5 (OpenAI CLIP ViT-L/14's text tower)
SD1_CLIP_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
    bos_token_id=START_TOKEN,
    eos_token_id=END_TOKEN,
    pad_token_id=1,
)


def clip_tokenizer_files(directory: Path) -> Path:
    """Write CLIP's BPE as Hugging Face `vocab.json` + `merges.txt`, from the copy bundled with open_clip.

    There is no network here; the vocabulary is the same 49408 entries, only the special tokens are spelt
    `<|startoftext|>` / `<|endoftext|>` by Hugging Face.
    """
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renamed.get(token, token): index for token, index in SimpleTokenizer().encoder.items()}
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # the merges open_clip's SimpleTokenizer uses
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory


def hf_clip_tokenizer(directory: Path, *, pad_token: str) -> CLIPTokenizer:
    """SD 1.x's tokenizer pads with `<|endoftext|>`; SD 2.x's diffusers tokenizer pads with `!` (id 0)."""
    return CLIPTokenizer.from_pretrained(str(directory), pad_token=pad_token, model_max_length=77)


def hf_clip_text_model_from_ours(model: StableDiffusion, **config) -> CLIPTextModel:
    """A transformers `CLIPTextModel` holding our text weights, loaded strictly under their checkpoint names."""
    reference = CLIPTextModel(CLIPTextConfig(**{**SD1_CLIP_TEXT_CONFIG, **config})).eval()
    # transformers ≥ 5 dropped the `text_model.` level that SD 1.x checkpoints still carry
    prefix = HF_PREFIX if not hasattr(reference, "text_model") else HF_PREFIX[: -len("text_model.")]
    state = {k[len(prefix) :]: v for k, v in original_state_dict(model).items() if k.startswith(prefix)}
    reference.load_state_dict(state, strict=True)
    return reference


def text_only_model(name: str, random_model) -> StableDiffusion:
    """A StableDiffusion whose text encoder has seeded random weights; UNet and VAE stay on the meta device."""
    with torch.device("meta"):
        model = StableDiffusion(preset(name))
    model.cond_stage_model = random_model(lambda: type(model.cond_stage_model)(model.config.text), seed=3)
    return model


@pytest.mark.parametrize("name, pad", [("sd14", END_TOKEN), ("sd15", END_TOKEN), ("sd21-base", 0), ("sd21", 0)])
def test_padding_rules(name, pad):
    """P2P_SPEC §8: SD 1.x pads with the end token 49407, SD 2.x with 0."""
    with torch.device("meta"):
        text_encoder = StableDiffusion(preset(name)).cond_stage_model
    ids = text_encoder.tokenize(["a cat"])[0].tolist()
    assert ids[:4] == [START_TOKEN, 320, 2368, END_TOKEN]  # "a" = 320, "cat" = 2368 in CLIP's BPE
    assert ids[4:] == [pad] * 73


def test_tokenizers_match_sd_references(tmp_path):
    files = clip_tokenizer_files(tmp_path)
    with torch.device("meta"):
        sd1, sd2 = StableDiffusion(preset("sd15")), StableDiffusion(preset("sd21"))
    hf_sd1 = hf_clip_tokenizer(files, pad_token="<|endoftext|>")
    expected = hf_sd1(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(sd1.cond_stage_model.tokenize(PROMPTS), expected)
    # SD 2.x's reference is open_clip's tokenizer. (diffusers' SD 2 tokenizer pads with the special token "!",
    # which also swallows a literal "!" in a prompt; open_clip does not.)
    assert torch.equal(sd2.cond_stage_model.tokenize(PROMPTS), open_clip.tokenize(PROMPTS))


@pytest.mark.slow
def test_sd1_text_matches_transformers_clip(random_model):
    model = text_only_model("sd15", random_model)
    reference = hf_clip_text_model_from_ours(model)
    ids = model.cond_stage_model.tokenize(PROMPTS)
    with torch.no_grad():
        expected = reference(ids).last_hidden_state
        actual = model.cond_stage_model(ids)
    diff = (actual - expected).abs().max().item()
    print(f"SD1 text: max abs diff {diff:.2e} (std {expected.std():.2f})")
    assert diff <= TOLERANCE, f"SD 1.x text features differ by {diff:.2e}"


def open_clip_penultimate(clip, token_ids: torch.Tensor) -> torch.Tensor:
    """SD 2.x's `FrozenOpenCLIPEmbedder.encode_with_transformer` with `layer="penultimate"` (layer_idx 1)."""
    x = clip.token_embedding(token_ids) + clip.positional_embedding
    if not clip.transformer.batch_first:  # open_clip < 2.23 ran the transformer sequence-first
        x = x.permute(1, 0, 2)
    resblocks = clip.transformer.resblocks
    for i, block in enumerate(resblocks):
        if i == len(resblocks) - 1:
            break
        x = block(x, attn_mask=clip.attn_mask)
    if not clip.transformer.batch_first:
        x = x.permute(1, 0, 2)
    return clip.ln_final(x)


@pytest.mark.slow
def test_sd2_text_matches_open_clip_penultimate(random_model):
    model = text_only_model("sd21", random_model)
    # ViT-H/14 built on the meta device (its 630 M vision tower is never used); our weights are assigned into
    # its text tower. The 24th resblock stays on meta: if the reference ran it, the forward would fail.
    with torch.device("meta"):
        clip = open_clip.create_model("ViT-H-14", pretrained=None, device="meta")
    state = {k[len(OC_PREFIX) :]: v for k, v in original_state_dict(model).items() if k.startswith(OC_PREFIX)}
    missing, unexpected = clip.load_state_dict(state, strict=False, assign=True)
    assert not unexpected, unexpected
    not_loaded = {k for k in missing if not k.startswith("visual.")}
    assert not_loaded == {k for k in clip.state_dict() if k.startswith("transformer.resblocks.23.")} | {
        "text_projection",
        "logit_scale",
    }, sorted(not_loaded)
    # the causal mask is a non-persistent buffer, so it was created on meta too; rebuild it as open_clip does
    clip.attn_mask = torch.empty(77, 77).fill_(float("-inf")).triu_(1)
    ids = open_clip.tokenize(PROMPTS)
    with torch.no_grad():
        expected = open_clip_penultimate(clip, ids)
        actual = model.cond_stage_model(ids)
    diff = (actual - expected).abs().max().item()
    print(f"SD2 text: max abs diff {diff:.2e} (std {expected.std():.2f})")
    assert diff <= TOLERANCE, f"SD 2.x text features differ by {diff:.2e}"
