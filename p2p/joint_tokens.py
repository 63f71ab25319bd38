"""Words and token alignment across the text segments of an MM-DiT's joint sequence (P2P_SPEC §10).

SD3 / SD3.5 put two token spaces side by side in the columns of their joint attention: 77 CLIP positions (BPE,
`[SOT, tokens…, EOT, padding…]`) and then T5's (SentencePiece, `[tokens…, </s>, <pad>…]`); FLUX has T5 only.
A word may be split differently in each ("watermelon" is one CLIP token and three pieces of a small T5
vocabulary), so every edit mapper is built **per segment** and placed block-diagonally into the (L, L) matrix
of the whole text sequence; a column never reads from another segment, and padding maps to padding.

- CLIP segment: `p2p.tokens.replace_mapper` / `refine_alignment` on the 77 positions, unchanged.
- T5 segment: the same rules on T5's word positions (`models.t5.T5Tokenizer.word_positions`): words pair up by
  index, a word of unequal piece counts spreads `1/len(target pieces)`, the end token follows the shift,
  padding maps to the same position where the source is padding too (`p2p.tokens.padding_partner`); refine
  aligns the piece ids with the same Needleman–Wunsch as CLIP's (`p2p.tokens.align_ids`).
- Word lookup (per-word windows, reweight, LocalBlend, views): a word's positions in every segment.

References: Hertz et al. 2022 §3.2; google/prompt-to-prompt `seq_aligner.py`; Esser et al. 2024 (SD3) §5.1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from models.errors import UserError, WrongTypeError
from models.flow_model import FlowModel
from models.t5 import WordTokens
from p2p import tokens
from p2p.tokens import WordRef, align_ids, padding_partner, word_key


@dataclass(frozen=True)
class Segment:
    """One encoder's columns of a prompt's text sequence."""

    encoder: str  # "clip" or "t5"
    start: int  # first column of the segment in the joint text sequence
    stop: int  # one past its last column
    words: tuple[WordTokens, ...]  # per whitespace word, positions counted in the joint text sequence
    end: int  # column of the end token (CLIP's EOT, T5's </s>)


class JointWords:
    """A flow model's word → column lookups and per-segment edit mappers (the model gives tokenizers and lengths)."""

    def __init__(self, model: FlowModel):
        self.model = model
        self.layout = model.text_segments()  # ((encoder, start, stop), …)
        self.length = self.layout[-1][2]
        self._cache: dict[str, tuple[Segment, ...]] = {}

    def segments(self, prompt: str) -> tuple[Segment, ...]:
        if prompt not in self._cache:
            if self.layout[0][0] == "clip":  # SD3's CLIP: 75 content tokens fit; the pipelines cut silently, we raise
                tokens.check_prompts([prompt])
            by_encoder = self.model.word_positions(prompt)
            result = []
            for encoder, start, stop in self.layout:
                words = by_encoder.get(encoder, ())  # SD3 without T5 (model.t5=false): zeros in its columns
                first_free = start + (encoder == "clip")  # CLIP's start token holds column 0
                end = max((p + 1 for w in words for p in w.positions), default=first_free)
                result.append(Segment(encoder, start, stop, words, end))
            self._cache[prompt] = tuple(result)
        return self._cache[prompt]

    # --- words --------------------------------------------------------------------------------------------------
    def has_word(self, prompt: str, word: WordRef) -> bool:
        return bool(self._find(prompt, word)) if isinstance(word, str) else True

    def positions(self, prompt: str, word: WordRef) -> list[int]:
        """Columns of the joint text sequence that hold `word` in every segment (SD3: CLIP's and T5's).

        `word`: a word matched case-insensitively without surrounding punctuation (every occurrence; several
        words match consecutive words), a word index into `prompt.split()`, or explicit columns."""
        segments = self.segments(prompt)
        if isinstance(word, str):
            found = self._find(prompt, word)
            if not found:
                keys = [word_key(w.text) for w in segments[0].words]
                raise UserError(
                    f"word {word!r} is not in prompt {prompt!r}; words are matched case-insensitively "
                    f"without surrounding punctuation: {keys}"
                )
            return found
        if isinstance(word, int) and not isinstance(word, bool):
            count = len(segments[0].words)
            if not -count <= word < count:
                raise UserError(f"word index {word} is out of range for prompt {prompt!r}, which has {count} words")
            return sorted(p for s in segments if s.words for p in s.words[word].word_positions)
        if isinstance(word, Sequence) and word and all(isinstance(p, int) and not isinstance(p, bool) for p in word):
            if not all(0 <= p < self.length for p in word):
                raise UserError(f"text columns {list(word)} must lie in 0..{self.length - 1} ({self.layout})")
            return list(word)
        raise WrongTypeError(f"expected a word (str), a word index (int) or a list of text columns, got {word!r}")

    def _find(self, prompt: str, text: str) -> list[int]:
        query = [word_key(part) for part in text.split()]
        if not query or not all(query):
            raise UserError(f"word {text!r} is empty; name a word of {prompt!r}")
        found = set()
        for segment in self.segments(prompt):
            keys = [word_key(w.text) for w in segment.words]
            for start in range(len(keys) - len(query) + 1):
                if keys[start : start + len(query)] == query:
                    found |= {p for w in segment.words[start : start + len(query)] for p in w.word_positions}
        return sorted(found)

    # --- mappers ------------------------------------------------------------------------------------------------
    def replace_mapper(self, source: str, target: str) -> torch.Tensor:
        """(L, L) word-swap mapper over the joint text columns, one block per segment (see the module docstring)."""
        mapper = torch.zeros(self.length, self.length)
        for src, tgt in zip(self.segments(source), self.segments(target)):
            if len(src.words) != len(tgt.words):
                raise UserError(
                    f"replace needs prompts with the same number of words, but source {source!r} has "
                    f"{len(src.words)} and target {target!r} has {len(tgt.words)}; use edit=refine to add words"
                )
            block = slice(src.start, src.stop)
            if src.encoder == "clip":
                mapper[block, block] = tokens.replace_mapper(source, target, context_length=src.stop - src.start)
            else:
                mapper[block, block] = _t5_replace_block(src, tgt)
        return mapper

    def refine_alignment(self, source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(L,) long source column per target column and (L,) float 1 = aligned, 0 = new; per segment."""
        mapper, alphas = torch.arange(self.length), torch.ones(self.length)
        for src, tgt in zip(self.segments(source), self.segments(target)):
            block = slice(src.start, src.stop)
            if src.encoder == "clip":
                m, a = tokens.refine_alignment(source, target, context_length=src.stop - src.start)
            else:
                m, a = _t5_refine_block(src, tgt)
            mapper[block], alphas[block] = m + src.start, a
        return mapper, alphas

    def identical(self, source: str, target: str) -> bool:
        """Whether both prompts give the same tokens in every segment (what reweight-alone and `none` need)."""
        ids = lambda prompt: [[w.ids for w in s.words] for s in self.segments(prompt)]  # noqa: E731
        return ids(source) == ids(target)


def _t5_replace_block(src: Segment, tgt: Segment) -> torch.Tensor:
    """T5's block of the replace mapper, local positions 0 … stop − start (P2P_SPEC §4, §9.1)."""
    n, offset = src.stop - src.start, src.start
    block = torch.zeros(n, n)
    for sw, tw in zip(src.words, tgt.words):
        rows = torch.tensor(sw.positions, dtype=torch.long) - offset
        columns = torch.tensor(tw.positions, dtype=torch.long) - offset
        if len(rows) == 0 or len(columns) == 0:
            continue
        if len(rows) == len(columns):
            block[rows, columns] = 1.0
        else:
            block[rows[:, None], columns[None, :]] = 1.0 / len(columns)
    source_end, target_end = src.end - offset, tgt.end - offset
    if source_end < n and target_end < n:
        block[source_end, target_end] = 1.0  # </s>
    for column in range(target_end + 1, n):
        partner = padding_partner(column, source_end=source_end)
        if partner is not None:
            block[partner, column] = 1.0
    return block


def _t5_refine_block(src: Segment, tgt: Segment) -> tuple[torch.Tensor, torch.Tensor]:
    """T5's block of the refine alignment: Needleman–Wunsch on `[pieces…, </s>]` (no start token in T5)."""
    n = src.stop - src.start
    source_ids = [i for w in src.words for i in w.ids] + [-1]  # -1: the end token, equal in both
    target_ids = [i for w in tgt.words for i in w.ids] + [-1]
    mapper, alphas = torch.arange(n), torch.ones(n)
    for target_position, source_position in enumerate(align_ids(source_ids, target_ids)):
        if target_position >= n:
            break
        if source_position is None or source_position >= n:
            alphas[target_position] = 0.0
        else:
            mapper[target_position] = source_position
    for position in range(len(target_ids), n):
        partner = padding_partner(position, source_end=len(source_ids) - 1)
        if partner is None:
            alphas[position] = 0.0
        else:
            mapper[position] = partner
    return mapper, alphas
