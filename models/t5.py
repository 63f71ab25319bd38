"""The T5 v1.1 encoder (Raffel et al. 2020; v1.1: gated-GELU, no parameter sharing with a decoder) as SD3 and
FLUX use T5-XXL, and its SentencePiece tokenizer read from the user's own file.

Names are transformers' `T5EncoderModel` (= diffusers `text_encoder_3/`, and the SD3 bundles'
`text_encoders.t5xxl.transformer.*`): `shared`, `encoder.block.N.layer.0.SelfAttention.{q,k,v,o}`,
`layer.0.SelfAttention.relative_attention_bias` (block 0 only: its bias is reused by every block),
`layer.1.DenseReluDense.{wi_0,wi_1,wo}`, `layer_norm`s and `encoder.final_layer_norm`.
T5 specifics: RMS LayerNorm without bias or mean; no 1/√d scaling of the attention logits (folded into the
initialisation, Raffel et al. §3.1 / Mesh TensorFlow); bucketed relative position bias; no attention mask
(the SD3 and FLUX pipelines attend to the padding too).

Tokenizer: `T5Tokenizer(path)` reads `spiece.model` (sentencepiece) or `tokenizer.json` (tokenizers): content
pieces, then `</s>`, then `<pad>` up to the length (SD3: 256 by default, FLUX-dev 512, schnell 256), truncated as
the pipelines truncate. `word_positions` gives, per whitespace-separated word, its token positions (position 0
= the first token: T5 has no start token), the shape `p2p/tokens.py` gives for CLIP.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import rms_norm
from models.errors import UserError

ALIAS_OF_SHARED = "encoder.embed_tokens.weight"  # the tied copy some files carry (keys_t5xxl_encoder_extras.txt)


@dataclass
class T5Config:
    vocab_size: int = 32128  # 32000 SentencePiece pieces + 100 sentinels + padding to a multiple of 128
    d_model: int = 4096
    d_kv: int = 64  # per-head width
    d_ff: int = 10240  # gated-GELU hidden width
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128  # distances ≥ this share the last bucket
    layer_norm_eps: float = 1e-6


def t5_xxl() -> T5Config:
    return T5Config()


def relative_position_buckets(length: int, *, num_buckets: int, max_distance: int) -> torch.Tensor:
    """(length, length) bucket of key − query offsets, bidirectional (Raffel et al. §2.1; Mesh TF
    `_relative_position_bucket`): half the buckets per direction, exact below num_buckets/4, log-spaced above."""
    offsets = torch.arange(length)[None, :] - torch.arange(length)[:, None]  # key − query
    half = num_buckets // 2
    buckets = (offsets > 0).long() * half
    distance = offsets.abs()
    exact = half // 2
    log_bucket = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    return buckets + torch.where(distance < exact, distance, log_bucket.clamp(max=half - 1))


class T5LayerNorm(nn.Module):
    def __init__(self, dim: int, *, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, eps=self.eps)


class T5Attention(nn.Module):
    def __init__(self, c: T5Config, *, has_relative_bias: bool):
        super().__init__()
        self.heads, inner = c.num_heads, c.num_heads * c.d_kv
        self.q, self.k, self.v = (nn.Linear(c.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, c.d_model, bias=False)
        self.config = c
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(c.relative_attention_num_buckets, c.num_heads)

    def position_bias(self, length: int) -> torch.Tensor:
        """(1, heads, length, length), added to the logits of every layer."""
        buckets = relative_position_buckets(
            length,
            num_buckets=self.config.relative_attention_num_buckets,
            max_distance=self.config.relative_attention_max_distance,
        )
        return self.relative_attention_bias(buckets.to(self.relative_attention_bias.weight.device)).permute(2, 0, 1)[
            None
        ]

    def forward(self, x, position_bias):
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=position_bias.to(q.dtype), scale=1.0)  # no 1/√d
        return self.o(out.transpose(1, 2).flatten(2))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, c: T5Config, *, has_relative_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(c, has_relative_bias=has_relative_bias)
        self.layer_norm = T5LayerNorm(c.d_model, eps=c.layer_norm_eps)

    def forward(self, x, position_bias):
        return x + self.SelfAttention(self.layer_norm(x), position_bias)


class T5DenseGatedActDense(nn.Module):
    """wo(gelu_tanh(wi_0 x) ⊙ wi_1 x) (Shazeer 2020, GEGLU)."""

    def __init__(self, c: T5Config):
        super().__init__()
        self.wi_0, self.wi_1 = nn.Linear(c.d_model, c.d_ff, bias=False), nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wo = nn.Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x):
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class T5LayerFF(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(c)  # the name is historical: v1.1 uses gated GELU
        self.layer_norm = T5LayerNorm(c.d_model, eps=c.layer_norm_eps)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, c: T5Config, *, has_relative_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(c, has_relative_bias=has_relative_bias), T5LayerFF(c)])

    def forward(self, x, position_bias):
        return self.layer[1](self.layer[0](x, position_bias))


class T5Stack(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.block = nn.ModuleList(T5Block(c, has_relative_bias=i == 0) for i in range(c.num_layers))
        self.final_layer_norm = T5LayerNorm(c.d_model, eps=c.layer_norm_eps)


class T5Encoder(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(b, n) token ids → (b, n, d_model) last hidden states (what SD3 / FLUX feed the transformer)."""
        x = self.shared(input_ids)  # no √d scaling of the embedding in T5
        position_bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(input_ids.shape[1])
        for block in self.encoder.block:
            x = block(x, position_bias)
        return self.encoder.final_layer_norm(x)


