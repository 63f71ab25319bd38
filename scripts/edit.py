"""Prompt-to-Prompt edit of generated images (issue 3).

    python scripts/edit.py model=tiny prompts='["a red circle on a black background","a blue circle on a black background"]' \
        edit=replace edit.cross_replace_steps=0.8 edit.self_replace_steps=0.4 seed=3 baseline=true attention=true
    python scripts/edit.py edit=refine prompts='["a red circle","a red circle on a white background"]'
    python scripts/edit.py edit=reweight prompts='["a red circle","a red circle"]' 'edit.reweight={red: 3}'
    python scripts/edit.py blend=local 'blend.words=[circle]' ...
    python scripts/edit.py model=sd15 model.checkpoint=v1-5-pruned-emaonly.safetensors prompts='["a cat riding a bicycle","a cat riding a car"]'

Writes into its own run folder: one PNG per prompt (source first), `grid.png` (captioned; with the
same-seed baseline row when `baseline=true` and the changed words' attention row when `attention=true`),
per-prompt attention tiles, LocalBlend masks, and the resolved `config.yaml`.
"""
from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from scripts._cli import entry_point  # noqa: E402
from scripts._common import check_fresh, load_model, prompt_list, run_dir, sampler_settings, save_config, save_image, slug  # noqa: E402
from models.errors import UserError  # noqa: E402
from p2p import views  # noqa: E402
from p2p.edit import EDIT_KINDS, BlendSpec, EditSpec, StoreSpec, edit  # noqa: E402
from p2p.tokens import words  # noqa: E402


def changed_words(prompts: list[str]) -> list[list[str]]:
    """Per prompt, the words that are not shared with the source (for the source: those missing in a target)."""
    source = set(w.lower() for w in words(prompts[0]))
    per_target = [[w for w in words(p) if w.lower() not in source] for p in prompts[1:]]
    in_targets = set(w.lower() for p in prompts[1:] for w in words(p))
    return [[w for w in words(prompts[0]) if w.lower() not in in_targets]] + per_target


def attention_row(result, prompts: list[str], focus: list[list[str]]):
    """One tile per prompt: the summed maps of its changed words (or of the whole prompt's last word)."""
    tiles = []
    for i, (prompt, chosen) in enumerate(zip(prompts, focus)):
        chosen = chosen or words(prompt)[-1:]
        maps = views.token_maps(result.store, i)
        tiles.append(views.captioned(views.heat(sum(views.word_map(maps, prompt, w) for w in chosen)),
                                     "attention: " + " ".join(chosen)))
    return tiles


def edit_inputs(cfg: DictConfig) -> tuple[list[str], EditSpec, BlendSpec | None]:
    """The run's prompts, edit and blend, checked before the model is loaded: a string given as `prompts`
    would otherwise be split into characters, and `blend=local` without words would silently not blend."""
    example = """prompts='["a red circle","a blue circle"]'"""
    prompts = prompt_list(cfg.prompts)
    spec = EditSpec(**OmegaConf.to_container(cfg.edit, resolve=True))
    if spec.kind not in EDIT_KINDS:
        raise UserError(f"edit.kind={spec.kind!r} is not supported; choose one of {EDIT_KINDS} "
                         "(config groups: edit=replace|refine|reweight|store)")
    if spec.kind != "none" and len(prompts) < 2:
        raise UserError(f"edit.kind={spec.kind} needs a source and at least one target prompt ({example}); got "
                         f"{prompts} — to sample one prompt and record its attention use edit=store attention=true")
    blend_dict = OmegaConf.to_container(cfg.blend, resolve=True)
    if not blend_dict.get("words") and set(blend_dict) != {"words"}:  # a blend group other than blend=none
        raise UserError("LocalBlend needs its words: blend.words=[circle] (every prompt) or one list per prompt, "
                         "blend.words=[[red],[blue]]; or blend=none for no blend")
    blend = BlendSpec(**blend_dict) if blend_dict.get("words") else None
    return prompts, spec, blend



@entry_point("edit")
def main(cfg: DictConfig) -> None:
    out = check_fresh(run_dir())
    prompts, spec, blend = edit_inputs(cfg)
    model = load_model(cfg)
    settings = sampler_settings(cfg, model)
    # cross-attention maps of every resolution (cheap: a few dozen text keys), as the reference shows them; not the
    # hybrid layers' text columns, which are coarse (4×4, 2×2 on the tiny model) and flatten the word's map
    store = StoreSpec(kinds=("cross",), max_fraction=1.0) if cfg.attention else None
    common = dict(seed=cfg.seed, settings=settings, height=cfg.height, width=cfg.width, progress=cfg.progress)
    result = edit(model, prompts, spec=spec if spec.kind != "none" else None, blend=blend, store=store, **common)

    saved = [save_image(image, out / f"{i:02d}_{slug(p)}.png") for i, (image, p) in enumerate(zip(result.images, prompts))]
    labels = ["source: " + prompts[0]] + [f"edit: {p}" for p in prompts[1:]]
    rows = [[views.captioned(im, c) for im, c in zip(result.images, labels)]]
    if cfg.baseline:
        baseline = edit(model, prompts, spec=None, **common)
        for i, (image, p) in enumerate(zip(baseline.images, prompts)):
            save_image(image, out / "baseline" / f"{i:02d}_{slug(p)}.png")
        rows.append([views.captioned(im, f"same seed, no injection: {p}") for im, p in zip(baseline.images, prompts)])
    if cfg.attention:
        rows.append(attention_row(result, prompts, changed_words(prompts)))
        for i, p in enumerate(prompts):
            views.save_png(views.grid([views.cross_attention_tiles(result.store, p, i)]),
                           out / "attention" / f"{i:02d}_{slug(p)}.png")
    if result.blend is not None and result.blend.last_mask is not None:
        views.save_png(views.grid([views.mask_tiles(result.blend.last_mask, ["source"] + prompts[1:])]),
                       out / "blend_mask.png")
    views.save_png(views.grid(rows), out / "grid.png")
    save_config(cfg, out)
    print(f"wrote {len(saved)} images, grid.png and config.yaml to {out}")


if __name__ == "__main__":
    main()
