"""Token positions, word-swap mappers and refinement alignments, with the real CLIP tokenizer (CPU, fast).

Prompt pairs come from the paper and the official notebooks; expected mappers are written out by hand.
"""

import open_clip
import pytest
import torch

from p2p.tokens import (
    CONTEXT_LENGTH,
    END_TOKEN,
    START_TOKEN,
    clip_tokenizer,
    decode_tokens,
    prompt_words,
    refine_alignment,
    refine_alignments,
    replace_mapper,
    replace_mappers,
    token_scales,
    tokenize,
    word_token_positions,
    words,
)

SD1_PAD, SD2_PAD = END_TOKEN, 0

# Prompts that stress the word → token arithmetic: punctuation, case, repeated spaces, sub-word tokens.
TRICKY_PROMPTS = [
    "a cat riding a bicycle",
    "A  Cat, riding a bicycle!",
    "a photo of a rhinoceros, eating lasagne... at my mother-in-law's house",
    "'sup, 3d dog!! (in a café) & #1",
    "  leading and trailing spaces  ",
]


def content_ids(prompt):
    return clip_tokenizer().encode(prompt)


def expected_mapper(pairs):
    """A (77, 77) mapper from {(source position, target position): weight}."""
    mapper = torch.zeros(CONTEXT_LENGTH, CONTEXT_LENGTH)
    for (row, column), weight in pairs.items():
        mapper[row, column] = weight
    return mapper


# --- tokenize -------------------------------------------------------------------------------------


def test_special_tokens_and_context_length_are_clips():
    tokenizer = clip_tokenizer()
    assert (START_TOKEN, END_TOKEN) == (tokenizer.sot_token_id, tokenizer.eot_token_id) == (49406, 49407)
    assert CONTEXT_LENGTH == 77
    assert clip_tokenizer() is tokenizer  # built once


def test_tokenize_layout_and_padding_per_model():
    ids = content_ids("a cat riding a bicycle")
    sd1 = tokenize("a cat riding a bicycle", pad_id=SD1_PAD)
    sd2 = tokenize("a cat riding a bicycle", pad_id=SD2_PAD)
    assert len(sd1) == len(sd2) == 77
    assert sd1[: len(ids) + 2] == sd2[: len(ids) + 2] == [START_TOKEN, *ids, END_TOKEN]
    assert set(sd1[len(ids) + 2 :]) == {49407} and set(sd2[len(ids) + 2 :]) == {0}


def test_tokenize_equals_open_clip_with_zero_padding():
    for prompt in TRICKY_PROMPTS:
        assert tokenize(prompt, pad_id=0) == open_clip.tokenizer.tokenize([prompt])[0].tolist()


def test_over_long_prompt_raises_instead_of_truncating():
    fits, too_long = " ".join(["cat"] * 75), " ".join(["cat"] * 76)
    assert tokenize(fits, pad_id=0)[-1] == END_TOKEN
    for fail in (
        lambda: tokenize(too_long, pad_id=0),
        lambda: word_token_positions(too_long, "cat"),
        lambda: replace_mapper(too_long, too_long),
        lambda: refine_alignment(fits, too_long),
    ):
        with pytest.raises(ValueError, match="has 76 tokens, but at most 75 fit"):
            fail()


def test_a_shorter_context_sizes_every_map_and_keeps_its_limit():
    """The built-in model may attend to fewer than 77 positions: maps are (L, L) / (L,), padding keeps its position
    up to L − 1, and a prompt over L − 2 tokens raises with the model's limit in the message."""
    source, target = "a cat eating pizza outside", "a cat eating lasagne outside"  # lasagne: 2 tokens
    short, full = replace_mapper(source, target, context_length=16), replace_mapper(source, target)
    assert short.shape == (16, 16) and torch.equal(short[:15, :15], full[:15, :15])
    assert short[15, 15] == 1 and short[:, 15].sum() == 1  # target padding j ← source padding j
    back = replace_mapper(target, source, context_length=16)  # source longer: its end token 7 lies on padding 7
    assert back[7, 6] == 1 and back[:, 7].sum() == 0 and torch.equal(back[8:, 8:], torch.eye(8))
    assert back.sum(dim=1).eq(1).all()  # every source column, padding included, sent exactly once
    mapper, alphas = refine_alignment("a cat", "a fluffy cat", context_length=16)
    assert mapper.shape == alphas.shape == (16,) and mapper[15] == 15 and alphas.sum() == 15  # one new token
    assert token_scales(source, {"pizza": 2.0}, context_length=16).shape == (16,)
    too_long = " ".join(["cat"] * 15)
    for fail in (
        lambda: replace_mapper(too_long, too_long, context_length=16),
        lambda: refine_alignment("a cat", too_long, context_length=16),
        lambda: token_scales(too_long, {"cat": 2.0}, context_length=16),
    ):
        with pytest.raises(ValueError, match="has 15 tokens, but at most 14 fit"):
            fail()


