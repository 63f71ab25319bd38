"""Words and mappers across SD3's two token spaces (p2p/joint_tokens.py), on tricky prompts: attached punctuation,
words split into several pieces, and words CLIP and T5 split differently (a SentencePiece model trained offline,
`test_mmdit_t5.spiece_model`, whose 60-piece vocabulary splits most words into several pieces)."""

from __future__ import annotations

import pytest
import torch
from joint_models import words_only_model
from test_mmdit_t5 import spiece_model  # noqa: F401 (fixture)

from models.errors import UserError
from p2p import tokens
from p2p.joint_tokens import JointWords
from p2p.schedules import cross_alphas

CLIP = 77  # SD3's CLIP columns come first


@pytest.fixture(scope="module")
def sd3(spiece_model):  # noqa: F811
    return JointWords(words_only_model("sd3", spiece_model))


@pytest.fixture(scope="module")
def flux(spiece_model):  # noqa: F811
    return JointWords(words_only_model("flux", spiece_model))


def t5_ids(words: JointWords, prompt: str) -> dict[int, int]:
    """Column → T5 piece id of the prompt's content tokens."""
    segment = words.segments(prompt)[-1]
    return {p: i for w in segment.words for p, i in zip(w.positions, w.ids)}


def pieces(words: JointWords, prompt: str, columns) -> str:
    ids = t5_ids(words, prompt)
    return "".join(words.model.t5_tokenizer._sp.id_to_piece(ids[c]) for c in columns).replace("▁", "")


SWAPS = [
    ("a cat, sitting on the mat.", "a lasagne, sitting on the mat."),  # punctuation; CLIP 1 → 2 tokens, T5 3 → more
    ("a watermelon on the mat", "a cat on the mat"),  # one CLIP token, many T5 pieces
    ("Lasagne!!  and   wine", "soup!! and wine"),  # capitals, repeated spaces, a split word and punctuation runs
]


@pytest.mark.parametrize("source,target", SWAPS)
def test_replace_mapper_is_one_block_per_segment(sd3, source, target):
    mapper = sd3.replace_mapper(source, target)
    assert mapper.shape == (sd3.length, sd3.length)
    assert torch.equal(mapper[:CLIP, :CLIP], tokens.replace_mapper(source, target))  # CLIP: the UNet's mapper
    assert mapper[:CLIP, CLIP:].abs().sum() == 0 and mapper[CLIP:, :CLIP].abs().sum() == 0  # nothing crosses


@pytest.mark.parametrize("source,target", SWAPS)
def test_t5_words_map_to_their_own_pieces(sd3, source, target):
    mapper = sd3.replace_mapper(source, target)
    src, tgt = sd3.segments(source)[-1], sd3.segments(target)[-1]
    src_ids, tgt_ids = t5_ids(sd3, source), t5_ids(sd3, target)
    for sw, tw in zip(src.words, tgt.words):
        block = mapper[list(sw.positions)][:, list(tw.positions)]
        assert torch.allclose(block.sum(dim=1), torch.ones(len(sw.positions)))  # each source piece sent once
        if sw.text == tw.text:  # an unchanged word reads its own pieces, one to one, wherever it moved
            assert all(src_ids[i] == tgt_ids[j] for i, j in zip(sw.positions, tw.positions))
            assert torch.equal(block, torch.eye(len(sw.positions)))
        elif len(sw.positions) != len(tw.positions):
            assert torch.allclose(block, torch.full_like(block, 1 / len(tw.positions)))
    assert mapper[src.end, tgt.end] == 1  # </s> follows the shift
    for column in range(max(src.end, tgt.end) + 1, sd3.length):
        assert mapper[column, column] == 1 and mapper[:, column].sum() == 1  # padding reads padding
    content = [p for w in tgt.words for p in w.positions] + [tgt.end]
    assert (mapper[:, content].sum(dim=0) > 0).all()  # every target piece reads a source piece


