"""Token handling for Prompt-to-Prompt: which of the text positions belong to which word,
and how the positions of a source prompt map onto those of a target prompt.

A prompt becomes the sequence `[SOT, tokens…, EOT, padding…]` of L ids, L = the text encoder's
context length (CLIP's 77 = CONTEXT_LENGTH for SD, the default everywhere; a tiny model may use fewer);
position 0 is the start token. Everything here works on *positions*, so it serves SD 1.x (padded with the
end token) and SD 2.x (padded with 0) alike; only `tokenize` needs the padding id.

- word lookup (P2P_SPEC §9.2): words are matched case-insensitively with surrounding punctuation
  stripped, a missing word raises, explicit word indices and token positions are accepted;
- `replace_mapper` (paper §3.2 "Word Swap", P2P_SPEC §4): the (L, L) matrix A of
  `Edit = einsum('bhpw,wn->bhpn', M_src, A)`, with the tail after a multi-token swap mapped
  correctly (P2P_SPEC §9.1);
- `refine_alignment` (paper §3.2 "Adding a New Phrase", P2P_SPEC §4): Needleman–Wunsch alignment
  of the token ids;
- `token_scales` (paper §3.2 "Attention Re-weighting", P2P_SPEC §9.3): one scale per word.

References: Hertz et al., "Prompt-to-Prompt Image Editing with Cross Attention Control",
arXiv 2208.01626; google/prompt-to-prompt `seq_aligner.py` (the behaviour matched, bugs fixed).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from models.errors import UserError, WrongTypeError
from models.text import END_TOKEN, START_TOKEN, clip_tokenizer  # one tokenizer for the model and the edits

CONTEXT_LENGTH = 77  # CLIP's text context: start token + 75 content tokens + end token

# Needleman–Wunsch scores of the reference (seq_aligner.get_mapper: ScoreParams(0, 1, -1)).
# With a free gap a mismatch never pays off, so the alignment is a longest common subsequence.
GAP_SCORE, MATCH_SCORE, MISMATCH_SCORE = 0, 1, -1

WordRef = str | int | Sequence[int]  # a word, a word index, or explicit token positions


@dataclass(frozen=True)
class Word:
    """One whitespace-separated word of a prompt and where its tokens sit in the 77-sequence."""

    text: str  # as written in the prompt, e.g. 'Cat,'
    key: str  # what lookups match: lower case, surrounding punctuation stripped, e.g. 'cat'
    ids: tuple[int, ...]  # all its token ids, attached punctuation included
    positions: tuple[int, ...]  # positions of all those tokens (SOT is position 0)
    word_positions: tuple[int, ...]  # positions of the word's own tokens, punctuation excluded


def _core_span(text: str) -> tuple[int, int]:
    """[start, end) of `text` without leading/trailing punctuation; the whole text if nothing is left."""
    start, end = 0, len(text)
    while start < end and not text[start].isalnum():
        start += 1
    while end > start and not text[end - 1].isalnum():
        end -= 1
    return (start, end) if start < end else (0, len(text))


def word_key(text: str) -> str:
    """What word lookups match: lower case (as CLIP's cleaning does), surrounding punctuation stripped."""
    cleaned = clip_tokenizer().clean_fn(text)  # ftfy, HTML unescape, lower case: as encode() does
    start, end = _core_span(cleaned)
    return cleaned[start:end]


def _encode_word(text: str) -> tuple[list[int], list[bool]]:
    """Token ids of one word and, per token, whether it belongs to the word rather than its punctuation.

    Replays the tokenizer's own pre-split (its regex cuts letters, single digits and punctuation runs
    apart) so that every BPE token is attributed to the characters it came from.
    """
    tokenizer = clip_tokenizer()
    cleaned = tokenizer.clean_fn(text)
    core_start, core_end = _core_span(cleaned)
    ids: list[int] = []
    in_word: list[bool] = []
    for piece in tokenizer.pat.finditer(cleaned):
        piece_ids = tokenizer.encode(piece.group())
        ids += piece_ids
        in_word += [piece.start() < core_end and piece.end() > core_start] * len(piece_ids)
    return ids, in_word


def _check_length(prompt: str, num_content_tokens: int, context_length: int) -> None:
    if num_content_tokens > context_length - 2:
        raise UserError(
            f"prompt {prompt!r} has {num_content_tokens} tokens, but at most {context_length - 2} fit "
            f"({context_length} with the start and end tokens); shorten it, nothing is truncated silently"
        )


@functools.lru_cache(maxsize=1024)
def prompt_words(prompt: str) -> tuple[Word, ...]:
    """The prompt's words with their token positions (P2P_SPEC §9.2).

    Per-word tokenization is checked against tokenizing the whole prompt at once, so the positions
    are exactly those the text encoder sees.
    """
    whole_prompt_ids = clip_tokenizer().encode(prompt)
    _check_length(prompt, len(whole_prompt_ids), CONTEXT_LENGTH)
    result, position = [], 1  # position 0 is the start token
    for text in prompt.split():
        ids, in_word = _encode_word(text)
        if not ids:
            raise UserError(f"word {text!r} of prompt {prompt!r} has no tokens; the tokenizer drops all of it")
        positions = tuple(range(position, position + len(ids)))
        word_positions = tuple(p for p, inside in zip(positions, in_word) if inside)
        result.append(Word(text, word_key(text), tuple(ids), positions, word_positions))
        position += len(ids)
    if [i for word in result for i in word.ids] != whole_prompt_ids:
        raise UserError(
            f"prompt {prompt!r} tokenizes differently word by word than as a whole; "
            "word positions would be wrong (unusual characters or HTML entities?)"
        )
    return tuple(result)


def tokenize(prompt: str, *, pad_id: int, context_length: int = CONTEXT_LENGTH) -> list[int]:
    """`[SOT, tokens…, EOT, pad_id…]`, `context_length` ids (P2P_SPEC §8: SD1 pads with 49407, SD2 with 0).

    Raises ValueError for prompts with more than `context_length − 2` tokens instead of truncating.
    """
    ids = clip_tokenizer().encode(prompt)
    _check_length(prompt, len(ids), context_length)
    return [START_TOKEN, *ids, END_TOKEN] + [pad_id] * (context_length - len(ids) - 2)


def words(prompt: str) -> list[str]:
    """The prompt split on whitespace, as written; word indices refer to this list."""
    return prompt.split()


def end_position(prompt: str) -> int:
    """Position of the end token: 1 + the number of content tokens."""
    return 1 + len(clip_tokenizer().encode(prompt))


def decode_tokens(prompt: str) -> list[str]:
    """The content tokens as text, for captions under attention tiles (paper Fig. 4).

    Entry k is the token at position k + 1; 'lasagne' gives 'lasag', 'ne'.
    """
    tokenizer = clip_tokenizer()
    return [tokenizer.decode([token_id]).strip() for token_id in tokenizer.encode(prompt)]


def check_prompts(prompts: Sequence[str], *, context_length: int = CONTEXT_LENGTH) -> list[str]:
    """The prompts as a list, each a string that fits the text encoder's `context_length` positions.

    Checked before any controller is built, so a bad prompt is named instead of surfacing as an index
    error in a token-position map sized for the model.
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise WrongTypeError(f"prompts must be a list of strings (source first), got {prompts!r}")
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise WrongTypeError(f"every prompt must be a string, got {prompt!r} in {list(prompts)}")
        _check_length(prompt, end_position(prompt) - 1, context_length)
    return list(prompts)


def word_token_positions(prompt: str, word: WordRef, *, context_length: int = CONTEXT_LENGTH) -> list[int]:
    """Positions (SOT = 0) of a word's tokens in the `context_length`-sequence (77 for SD; P2P_SPEC §9.2).

    `word` is one of
    - a string: matched case-insensitively without surrounding punctuation ('Cat,' finds 'cat');
      every occurrence counts; several words ('red car') match consecutive words;
    - an int: a word index into `words(prompt)` (negative counts from the end);
    - a list or tuple of ints: explicit token positions, checked to lie in 1..number of tokens.
    Punctuation attached to a word has its own tokens and is not part of the word's positions.
    A prompt longer than `context_length − 2` tokens raises: its positions would not exist in the model.
    """
    all_words = prompt_words(prompt)
    _check_length(prompt, end_position(prompt) - 1, context_length)
    if isinstance(word, str):
        return _positions_of_text(prompt, all_words, word)
    if isinstance(word, int) and not isinstance(word, bool):
        if not -len(all_words) <= word < len(all_words):
            raise UserError(
                f"word index {word} is out of range for prompt {prompt!r}, "
                f"which has {len(all_words)} words: {words(prompt)}"
            )
        return list(all_words[word].word_positions)
    if isinstance(word, Sequence) and word:
        return _checked_positions(prompt, list(word), num_tokens=end_position(prompt) - 1)
    raise WrongTypeError(
        f"expected a word (str), a word index (int) or a non-empty list of token positions, got {word!r}"
    )


def has_word(prompt: str, word: WordRef) -> bool:
    """Whether a word (str) occurs in the prompt, matched as `word_token_positions` matches it.
    Word indices and explicit positions refer to no particular word: True (they are range-checked on use)."""
    return _find_text(prompt, prompt_words(prompt), word) != [] if isinstance(word, str) else True


def _find_text(prompt: str, all_words: Sequence[Word], text: str) -> list[int]:
    """Positions of every occurrence of the word(s) `text`; [] when there is none."""
    query = [word_key(part) for part in text.split()]
    if not query or not all(query):
        raise UserError(f"word {text!r} is empty; name a word of {prompt!r}")
    keys = [word.key for word in all_words]
    positions = []
    for start in range(len(keys) - len(query) + 1):
        if keys[start : start + len(query)] == query:
            positions += [p for word in all_words[start : start + len(query)] for p in word.word_positions]
    return sorted(set(positions))  # overlapping matches of a repeated phrase share positions


def _positions_of_text(prompt: str, all_words: Sequence[Word], text: str) -> list[int]:
    positions = _find_text(prompt, all_words, text)
    if not positions:
        raise UserError(
            f"word {text!r} is not in prompt {prompt!r}; words are matched case-insensitively "
            f"without surrounding punctuation: {[word.key for word in all_words]}"
        )
    return positions


def _checked_positions(prompt: str, positions: list, *, num_tokens: int) -> list[int]:
    valid = all(isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= num_tokens for p in positions)
    if not valid or len(set(positions)) != len(positions):
        raise UserError(
            f"token positions {positions} are not distinct ints in 1..{num_tokens}, the content "
            f"tokens of prompt {prompt!r} (0 is the start token): {decode_tokens(prompt)}"
        )
    return positions


def replace_mapper(source: str, target: str, *, context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """Word-swap mapper A, float (L, L), L = `context_length` (CLIP's 77 for SD): A[i, j] = weight of source
    token i in target token j (paper §3.2 "Word Swap"; P2P_SPEC §4: `Edit = einsum('bhpw,wn->bhpn', M_src, A)`).

    Words pair up by index. A word whose tokens are unchanged, or a swapped word with as many tokens
    in both prompts, maps one-to-one. A swapped word with different token counts sends each of its
    source tokens to every target token of the word with weight 1/len(target tokens), as the reference
    does, so each source row sums to 1 and the word keeps its total attention. A whole word is the unit,
    attached punctuation included (as in the reference).

    Unlike the reference (P2P_SPEC §9.1), later words and the end token follow the shift in length:
    target position j maps to source position j + (source length − target length). Padding keeps its
    position (`padding_partner`): target padding j reads source padding j. Where the source is longer, the
    target's first padding positions face source words and read nothing; where the target is longer, the
    source's first padding columns face target words and are dropped. Every other source column is sent
    exactly once.
    """
    source_words, target_words = prompt_words(source), prompt_words(target)
    if len(source_words) != len(target_words):
        raise UserError(
            f"replace needs prompts with the same number of words, but source {source!r} has "
            f"{len(source_words)} and target {target!r} has {len(target_words)}; "
            "use refine (refine_alignment) to add or remove words"
        )
    for prompt in (source, target):
        _check_length(prompt, end_position(prompt) - 1, context_length)
    mapper = torch.zeros(context_length, context_length)
    mapper[0, 0] = 1.0  # start token
    for source_word, target_word in zip(source_words, target_words):
        rows, columns = torch.tensor(source_word.positions), torch.tensor(target_word.positions)
        if len(rows) == len(columns):
            mapper[rows, columns] = 1.0  # unchanged, or swapped token for token
        else:
            mapper[rows[:, None], columns[None, :]] = 1.0 / len(columns)
    source_end, target_end = end_position(source), end_position(target)
    mapper[source_end, target_end] = 1.0  # end token
    for column in range(target_end + 1, context_length):
        partner = padding_partner(column, source_end=source_end)
        if partner is not None:
            mapper[partner, column] = 1.0
    return mapper


def padding_partner(position: int, *, source_end: int) -> int | None:
    """The source position whose map a target padding position reads: the same position, if it is padding
    in the source too (the reference's mapping), else None (the source is longer and has a word there).

    Why the same position and not "the end token's shift": a causal text encoder gives each padding token
    its own features, and a model may put very different attention on them — the built-in model puts over a
    quarter of its cross-attention on the last of its 16 positions. Mapping by position keeps the heavy late
    padding columns; following the end token's shift drops the last ones when the target is longer (a refine
    that adds words), and the edited rows then sum to about half (measured: 0.45 vs 1.00 on the built-in
    model, which broke every refine image). In SD's 77 positions the difference is small.
    """
    return position if position > source_end else None


def replace_mappers(source: str, targets: Sequence[str], *, context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """`replace_mapper` for each target: float (T, L, L)."""
    return torch.stack(
        [replace_mapper(source, target, context_length=context_length) for target in _checked_targets(targets)]
    )


def refine_alignment(
    source: str, target: str, *, context_length: int = CONTEXT_LENGTH
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refinement mapper (paper §3.2 "Adding a New Phrase"; P2P_SPEC §4).

    Globally aligns the token ids `[SOT, …, EOT]` of both prompts (Needleman–Wunsch, gap 0, match +1,
    mismatch −1, i.e. a longest common subsequence). Returns
    - mapper, long (L,): mapper[j] = the source position aligned with target position j;
    - alphas, float (L,): 1 where target token j is aligned, 0 where it is new
    (L = `context_length`, CLIP's 77 for SD).
    For a new token mapper[j] = j, a valid index whose column the caller ignores (alpha 0);
    the reference stores −1 there. Equally good alignments are broken as in the reference: tracing
    back from the end, a target insertion wins over a source deletion, which wins over a match, so
    of two identical candidates the later target token is the new one.

    Padding maps to padding at the same position (`padding_partner`, as the reference does); where the
    source is longer, the target's first padding positions lie on source words (the reference maps them
    there) and get alpha 0 instead, their own column, like a new token. Only positions matter, so the padding
    id does not.
    """
    tokenizer = clip_tokenizer()
    source_ids = [START_TOKEN, *tokenizer.encode(source), END_TOKEN]
    target_ids = [START_TOKEN, *tokenizer.encode(target), END_TOKEN]
    _check_length(source, len(source_ids) - 2, context_length)
    _check_length(target, len(target_ids) - 2, context_length)
    mapper = torch.arange(context_length)
    alphas = torch.ones(context_length)
    for target_position, source_position in enumerate(align_ids(source_ids, target_ids)):
        if source_position is None:
            alphas[target_position] = 0.0
        else:
            mapper[target_position] = source_position
    for position in range(len(target_ids), context_length):
        partner = padding_partner(position, source_end=len(source_ids) - 1)
        if partner is None:
            alphas[position] = 0.0  # mapper[position] = position: the placeholder of a new token
        else:
            mapper[position] = partner
    return mapper, alphas


def refine_alignments(
    source: str, targets: Sequence[str], *, context_length: int = CONTEXT_LENGTH
) -> tuple[torch.Tensor, torch.Tensor]:
    """`refine_alignment` for each target: mappers long (T, L), alphas float (T, L)."""
    mappers, alphas = zip(
        *(refine_alignment(source, target, context_length=context_length) for target in _checked_targets(targets))
    )
    return torch.stack(mappers), torch.stack(alphas)


def align_ids(source_ids: Sequence[int], target_ids: Sequence[int]) -> list[int | None]:
    """Needleman–Wunsch: for each target index, the aligned source index, or None for an insertion."""
    rows, columns = len(source_ids), len(target_ids)
    # score[i][j]: best score aligning source_ids[:i] with target_ids[:j]; borders are all gaps
    score = [[GAP_SCORE * (i + j) if i == 0 or j == 0 else 0 for j in range(columns + 1)] for i in range(rows + 1)]
    for i in range(1, rows + 1):
        for j in range(1, columns + 1):
            pair = MATCH_SCORE if source_ids[i - 1] == target_ids[j - 1] else MISMATCH_SCORE
            score[i][j] = max(score[i][j - 1] + GAP_SCORE, score[i - 1][j] + GAP_SCORE, score[i - 1][j - 1] + pair)
    aligned: list[int | None] = [None] * columns
    i, j = rows, columns
    while i > 0 and j > 0:
        if score[i][j] == score[i][j - 1] + GAP_SCORE:
            j -= 1  # target token j − 1 is new
        elif score[i][j] == score[i - 1][j] + GAP_SCORE:
            i -= 1  # source token i − 1 was dropped
        else:  # with a free gap only matches are taken diagonally
            aligned[j - 1] = i - 1
            i, j = i - 1, j - 1
    return aligned


def _checked_targets(targets: Sequence[str]) -> Sequence[str]:
    if isinstance(targets, str) or not targets:
        raise WrongTypeError(f"targets must be a non-empty list of prompts, got {targets!r}")
    return targets


def token_scales(
    prompt: str, scales: Mapping[str | int | tuple[int, ...], float], *, context_length: int = CONTEXT_LENGTH
) -> torch.Tensor:
    """Per-position attention scales, float (context_length,), for re-weighting (paper §3.2 "Attention Re-weighting").

    One scale per (prompt, word) (P2P_SPEC §9.3): `scales` maps a word, word index or tuple of token
    positions (see `word_token_positions`) to one number; every other position keeps 1. Call once per
    target prompt. Two entries that reach the same token raise.
    """
    _check_length(prompt, end_position(prompt) - 1, context_length)
    result = torch.ones(context_length)
    owner: dict[int, object] = {}
    for word, scale in scales.items():
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise WrongTypeError(
                f"scale for {word!r} must be one number, got {scale!r}; use one token_scales call per target prompt"
            )
        for position in word_token_positions(prompt, word, context_length=context_length):
            if position in owner:
                raise UserError(f"{word!r} and {owner[position]!r} both scale token {position} of {prompt!r}")
            owner[position] = word
            result[position] = float(scale)
    return result