# --- words and their positions ---------------------------------------------------------------------


def test_words_split_on_any_whitespace():
    assert words("a  cat\triding \n a bicycle ") == ["a", "cat", "riding", "a", "bicycle"]


@pytest.mark.parametrize("prompt", TRICKY_PROMPTS)
def test_word_positions_tile_the_whole_prompt_tokenization(prompt):
    """Per-word arithmetic == tokenizing the prompt at once: the words' tokens, in order, are the prompt's."""
    all_words = prompt_words(prompt)
    assert [p for word in all_words for p in word.positions] == list(range(1, len(content_ids(prompt)) + 1))
    assert [i for word in all_words for i in word.ids] == content_ids(prompt)
    for word in all_words:
        assert set(word.word_positions) <= set(word.positions) and word.word_positions


def test_positions_of_simple_words_count_from_the_start_token():
    prompt = "a cat riding a bicycle"
    assert word_token_positions(prompt, "cat") == [2]
    assert word_token_positions(prompt, "bicycle") == [5]
    assert word_token_positions(prompt, "a") == [1, 4]  # every occurrence
    assert decode_tokens(prompt)[2 - 1] == "cat"


def test_word_lookup_ignores_case_punctuation_and_repeated_spaces():
    prompt = "A  Cat, riding a bicycle!"
    # 'a'=1 'cat'=2 ','=3 'riding'=4 'a'=5 'bicycle'=6 '!'=7: punctuation is skipped but shifts later words
    assert decode_tokens(prompt) == ["a", "cat", ",", "riding", "a", "bicycle", "!"]
    assert word_token_positions(prompt, "cat") == [2]
    assert word_token_positions(prompt, "CAT,") == [2]
    assert word_token_positions(prompt, "riding") == [4]
    assert word_token_positions(prompt, "bicycle") == [6]
    assert word_token_positions(prompt, "a") == [1, 5]


def test_multi_token_words_and_inner_punctuation():
    prompt = "lasagne on my mother-in-law's table"
    tokens = decode_tokens(prompt)
    assert tokens[:2] == ["lasag", "ne"]  # 'lasagne' is two BPE tokens
    assert word_token_positions(prompt, "lasagne") == [1, 2]
    assert word_token_positions(prompt, "on") == [3]
    law = word_token_positions(prompt, "mother-in-law's")
    assert [tokens[p - 1] for p in law] == ["mother", "-", "in", "-", "law", "'s"]
    assert word_token_positions(prompt, "table") == [law[-1] + 1]


def test_phrases_match_consecutive_words():
    prompt = "a red car next to a red, old barn"
    assert word_token_positions(prompt, "red car") == [2, 3]
    assert word_token_positions(prompt, "Red") == [2, 7]


def test_word_indices_and_explicit_positions():
    prompt = "a cat, riding a bicycle"
    assert word_token_positions(prompt, 1) == [2]  # 'cat,' without its comma
    assert word_token_positions(prompt, 2) == [4]
    assert word_token_positions(prompt, -1) == [6]
    assert word_token_positions(prompt, [2, 3]) == [2, 3]
    assert word_token_positions(prompt, (6,)) == [6]


@pytest.mark.parametrize("bad", [[0], [7], [2, 2], [1.5], [True]])
def test_explicit_positions_outside_the_content_tokens_raise(bad):
    with pytest.raises(ValueError, match=r"not distinct ints in 1\.\.6"):
        word_token_positions("a cat, riding a bicycle", bad)


