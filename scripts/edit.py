"""Prompt-to-Prompt edit of generated images (issue 3).

    python scripts/edit.py model=tiny prompts='["a red circle on a black background","a blue circle on a black background"]' \
        edit=replace edit.cross_replace_steps=0.8 edit.self_replace_steps=0.4 seed=3 baseline=true attention=true
    python scripts/edit.py edit=refine prompts='["a red circle","a red circle on a white background"]'
    python scripts/edit.py edit=reweight prompts='["a red circle","a red circle"]' 'edit.reweight={red: 3}'
    python scripts/edit.py blend=local 'blend.words=[circle]' ...
    python scripts/edit.py model=sd15 model.checkpoint=v1-5-pruned-emaonly.safetensors prompts='["a cat riding a bicycle","a cat riding a car"]'
    python scripts/edit.py model=sd3-medium model.checkpoint=sd3_medium_incl_clips_t5xxlfp16.safetensors \
        model.t5_tokenizer=tokenizer_3/spiece.model edit=replace prompts='["a cat riding a bicycle","a cat riding a car"]' \
        seed=8 joint.renorm=rescale joint.blocks=all   # P2P on joint attention (docs/editing.md#joint-attention)

Writes into its own run folder: one PNG per prompt (source first), `grid.png` (captioned; with the
same-seed baseline row when `baseline=true` and the changed words' attention row when `attention=true`),
per-prompt attention tiles, LocalBlend masks, and the resolved `config.yaml`.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from models.flow_model import FlowModel  # noqa: E402
from p2p import views  # noqa: E402
from p2p.edit import StoreSpec, edit  # noqa: E402
from p2p.joint_edit import JointSpec, edit_flow  # noqa: E402
from p2p.joint_tokens import JointWords  # noqa: E402
from scripts._cli import entry_point  # noqa: E402
from scripts._common import (  # noqa: E402
    check_fresh,
    edit_inputs,
    load_model,
    run_dir,
    sampler_settings,
    save_config,
    save_image,
    slug,
)


@entry_point("edit")
def main(cfg: DictConfig) -> None:
    out = check_fresh(run_dir())
    prompts, spec, blend = edit_inputs(cfg)
    joint = JointSpec(**OmegaConf.to_container(cfg.joint, resolve=True))  # used by the flow models only
    model = load_model(cfg, flow=True)
    # cross-attention maps of every resolution (cheap: a few dozen text keys), as the reference shows them; not the
    # hybrid layers' text columns, which are coarse (4×4, 2×2 on the tiny model) and flatten the word's map
    store = StoreSpec(kinds=("cross",), max_fraction=1.0) if cfg.attention else None
    common = dict(
        seed=cfg.seed, settings=sampler_settings(cfg, model), height=cfg.height, width=cfg.width, progress=cfg.progress
    )
    run, lookup = edit, None
    if isinstance(model, FlowModel):  # SD3 / SD3.5 / FLUX: the edit on joint attention (p2p/joint_edit.py)
        store = StoreSpec(kinds=("joint",)) if cfg.attention else None
        common |= dict(negative_prompt=cfg.negative_prompt or "")
        run = functools.partial(edit_flow, joint=joint)
        lookup = JointWords(model)  # words in CLIP's and T5's columns: the views show one tile per word
    result = run(model, prompts, spec=spec if spec.kind != "none" else None, blend=blend, store=store, **common)
    baseline = run(model, prompts, spec=None, **common) if cfg.baseline else None

    for i, (image, prompt) in enumerate(zip(result.images, prompts)):
        save_image(image, out / f"{i:02d}_{slug(prompt)}.png")
        if baseline is not None:
            save_image(baseline.images[i], out / "baseline" / f"{i:02d}_{slug(prompt)}.png")
    labels = ["source: " + prompts[0]] + [f"edit: {p}" for p in prompts[1:]]
    rows = [[views.captioned(im, c) for im, c in zip(result.images, labels)]]
    if baseline is not None:
        rows.append([views.captioned(im, f"same seed, no injection: {p}") for im, p in zip(baseline.images, prompts)])
    if cfg.attention:
        rows.append(views.attention_row(result.store, prompts, views.changed_words(prompts), lookup=lookup))
        for i, p in enumerate(prompts):
            tiles = (
                views.cross_attention_tiles(result.store, p, i)
                if lookup is None
                else views.word_tiles(result.store, p, i, lookup=lookup)
            )
            views.save_png(views.grid([tiles]), out / "attention" / f"{i:02d}_{slug(p)}.png")
    if result.blend is not None and result.blend.last_mask is not None:
        views.save_png(
            views.grid([views.mask_tiles(result.blend.last_mask, ["source"] + prompts[1:])]), out / "blend_mask.png"
        )
    views.save_png(views.grid(rows), out / "grid.png")
    save_config(cfg, out)
    print(f"wrote {len(prompts)} images, grid.png and config.yaml to {out}")


if __name__ == "__main__":
    main()
