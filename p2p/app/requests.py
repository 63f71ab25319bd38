"""What the page's controls mean: text boxes and sliders → the edit's EditSpec, BlendSpec and sampler settings.

Every check raises `UserError` naming the bad value, so the page shows one line and the server keeps serving.
The edit kind is chosen from the prompts as the paper does (§3.2): same number of words → replace (word swap),
otherwise refine (token alignment); identical prompts → the fader alone (reweight).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from models.errors import UserError, number
from models.text import clip_tokenizer
from p2p.edit import BlendSpec, EditSpec
from p2p.pipeline import SamplerSettings
from p2p.schedules import DEFAULT_KEY
from p2p.tokens import has_word, words

KINDS = ("auto", "replace", "refine")  # the kind control; reweight is the fader, composed on either
MAX_STEPS = 200  # one request computes at a time: a request for thousands of steps would hold the queue for hours
REWEIGHT_RANGE = (-2.0, 4.0)  # the fader's range (paper Fig. 9 uses −2…2; the notebooks go higher)
_WINDOW_LINE = re.compile(r"\s*(?P<word>[^:]+?)\s*:\s*(?P<start>[0-9.]+)\s*(?:-|–|,|\s)\s*(?P<end>[0-9.]+)\s*")


@dataclass
class EditRequest:
    """One edit as the page asks for it."""

    prompts: list[str]  # source first
    spec: EditSpec
    blend: BlendSpec | None
    settings: SamplerSettings
    seed: int
    kind_reason: str  # why the kind is what it is, shown beside the kind control

    @property
    def key(self) -> tuple:
        """Identifies the request (results are kept per request, so /attention reuses the last /edit)."""
        return (tuple(self.prompts), repr(self.spec), repr(self.blend), repr(self.settings), self.seed)

    def config(self, model_config: dict, *, inversion: dict | None = None, image: str | None = None) -> dict:
        """The request in scripts/edit.py's schema (conf/edit.yaml), so `python scripts/edit.py` can redo it; for
        a photo (`inversion`: conf/inversion's fields, `image`: its file) in scripts/edit_image.py's."""
        spec = asdict(self.spec)
        spec["cross_replace_steps"] = _plain(spec["cross_replace_steps"])
        spec["self_replace_steps"] = _plain(spec["self_replace_steps"])
        spec["reweight"] = spec["reweight"] or None
        blend = asdict(self.blend) if self.blend is not None else {"words": []}
        common = {
            "model": dict(model_config),
            "edit": spec,
            "blend": blend,
            "prompts": list(self.prompts),
            "steps": self.settings.steps,
            "guidance": self.settings.guidance,
            "negative_prompt": "",
            "height": None,
            "width": None,
            "dtype": "fp32",
            "device": "cpu",
        }
        if inversion is None:
            return {**common, "seed": self.seed, "baseline": True, "attention": True, "progress": False}
        return {
            **common,
            "inversion": dict(inversion),
            "image": image,
            "margins": [0, 0, 0, 0],
            "cache_dir": ".cache/inversions",
            "restore_unedited": False,
            "attention": True,
            "progress": False,
        }


def _plain(value):
    """Tuples → lists, recursively (YAML and OmegaConf know lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def target_prompts(text: str) -> list[str]:
    """One target prompt per line; blank lines are ignored."""
    targets = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not targets:
        raise UserError(
            "no target prompt: type at least one (one per line), e.g. 'a blue circle on a black background'"
        )
    return targets


def choose_kind(source: str, targets: list[str], kind: str) -> tuple[str, str]:
    """(edit kind, the reason shown on the page)."""
    if kind not in KINDS:
        raise UserError(f"edit kind {kind!r} is not one of {KINDS}")
    source_ids = clip_tokenizer().encode(source)
    if all(clip_tokenizer().encode(t) == source_ids for t in targets):
        return "reweight", "the prompts are identical: only the fader acts (reweight, paper Fig. 9)"
    same_count = [len(words(t)) == len(words(source)) for t in targets]
    if kind == "auto":
        kind = "replace" if all(same_count) else "refine"
    if kind == "replace":
        swaps = [f"{a} → {b}" for t in targets for a, b in zip(words(source), words(t)) if a.lower() != b.lower()]
        why = "chosen: " if all(same_count) else ""
        return kind, f"replace ({why}same number of words; swapped: {', '.join(swaps) or 'nothing'})"
    changed = [t for t, same in zip(targets, same_count) if not same]
    added = [w for t in targets for w in words(t) if not has_word(source, w)]
    reason = (
        f"refine ({'chosen: ' if changed else ''}"
        f"{'the words differ in number' if changed else 'tokens aligned'}; new words: {', '.join(added) or 'none'})"
    )
    return kind, reason


def word_windows(text: str) -> dict[str, tuple[float, float]]:
    """Per-word cross windows, one 'word: start-end' per line (fractions of the run)."""
    windows = {}
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        match = _WINDOW_LINE.fullmatch(line)
        if match is None:
            raise UserError(
                f"per-word window {line.strip()!r} is not 'word: start-end' with fractions of the run, "
                "e.g. 'blue: 0-0.5'"
            )
        windows[match["word"]] = (
            number(match["start"], name=f"start of {match['word']!r}"),
            number(match["end"], name=f"end of {match['word']!r}"),
        )
    return windows


def blend_words(text: str, num_prompts: int) -> list | None:
    """'circle' or 'circle, square' → the same words for every prompt; 'red | blue' → one group per prompt."""
    text = (text or "").strip()
    if not text:
        return None
    split = lambda part: [w for w in re.split(r"[,\s]+", part.strip()) if w]
    if "|" not in text:
        return split(text)
    groups = [split(part) for part in text.split("|")]
    if len(groups) != num_prompts:
        raise UserError(
            f"blend words {text!r} give {len(groups)} groups for {num_prompts} prompts; separate one "
            "group per prompt (source first) with '|', e.g. 'red | blue', or give words for all"
        )
    return groups


def reweight(word: str, scale: float, targets: list[str]) -> dict:
    """{word: [scale per target]}: the fader acts in every target that has the word (1 where one lacks it)."""
    word = (word or "").strip()
    if not word:
        return {}
    low, high = REWEIGHT_RANGE
    if not low <= scale <= high:
        raise UserError(f"reweight scale {scale} is outside the fader's range [{low}, {high}]")
    if not any(has_word(t, word) for t in targets):
        raise UserError(f"reweight word {word!r} is not in any target prompt {targets}; pick a word of a target")
    return {word: [float(scale) if has_word(t, word) else 1.0 for t in targets]}


def edit_request(
    *,
    source: str,
    targets: str,
    kind: str,
    reweight_word: str,
    reweight_scale: float,
    cross_start: float,
    cross_end: float,
    self_fraction: float,
    windows: str,
    blend: str,
    blend_threshold: float,
    restore_pixels: bool,
    seed,
    steps,
    guidance,
) -> EditRequest:
    source = (source or "").strip()
    if not source:
        raise UserError("the source prompt is empty; type the prompt of the image to edit")
    target_list = target_prompts(targets)
    prompts = [source, *target_list]
    steps = number(steps, name="steps", kind=int)
    if not 1 <= steps <= MAX_STEPS:
        raise UserError(f"steps={steps} is out of range; use 1 to {MAX_STEPS}")
    kind, reason = choose_kind(source, target_list, kind)
    scales = reweight(reweight_word, number(reweight_scale, name="reweight scale"), target_list)
    if kind == "reweight" and not scales:
        kind, reason = "none", reason + "; pick a word and move the fader"
    cross = (number(cross_start, name="cross start"), number(cross_end, name="cross end"))
    per_word = word_windows(windows)
    spec = EditSpec(
        kind=kind,
        cross_replace_steps={DEFAULT_KEY: cross, **per_word} if per_word else cross,
        self_replace_steps=number(self_fraction, name="self fraction"),
        reweight=scales,
    )
    words_per_prompt = blend_words(blend, len(prompts))
    blend_spec = (
        BlendSpec(
            words=words_per_prompt,
            threshold=number(blend_threshold, name="blend threshold"),
            restore_pixels=bool(restore_pixels),
        )
        if words_per_prompt
        else None
    )
    return EditRequest(
        prompts=prompts,
        spec=spec,
        blend=blend_spec,
        settings=SamplerSettings(steps=steps, guidance=number(guidance, name="guidance")),
        seed=number(seed, name="seed", kind=int),
        kind_reason=reason,
    )