def test_missing_word_raises_with_the_words_that_exist():
    with pytest.raises(ValueError) as error:
        word_token_positions("a cat riding a bicycle", "dog")
    assert str(error.value) == (
        "word 'dog' is not in prompt 'a cat riding a bicycle'; words are matched case-insensitively "
        "without surrounding punctuation: ['a', 'cat', 'riding', 'a', 'bicycle']"
    )
    with pytest.raises(ValueError, match="word index 5 is out of range"):
        word_token_positions("a cat riding a bicycle", 5)
    with pytest.raises(ValueError, match="word ',' is not in prompt"):
        word_token_positions("a cat riding a bicycle", ",")  # punctuation-only words match only themselves
    assert word_token_positions("salt & pepper", "&") == [2]
    with pytest.raises(ValueError, match="word '  ' is empty"):
        word_token_positions("a cat riding a bicycle", "  ")
    with pytest.raises(TypeError):
        word_token_positions("a cat riding a bicycle", [])


def test_decode_tokens_names_every_content_token():
    assert decode_tokens("A painting of a squirrel eating a burger") == [
        "a",
        "painting",
        "of",
        "a",
        "squirrel",
        "eating",
        "a",
        "burger",
    ]


# --- replace (word swap) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, target",
    [
        ("a cat riding a bicycle", "a cat riding a car"),
        ("A painting of a squirrel eating a burger", "A painting of a lion eating a burger"),
        ("a cat riding a bicycle", "A  Cat riding a bicycle"),  # same tokens: nothing swapped
    ],
)
def test_one_token_swaps_give_the_identity(source, target):
    assert torch.equal(replace_mapper(source, target), torch.eye(77))


def test_swap_to_a_multi_token_word_spreads_uniformly():
    source, target = "a photo of a cat", "a photo of a lasagne"
    assert len(content_ids("lasagne")) == 2
    # SOT a photo of a cat EOT -> SOT a photo of a lasag ne EOT: 'cat' (5) feeds 5 and 6 by 1/2,
    # the end token moves from 6 to 7, and padding keeps its position (source padding 7 has no partner).
    pairs = {(p, p): 1.0 for p in range(5)} | {(5, 5): 0.5, (5, 6): 0.5, (6, 7): 1.0}
    pairs |= {(column, column): 1.0 for column in range(8, 77)}
    assert torch.equal(replace_mapper(source, target), expected_mapper(pairs))


def test_tail_after_a_multi_token_swap_is_shifted_not_dropped():
    """The reference's bug (P2P_SPEC §9.1): after 'cat' → 'rhinoceros' (3 tokens) it maps target j from
    source j, so 'sitting' would read the maps of 'a' and source 'sitting' would be lost."""
    source, target = "a cat sitting on a car", "a rhinoceros sitting on a car"
    assert decode_tokens(target)[1:4] == ["rhino", "cer", "os"]
    # source: SOT0 a1 cat2 sitting3 on4 a5 car6 EOT7 | target: SOT0 a1 rhino2 cer3 os4 sitting5 on6 a7 car8 EOT9
    pairs = {
        (0, 0): 1.0,
        (1, 1): 1.0,
        (2, 2): 1 / 3,
        (2, 3): 1 / 3,
        (2, 4): 1 / 3,
        (3, 5): 1.0,
        (4, 6): 1.0,
        (5, 7): 1.0,
        (6, 8): 1.0,
        (7, 9): 1.0,
    }
    pairs |= {(column, column): 1.0 for column in range(10, 77)}  # padding keeps its position
    assert torch.equal(replace_mapper(source, target), expected_mapper(pairs))


def test_swap_to_a_shorter_word_sums_its_tokens_and_pulls_the_tail_back():
    source, target = "a rhinoceros on a table", "a cat on a table"
    pairs = {
        (0, 0): 1.0,
        (1, 1): 1.0,
        (2, 2): 1.0,
        (3, 2): 1.0,
        (4, 2): 1.0,
        (5, 3): 1.0,
        (6, 4): 1.0,
        (7, 5): 1.0,
        (8, 6): 1.0,
    }
    # the end token moves from 8 to 6; target padding 7 and 8 lie on source words: they read nothing
    pairs |= {(column, column): 1.0 for column in range(9, 77)}
    assert torch.equal(replace_mapper(source, target), expected_mapper(pairs))