def test_a_word_split_differently_by_clip_and_t5_is_found_in_both(sd3):
    prompt = "lasagne!!  and   wine"
    columns = sd3.positions(prompt, "lasagne")
    clip_columns = [c for c in columns if c < CLIP]
    t5_columns = [c for c in columns if c >= CLIP]
    assert clip_columns == tokens.word_token_positions(prompt, "lasagne") and len(clip_columns) == 2  # lasag|ne
    assert pieces(sd3, prompt, t5_columns) == "lasagne" and len(t5_columns) > len(clip_columns)
    assert (
        pieces(
            sd3,
            "a cat, sitting on the mat.",
            [c for c in sd3.positions("a cat, sitting on the mat.", "Cat") if c >= CLIP],
        )
        == "cat"
    )
    the_mat = [c for c in sd3.positions("a cat, sitting on the mat.", "the mat") if c >= CLIP]
    assert pieces(sd3, "a cat, sitting on the mat.", the_mat) == "themat"  # a phrase: consecutive words, no "."
    assert sd3.positions("a cat on the mat", 1) == sorted(
        [2] + [c for c in sd3.positions("a cat on the mat", "cat") if c >= CLIP]
    )  # a word index: the same word in both segments
    with pytest.raises(UserError, match="'dog' is not in prompt"):
        sd3.positions("a cat on the mat", "dog")


def test_refine_aligns_each_segment_by_its_own_tokens(sd3):
    source, target = "a cat on the mat", "a fat cat, on the red mat"
    mapper, alphas = sd3.refine_alignment(source, target)
    clip_mapper, clip_alphas = tokens.refine_alignment(source, target)
    assert torch.equal(mapper[:CLIP], clip_mapper) and torch.equal(alphas[:CLIP], clip_alphas)
    src_ids, tgt_ids = t5_ids(sd3, source), t5_ids(sd3, target)
    tgt = sd3.segments(target)[-1]
    for column, token in tgt_ids.items():
        if alphas[column] == 1:  # an aligned piece reads the same piece of the source
            assert src_ids[int(mapper[column])] == token
    new = [c for c in tgt_ids if alphas[c] == 0]
    assert "fat" in pieces(sd3, target, new) and "red" in pieces(sd3, target, new)
    assert alphas[tgt.end] == 1 and mapper[tgt.end] == sd3.segments(source)[-1].end  # </s> ↔ </s>
    assert ((mapper[CLIP:] >= CLIP) & (mapper[CLIP:] < sd3.length)).all()  # T5 reads T5 only


def test_flux_has_t5_columns_only(flux):
    source, target = "a cat, sitting on the mat.", "a dog, sitting on the mat."
    assert flux.layout == (("t5", 0, flux.length),)
    mapper = flux.replace_mapper(source, target)
    dog = flux.positions(target, "dog")
    cat = flux.positions(source, "cat")
    assert min(dog) >= 0 and pieces(flux, target, dog) == "dog" and pieces(flux, source, cat) == "cat"
    assert mapper[cat][:, dog].sum() > 0


def test_per_word_windows_reach_both_segments(sd3):
    targets = ["a red dog riding a bicycle"]
    alphas = cross_alphas(
        {"default_": 0.5, "dog": 1.0}, targets=targets, num_steps=4, context_length=sd3.length, words=sd3
    )
    dog = sd3.positions(targets[0], "dog")
    assert any(c < CLIP for c in dog) and any(c >= CLIP for c in dog)
    assert (alphas[:, 0, dog] == 1).all()
    others = [c for c in range(sd3.length) if c not in dog]
    assert (alphas[:2, 0, others] == 1).all() and (alphas[2:, 0, others] == 0).all()
    with pytest.raises(UserError, match="not in any target"):
        cross_alphas({"cat": 1.0}, targets=targets, num_steps=4, context_length=sd3.length, words=sd3)


def test_prompts_that_do_not_fit_are_refused(sd3):
    with pytest.raises(UserError, match="T5 tokens"):
        sd3.segments("an astronaut riding a horse on the moon " * 3)
    with pytest.raises(UserError, match="same number of words"):
        sd3.replace_mapper("a cat", "a fat cat")


def test_sd3_without_t5_maps_its_zero_columns_to_themselves(spiece_model):  # noqa: F811
    model = words_only_model("sd3", spiece_model)
    model.config = model.config.with_settings(t5=False)
    words = JointWords(model)
    mapper = words.replace_mapper("a cat on the mat", "a dog on the mat")
    assert torch.equal(mapper[:CLIP, :CLIP], tokens.replace_mapper("a cat on the mat", "a dog on the mat"))
    assert torch.equal(mapper[CLIP:, CLIP:], torch.eye(words.length - CLIP))
    assert words.positions("a cat on the mat", "cat") == [2] and words.positions("a cat on the mat", 1) == [2]