def untie_embedding_alias(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A file's T5 tensors with the tied alias `encoder.embed_tokens.weight` folded into `shared.weight`
    (files carry either name or both; transformers' save_pretrained keeps only `shared.weight`)."""
    state = dict(state)
    alias = state.pop(ALIAS_OF_SHARED, None)
    if alias is not None:
        shared = state.setdefault("shared.weight", alias)
        if shared.shape != alias.shape or not torch.equal(shared, alias):
            raise UserError(
                f"this T5 file has both 'shared.weight' {list(shared.shape)} and '{ALIAS_OF_SHARED}' "
                f"{list(alias.shape)} and they differ; a T5 encoder ties them, so the file is inconsistent"
            )
    return state


@dataclass(frozen=True)
class WordTokens:
    """One whitespace-separated word of a prompt and where its tokens sit in T5's sequence (0 = first token)."""

    text: str  # as written in the prompt, e.g. 'Cat,'
    ids: tuple[int, ...]  # all its token ids, attached punctuation included
    positions: tuple[int, ...]  # positions of all those tokens
    word_positions: tuple[int, ...]  # the word's own tokens, punctuation excluded (as p2p/tokens.py's Word)


def _core_span(text: str) -> tuple[int, int]:
    """[start, end) of `text` without leading/trailing punctuation; the whole text if nothing is left."""
    start, end = 0, len(text)
    while start < end and not text[start].isalnum():
        start += 1
    while end > start and not text[end - 1].isalnum():
        end -= 1
    return (start, end) if start < end else (0, len(text))


class T5Tokenizer:
    """T5's SentencePiece tokenizer from the user's `spiece.model` or `tokenizer.json`."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise UserError(
                f"T5 tokenizer file {str(path)!r} does not exist; give the 'spiece.model' (SentencePiece) "
                "or 'tokenizer.json' of the T5 encoder (e.g. the tokenizer_3/ folder of an SD3 repository)"
            )
        if path.suffix == ".json":
            from tokenizers import Tokenizer

            self._fast = Tokenizer.from_file(str(path))
            self._fast.no_padding()
            self._fast.no_truncation()
            self.pad_id, self.eos_id = self._fast.token_to_id("<pad>"), self._fast.token_to_id("</s>")
        else:
            import sentencepiece

            self._fast = None
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
            self.pad_id, self.eos_id = self._sp.pad_id(), self._sp.eos_id()
        if self.pad_id is None or self.eos_id is None or self.pad_id < 0 or self.eos_id < 0:
            raise UserError(
                f"tokenizer {str(path)!r} has no <pad> or </s> token (pad id {self.pad_id}, end id "
                f"{self.eos_id}); T5 tokenizers have both (ids 0 and 1)"
            )

    def pieces(self, text: str) -> list[tuple[int, int, int]]:
        """(id, start, end) per content token; [start, end) are character offsets of its surface in `text`."""
        if self._fast is not None:
            encoding = self._fast.encode(text, add_special_tokens=False)
            return [(i, s, e) for i, (s, e) in zip(encoding.ids, encoding.offsets)]
        try:  # sentencepiece ≥ 0.2.1: character offsets directly
            mapping = self._sp.encode(text, return_type="offset_mapping")
            return [(i, s, e) for i, (s, e) in zip(mapping["ids"], mapping["offsets"])]
        except (TypeError, ValueError):  # older sentencepiece: byte offsets of the proto's pieces
            proto = self._sp.encode(text, out_type="immutable_proto")
            char_of_byte = [i for i, ch in enumerate(text) for _ in ch.encode("utf-8")] + [len(text)]
            return [(p.id, char_of_byte[p.begin], char_of_byte[p.end]) for p in proto.pieces]

    def encode(self, text: str) -> list[int]:
        """Content token ids, without the end token."""
        return [i for i, _, _ in self.pieces(text)]

    def __call__(self, prompts: list[str], *, length: int) -> torch.Tensor:
        """(b, length) ids: content, `</s>`, `<pad>`…; longer prompts are cut to length − 1 content tokens
        (as the SD3 / FLUX pipelines' `truncation=True, padding="max_length"`)."""
        rows = []
        for prompt in prompts:
            ids = self.encode(prompt)[: length - 1] + [self.eos_id]
            rows.append(ids + [self.pad_id] * (length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def word_positions(self, prompt: str, *, length: int) -> tuple[WordTokens, ...]:
        """Per word of `prompt.split()`, its token positions in the `length`-sequence.

        A token belongs to the word whose characters it covers; a token with no visible characters (the lone
        '▁' SentencePiece puts before a word it cannot merge with) belongs to the next word. A prompt whose
        tokens would not all fit before the end token raises: their positions would not exist in the model.
        """
        pieces = self.pieces(prompt)
        if len(pieces) > length - 1:
            raise UserError(
                f"prompt {prompt!r} has {len(pieces)} T5 tokens, but at most {length - 1} fit in "
                f"{length} positions with the end token; shorten it or raise the T5 length"
            )
        spans = [m.span() for m in re.finditer(r"\S+", prompt)]
        positions: list[list[int]] = [[] for _ in spans]
        own: list[list[int]] = [[] for _ in spans]
        for position, (_, start, end) in enumerate(pieces):
            visible = [i for i, (s, e) in enumerate(spans) if s < end and start < e]
            word = visible[0] if visible else next((i for i, (s, _) in enumerate(spans) if s >= start), len(spans) - 1)
            positions[word].append(position)
            core_start, core_end = (spans[word][0] + offset for offset in _core_span(prompt[slice(*spans[word])]))
            if start < core_end and end > core_start:
                own[word].append(position)
        return tuple(
            WordTokens(prompt[s:e], tuple(pieces[i][0] for i in p), tuple(p), tuple(o))
            for (s, e), p, o in zip(spans, positions, own)
        )