@pytest.mark.parametrize(
    "source, target",
    [
        ("a cat sitting on a car", "a rhinoceros sitting on a lasagne"),
        ("a rhinoceros, eating lasagne at home", "a cat. eating pizza at home"),
        ("A painting of a squirrel eating a burger", "A painting of a rhinoceros eating a lasagne"),
    ],
)
def test_mapper_columns_are_well_formed_and_attention_mass_is_kept(source, target):
    mapper = replace_mapper(source, target)
    swapped_columns = set()
    for source_word, target_word in zip(prompt_words(source), prompt_words(target)):
        if len(source_word.positions) != len(target_word.positions):
            swapped_columns |= set(target_word.positions)
            block = mapper[list(source_word.positions)][:, list(target_word.positions)]
            assert torch.allclose(block, torch.full_like(block, 1 / len(target_word.positions)))
    # every other target token (end and padding included) copies exactly one source column, except padding
    # positions that hold a source word (the source is longer there), which read none
    source_end = len(content_ids(source)) + 1
    target_end = len(content_ids(target)) + 1
    for column in set(range(77)) - swapped_columns:
        empty = target_end < column <= source_end
        assert sorted(mapper[:, column].tolist())[-2:] == ([0.0, 0.0] if empty else [0.0, 1.0])
    # every source token, padding included, sends all its attention somewhere, unless the longer target holds a
    # word at its padding position
    sent = mapper.sum(dim=1)
    assert torch.allclose(sent[: source_end + 1], torch.ones(source_end + 1))
    assert torch.allclose(sent[max(source_end, target_end) + 1 :], torch.ones(76 - max(source_end, target_end)))
    # so an edited softmax map keeps the source's per-pixel mass over the words and the end token
    source_maps = torch.randn(2, 8, 64, 77).softmax(dim=-1)
    edited = torch.einsum("bhpw,wn->bhpn", source_maps, mapper)
    assert torch.allclose(edited[..., : target_end + 1].sum(-1), source_maps[..., : source_end + 1].sum(-1))
    # and the last word reads the maps of the source's last word
    assert torch.equal(edited[..., target_end], source_maps[..., source_end])


def test_unequal_word_counts_raise_and_suggest_refine():
    with pytest.raises(ValueError) as error:
        replace_mapper("a photo of a house on a mountain", "a photo of a house on a mountain at winter")
    message = str(error.value)
    assert "'a photo of a house on a mountain'" in message and "has 8" in message and "has 10" in message
    assert "refine" in message


def test_replace_mappers_stack_one_mapper_per_target():
    source, targets = "a cat riding a bicycle", ["a dog riding a bicycle", "a cat riding a lasagne"]
    mappers = replace_mappers(source, targets)
    assert mappers.shape == (2, 77, 77) and mappers.dtype == torch.float32
    assert torch.equal(mappers[1], replace_mapper(source, targets[1]))
    with pytest.raises(TypeError):
        replace_mappers(source, "a dog riding a bicycle")


# --- refine (adding a phrase) ----------------------------------------------------------------------


def test_the_last_padding_columns_keep_their_mass_when_the_target_is_longer():
    """A model may put much of its attention on the last padding positions (the built-in model: over a quarter on
    position 15 of 16): a longer target must not drop them, or the edited rows sum to far less than 1."""
    source_row = torch.zeros(16)
    source_row[12:] = 0.25  # all the attention on the last four padding tokens
    mapper, alphas = refine_alignment("a red circle", "a red circle on a white background", context_length=16)
    assert (source_row[mapper] * alphas).sum() == 1
    swap = replace_mapper("a cat eating pizza outside", "a cat eating lasagne outside", context_length=16)
    assert (source_row @ swap).sum() == 1


def test_refine_adding_words_at_the_end():
    mapper, alphas = refine_alignment("a photo of a house on a mountain", "a photo of a house on a mountain at winter")
    # target: SOT0 a photo of a house on a mountain(8) at9 winter10 EOT11; source EOT is 9
    assert mapper.dtype == torch.long and alphas.dtype == torch.float32
    assert mapper[:9].tolist() == list(range(9)) and mapper[11] == 9
    assert alphas[:12].tolist() == [1.0] * 9 + [0.0, 0.0, 1.0]
    assert mapper[12:].tolist() == list(range(12, 77)) and alphas[12:].eq(1).all()  # padding keeps its position


