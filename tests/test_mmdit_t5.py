"""The T5 v1.1 encoder equals transformers' `T5EncoderModel` (weights through diffusers' SD3 T5 converter, strict),
and its SentencePiece tokenizer equals transformers' on a tiny SentencePiece model trained here, offline."""

from __future__ import annotations

import gc
import io
from pathlib import Path

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_sd3_t5_checkpoint_to_diffusers
from test_mmdit_sd3 import read_keys, relative_error
from transformers import T5Config as HFT5Config
from transformers import T5EncoderModel

from models.errors import UserError
from models.t5 import ALIAS_OF_SHARED, T5Config, T5Encoder, T5Tokenizer, t5_xxl, untie_embedding_alias

TOLERANCE = 1e-4
KEYS_DIR = Path(__file__).parent / "data" / "sd-keys"
SD3_T5_PREFIX = "text_encoders.t5xxl.transformer."  # where the SD3 *_incl_clips* bundles keep T5

CORPUS = """a red circle on a blue square
the small green triangle sits left of a yellow star
photograph of a cat, sitting on the mat.
an astronaut riding a horse on the moon
a watercolour painting of mountains at sunrise
two dogs playing in the snow with a red ball
a bowl of lasagne next to a glass of wine
""".splitlines()


def hf_config(c: T5Config) -> HFT5Config:
    return HFT5Config(
        vocab_size=c.vocab_size,
        d_model=c.d_model,
        d_kv=c.d_kv,
        d_ff=c.d_ff,
        num_layers=c.num_layers,
        num_heads=c.num_heads,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        relative_attention_num_buckets=c.relative_attention_num_buckets,
        relative_attention_max_distance=c.relative_attention_max_distance,
        is_encoder_decoder=False,
    )


def reference_from_ours(model: T5Encoder) -> T5EncoderModel:
    checkpoint = {SD3_T5_PREFIX + k: v for k, v in model.state_dict().items()}
    converted = convert_sd3_t5_checkpoint_to_diffusers(checkpoint)
    converted[ALIAS_OF_SHARED] = converted["shared.weight"]  # the tied alias transformers' state_dict names
    with torch.device("meta"):
        reference = T5EncoderModel(hf_config(model.config))
    reference.load_state_dict(converted, strict=True, assign=True)
    return reference.eval()


def token_ids(c: T5Config, *, batch=2, length=40, seed=0):
    return torch.randint(0, c.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_state_dict_equals_the_checkpoint_key_list():
    with torch.device("meta"):
        model = T5Encoder(t5_xxl())
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == read_keys(KEYS_DIR / "keys_t5xxl_encoder.txt")


def test_embedding_alias_is_folded_into_shared():
    shared = torch.randn(4, 2)
    assert untie_embedding_alias({ALIAS_OF_SHARED: shared})["shared.weight"] is shared
    assert set(untie_embedding_alias({"shared.weight": shared, ALIAS_OF_SHARED: shared.clone()})) == {"shared.weight"}
    with pytest.raises(UserError, match="differ"):
        untie_embedding_alias({"shared.weight": shared, ALIAS_OF_SHARED: shared + 1})


def test_tiny_matches_transformers(random_model):
    config = T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=96, num_layers=3, num_heads=4)
    ours = random_model(lambda: T5Encoder(config), seed=1)
    reference = reference_from_ours(ours)
    ids = token_ids(config, length=200)  # past max_distance 128: the far log buckets are exercised
    with torch.no_grad():
        assert relative_error(ours(ids), reference(input_ids=ids).last_hidden_state) <= TOLERANCE


@pytest.mark.slow
def test_real_width_two_layers_matches_transformers(random_model, tmp_path):
    config = t5_xxl()
    config.num_layers = 2
    ids = token_ids(config, length=77)
    reference = reference_from_ours(random_model(lambda: T5Encoder(config), seed=2))  # shares our tensors
    with torch.no_grad():
        torch.save(reference(input_ids=ids).last_hidden_state, tmp_path / "expected.pt")
    del reference
    gc.collect()
    ours = random_model(lambda: T5Encoder(config), seed=2)
    with torch.no_grad():
        assert relative_error(ours(ids), torch.load(tmp_path / "expected.pt")) <= TOLERANCE


