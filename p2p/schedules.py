"""Which steps inject which maps (Hertz et al. 2022, §3.2 "Controlling the cross-attention"; P2P_SPEC §3).

A window is a pair of fractions `(start, end)` of the run; step `i` of `n` is inside when
`floor(start·n) ≤ i < floor(end·n)` — the official code's `int(f·n)` rule (a float `f` means `(0, f)`).
Cross-attention windows can differ per word: `{"default_": f, "cat": (0, 1)}` gives the tokens of "cat"
their own window and every other token the default one (without "default_" the default is the whole run).
With several targets a named word acts in the targets that contain it, as in the reference; a word in no
target raises (P2P_SPEC §9.2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol, Union

import torch

from models.errors import UserError
from p2p.tokens import CONTEXT_LENGTH, has_word, word_token_positions

Window = Union[float, Sequence[float]]
CrossSchedule = Union[Window, Mapping[str, Window]]
DEFAULT_KEY = "default_"  # the official code's name for "all tokens not named"


class WordLookup(Protocol):
    """Where a prompt's words are among a model's text positions (`p2p.joint_tokens.JointWords`)."""

    def has_word(self, prompt: str, word) -> bool: ...

    def positions(self, prompt: str, word) -> list[int]: ...


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def step_range(window: Window, num_steps: int) -> range:
    """The steps a window covers. `0.8` → steps [0, 40) of 50; `(0.2, 0.6)` → [10, 30)."""
    if _is_number(window):
        start, end = 0.0, float(window)
    elif (
        isinstance(window, Sequence)
        and not isinstance(window, str)
        and len(window) == 2
        and all(_is_number(w) for w in window)
    ):
        start, end = (float(w) for w in window)
    else:
        raise UserError(f"window {window!r} must be a fraction f (meaning (0, f)) or a pair (start, end)")
    if not 0.0 <= start <= end <= 1.0:
        raise UserError(f"window {window!r} must satisfy 0 ≤ start ≤ end ≤ 1 (fractions of the run)")
    # +1e-9: 0.7·50 = 35.000000000000004 but 0.29·100 = 28.999999999999996; both mean the obvious step
    return range(math.floor(start * num_steps + 1e-9), math.floor(end * num_steps + 1e-9))


def window_mask(window: Window, num_steps: int) -> torch.Tensor:
    """(num_steps,) float 0/1: 1 on the steps inside the window."""
    mask = torch.zeros(num_steps)
    steps = step_range(window, num_steps)
    mask[steps.start : steps.stop] = 1.0
    return mask


def cross_alphas(
    schedule: CrossSchedule,
    *,
    targets: Sequence[str],
    num_steps: int,
    context_length: int = CONTEXT_LENGTH,
    words: WordLookup | None = None,
) -> torch.Tensor:
    """α of P2P_SPEC §3: (num_steps, num_targets, context_length) in {0, 1}.

    Target map = α·Edit(M_src, M_tgt) + (1 − α)·M_tgt. Words are looked up in each target prompt
    (case-insensitive, punctuation stripped); a named word's tokens get its window in every target that
    contains it (the reference skips the others too), and a word that no target contains raises.
    `words`: where a word's tokens are (default CLIP's 77 positions; `p2p.joint_tokens.JointWords` for an
    MM-DiT, whose words sit in CLIP's and T5's columns).
    """
    has = has_word if words is None else words.has_word
    positions = (
        (lambda prompt, word: word_token_positions(prompt, word, context_length=context_length))
        if words is None
        else words.positions
    )
    if not isinstance(schedule, Mapping):
        schedule = {DEFAULT_KEY: schedule}
    default = _named_window_mask(schedule.get(DEFAULT_KEY, 1.0), num_steps, "cross_replace_steps")
    alphas = default[:, None, None].repeat(1, len(targets), context_length)
    for word, window in schedule.items():
        if word == DEFAULT_KEY:
            continue
        mask = _named_window_mask(window, num_steps, f"cross_replace_steps[{word!r}]")
        containing = [t for t, target in enumerate(targets) if has(target, word)]
        if not containing:  # a typo would otherwise give that word the default window silently
            raise UserError(
                f"word {word!r} of cross_replace_steps is not in any target prompt {list(targets)}; "
                "words are matched case-insensitively without surrounding punctuation"
            )
        for t in containing:
            alphas[:, t, positions(targets[t], word)] = mask[:, None]
    return alphas


def named_step_range(window: Window, num_steps: int, setting: str) -> range:
    """`step_range` whose error names the setting the window came from (e.g. 'self_replace_steps')."""
    try:
        return step_range(window, num_steps)
    except ValueError as error:
        raise UserError(f"{setting}: {error}") from None


def _named_window_mask(window: Window, num_steps: int, setting: str) -> torch.Tensor:
    named_step_range(window, num_steps, setting)  # raises naming the setting
    return window_mask(window, num_steps)