def test_refine_adding_a_word_in_the_middle():
    mapper, alphas = refine_alignment("a bunny doll", "a smiling bunny doll")
    assert mapper[:5].tolist() == [0, 1, 2, 2, 3] and alphas[:5].tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert mapper[2] == 2  # documented placeholder for a new token: its own position


def test_refine_ties_mark_the_later_duplicate_as_new_like_the_reference():
    mapper, alphas = refine_alignment("a cat", "a a cat")
    assert alphas[:5].tolist() == [1.0, 1.0, 0.0, 1.0, 1.0] and mapper[[0, 1, 3, 4]].tolist() == [0, 1, 2, 3]


def test_refine_removing_words_maps_padding_to_padding():
    mapper, alphas = refine_alignment("a photo of a house on a mountain at winter", "a photo of a house on a mountain")
    assert mapper[:10].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 11] and alphas[:10].eq(1).all()
    # target padding 10 and 11 lie on the source's 'winter' and end token: their own columns, like new tokens
    assert alphas[10:12].tolist() == [0.0, 0.0] and mapper[10:12].tolist() == [10, 11]
    assert mapper[12:].tolist() == list(range(12, 77)) and alphas[12:].eq(1).all()


@pytest.mark.parametrize("prompt", TRICKY_PROMPTS + ["A painting of a squirrel eating a burger"])
def test_identical_prompts_give_identity(prompt):
    mapper, alphas = refine_alignment(prompt, prompt)
    assert torch.equal(mapper, torch.arange(77)) and torch.equal(alphas, torch.ones(77))
    assert torch.equal(replace_mapper(prompt, prompt), torch.eye(77))


def lcs_length(a, b):
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


@pytest.mark.parametrize(
    "source, target",
    [
        ("a photo of a house on a mountain", "a photo of a house on a snowy mountain at winter"),
        ("a bunny doll", "a smiling bunny doll made of lasagne"),
        ("a cat riding a bicycle", "a fluffy cat, riding a rusty old bicycle in a park"),
        ("a cat on a mat", "a cat on a cat on a mat on a cat"),
    ],
)
def test_refine_aligns_equal_tokens_in_order_and_as_many_as_possible(source, target):
    source_ids = tokenize(source, pad_id=SD2_PAD)
    target_ids = tokenize(target, pad_id=SD2_PAD)
    mapper, alphas = refine_alignment(source, target)
    target_end = len(content_ids(target)) + 1
    aligned = [j for j in range(target_end + 1) if alphas[j] == 1]
    assert all(source_ids[mapper[j]] == target_ids[j] for j in aligned)
    assert mapper[aligned].diff().gt(0).all()  # monotonic: the aligned order is kept
    source_end = len(content_ids(source)) + 1
    assert len(aligned) == lcs_length(source_ids[: source_end + 1], target_ids[: target_end + 1])
    padding = [j for j in range(target_end + 1, 77) if alphas[j] == 1]
    assert all(mapper[j] == j > source_end for j in padding)  # padding to padding, at the same position


def test_refine_alignments_batch_targets():
    targets = ["a photo of a house on a mountain at winter", "a photo of a house on a snowy mountain"]
    mappers, alphas = refine_alignments("a photo of a house on a mountain", targets)
    assert mappers.shape == alphas.shape == (2, 77)
    assert torch.equal(mappers[1], refine_alignment("a photo of a house on a mountain", targets[1])[0])


# --- re-weighting ----------------------------------------------------------------------------------


def test_token_scales_one_value_per_word():
    scales = token_scales("a smiling bunny doll, with lasagne", {"Smiling": 5.0, "lasagne": -1, 3: 0.5})
    expected = torch.ones(77)
    expected[2], expected[[7, 8]], expected[4] = 5.0, -1.0, 0.5  # a smiling bunny doll , with lasag ne
    assert torch.equal(scales, expected)
    with pytest.raises(ValueError, match="both scale token 2"):
        token_scales("a smiling bunny doll", {"smiling": 2.0, (2,): 3.0})
    with pytest.raises(TypeError, match="one number"):
        token_scales("a smiling bunny doll", {"smiling": [2.0, 3.0]})
    with pytest.raises(ValueError, match="not in prompt"):
        token_scales("a smiling bunny doll", {"smile": 2.0})