@pytest.fixture(scope="module")
def spiece_model(tmp_path_factory) -> Path:
    """A tiny SentencePiece unigram model with T5's special ids (pad 0, </s> 1, <unk> 2, no <s>)."""
    sentencepiece = pytest.importorskip("sentencepiece")
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4),
        model_writer=buffer,
        vocab_size=60,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        character_coverage=1.0,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("t5tok") / "spiece.model"
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture(scope="module")
def reference_tokenizer(spiece_model):
    """transformers' T5 tokenizer read from the folder holding spiece.model (its conversion needs protobuf)."""
    pytest.importorskip("google.protobuf")
    from transformers import T5Tokenizer as HFT5Tokenizer

    return HFT5Tokenizer.from_pretrained(spiece_model.parent, extra_ids=0)


@pytest.fixture(scope="module")
def tokenizer_json(spiece_model, reference_tokenizer) -> Path:
    """The same model as a `tokenizer.json`, written by transformers as the hub's T5 folders were."""
    reference_tokenizer.save_pretrained(spiece_model.parent / "fast")
    return spiece_model.parent / "fast" / "tokenizer.json"


PROMPTS = [
    "a red circle on a blue square",
    "photograph of a Cat, sitting on the mat.",
    "an astronaut riding a horse on the moon " * 3,
    "lasagne!!  and   wine",
    "",
]


@pytest.mark.parametrize("which", ["spiece", "json"])
def test_tokenizer_equals_transformers(which, spiece_model, tokenizer_json, reference_tokenizer):
    reference = reference_tokenizer
    ours = T5Tokenizer(spiece_model if which == "spiece" else tokenizer_json)
    assert (ours.pad_id, ours.eos_id) == (0, 1)
    for length in (16, 48):
        expected = reference(
            PROMPTS,
            padding="max_length",
            max_length=length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        assert torch.equal(ours(PROMPTS, length=length), expected)


@pytest.mark.parametrize("which", ["spiece", "json"])
def test_word_positions(which, spiece_model, tokenizer_json):
    tokenizer = T5Tokenizer(spiece_model if which == "spiece" else tokenizer_json)
    prompt = "photograph of a cat, sitting on the mat."
    words = tokenizer.word_positions(prompt, length=64)
    assert [w.text for w in words] == prompt.split()
    all_positions = [p for w in words for p in w.positions]
    assert all_positions == list(range(len(tokenizer.encode(prompt))))  # every token once, in order
    assert [i for w in words for i in w.ids] == tokenizer.encode(prompt)

    def decoded(positions, text=prompt):
        ids = tokenizer.encode(text)
        return "".join(
            tokenizer._sp.id_to_piece(ids[p]) if which == "spiece" else tokenizer._fast.id_to_token(ids[p])
            for p in positions
        )

    cat, mat = words[3], words[-1]
    assert decoded(cat.word_positions).strip("▁") == "cat" and "," in decoded(cat.positions)
    assert decoded(mat.word_positions).strip("▁") == "mat" and decoded(mat.positions).endswith(".")
    assert all(w.word_positions for w in words)
    # a word the tiny vocabulary splits into several pieces keeps all of them
    melon = tokenizer.word_positions("watermelon", length=64)[0]
    assert len(melon.word_positions) > 1 and decoded(melon.word_positions, "watermelon").strip("▁") == "watermelon"


@pytest.mark.parametrize("prompt", ["a cat , on   the mat", "café  crème brûlée!", " leading and trailing  "])
def test_word_positions_cover_every_token_of_odd_prompts(prompt, spiece_model):
    """Lone punctuation, repeated spaces and non-ASCII letters (character, not byte, offsets)."""
    tokenizer = T5Tokenizer(spiece_model)
    words = tokenizer.word_positions(prompt, length=64)
    assert [w.text for w in words] == prompt.split()
    assert [p for w in words for p in w.positions] == list(range(len(tokenizer.encode(prompt))))
    assert all(set(w.word_positions) <= set(w.positions) for w in words)


def test_word_positions_refuse_a_prompt_that_does_not_fit(spiece_model):
    with pytest.raises(UserError, match="T5 tokens"):
        T5Tokenizer(spiece_model).word_positions("an astronaut riding a horse " * 10, length=16)


def test_missing_tokenizer_file_is_named(tmp_path):
    with pytest.raises(UserError, match="nope.model"):
        T5Tokenizer(tmp_path / "nope.model")
