"""Which edit on joint attention keeps a word swap's layout (issue 33): the variants table on a flow model of the
shapes world (`model=tiny_mmdit`), read by the world's reader as `edit_eval` reads the UNet's edits.

    python scripts/eval_joint.py model=tiny_mmdit n=200          # every variant, color and shape swaps
    python scripts/eval_joint.py model=tiny_mmdit n=20 'variants=[rescale,logits]'

Each seed draws its own one-object caption pair (`edit_eval.swap_pair`); every variant edits the same pairs from
the same seeds, and same-seed sampling without injection (`none`) is the baseline. A variant is a named set of
`JointSpec` / `EditSpec` overrides (`VARIANTS`); the row of a variant says how often the target reads right
(`success`), the layout is kept (mask IoU ≥ 0.8, `kept_layout`) and both (`success_and_kept`,
`colors_and_kept`), judged on the seeds whose source the model drew right (`p2p.shapes.metrics.summarize`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from models.errors import UserError
from models.flow_model import FlowModel
from p2p.edit import BlendSpec, EditSpec
from p2p.experiments.edit_eval import swap_pair
from p2p.flow import FlowSamplerSettings
from p2p.joint_edit import JointSpec, edit_flow
from p2p.shapes.metrics import score_edit, summarize
from p2p.shapes.world import WorldConfig, parse_caption

# name → overrides of the run's JointSpec ("joint") and EditSpec ("edit"); "blend": LocalBlend on the object's shape
VARIANTS: dict[str, dict] = {
    "none": {"edit": None},  # same-seed sampling without injection: the baseline that loses the layout
    "probs": {"joint": {"renorm": "probs"}},
    "logits": {"joint": {"renorm": "logits"}},
    "rescale": {"joint": {"renorm": "rescale"}},
    "cross_only": {"edit": {"self_replace_steps": 0.0}},  # image→text maps alone
    "self_only": {"edit": {"cross_replace_steps": 0.0}},  # image→image maps alone
    "text_rows": {"joint": {"text_rows": True}},
    "pooled": {"joint": {"pooled": True}},
    "text_rows_pooled": {"joint": {"text_rows": True, "pooled": True}},
    "everything": {"joint": {"text_rows": True, "pooled": True}, "edit": {"cross_replace_steps": 1.0}},
    "local_blend": {"blend": True},
}
SWAPS = ("color", "shape")


def variant_settings(name: str, *, spec: EditSpec, joint: JointSpec) -> tuple[EditSpec | None, JointSpec, bool]:
    """(edit spec or None for plain sampling, joint settings, LocalBlend on?) of a named variant."""
    if name not in VARIANTS:
        raise UserError(f"variant {name!r} is unknown; choose from {sorted(VARIANTS)}")
    overrides = VARIANTS[name]
    edit = overrides.get("edit", {})
    return (
        None if edit is None else dataclasses.replace(spec, **edit),
        dataclasses.replace(joint, **overrides.get("joint", {})),
        bool(overrides.get("blend", False)),
    )


def _blend_for(source: str, target: str, world: WorldConfig) -> BlendSpec:
    """LocalBlend on the swapped object: its shape word in each caption."""
    shapes = [parse_caption(c, config=world).objects[0][1] for c in (source, target)]
    return BlendSpec(words=[[shapes[0]], [shapes[1]]])


def joint_study(
    model: FlowModel,
    *,
    variants: Sequence[str],
    swaps: Sequence[str] = SWAPS,
    n: int,
    first_seed: int,
    spec: EditSpec,
    joint: JointSpec,
    settings: FlowSamplerSettings,
    world: WorldConfig = WorldConfig(),
) -> list[dict]:
    """One row per (swap, seed, variant): the reader's scores of the variant's edit."""
    for name in variants:
        variant_settings(name, spec=spec, joint=joint)  # unknown names fail before any sampling
    rows = []
    for swap in swaps:
        if swap not in SWAPS:
            raise UserError(f"swap {swap!r} is unknown; choose from {SWAPS}")
        rng = np.random.default_rng([first_seed, SWAPS.index(swap)])
        for seed in range(first_seed, first_seed + n):
            source, target = swap_pair(rng, world, swap=swap)
            for name in variants:
                edit, joint_spec, blend = variant_settings(name, spec=spec, joint=joint)
                result = edit_flow(
                    model,
                    [source, target],
                    seed=seed,
                    spec=edit,
                    joint=joint_spec,
                    blend=_blend_for(source, target, world) if blend else None,
                    settings=settings,
                    progress=False,
                )
                score = score_edit(result.images[0], result.images[1], source_caption=source, target_caption=target)
                rows.append(
                    {"swap": swap, "variant": name, "seed": seed, "source": source, "target": target}
                    | {f"edit_{k}": v for k, v in dataclasses.asdict(score).items()}
                )
    return rows


def variants_table(rows: Sequence[dict]) -> list[dict]:
    """One summary per (swap, variant), in the order first met."""
    keys = list(dict.fromkeys((r["swap"], r["variant"]) for r in rows))
    return [
        {"swap": swap, "variant": variant}
        | summarize([r for r in rows if (r["swap"], r["variant"]) == (swap, variant)], prefix="edit")
        for swap, variant in keys
    ]


def table_lines(table: Sequence[Mapping]) -> list[str]:
    """The table as Markdown, rates in percent."""
    columns = ("success", "kept_layout", "success_and_kept", "colors_and_kept", "mean_iou")
    lines = ["| swap | variant | n | " + " | ".join(columns) + " |", "|---|---|---|" + "---|" * len(columns)]
    for row in table:
        cells = [f"{100 * row[c]:.1f}" if c != "mean_iou" else f"{row[c]:.3f}" for c in columns if c in row]
        cells += ["–"] * (len(columns) - len(cells))
        lines.append(f"| {row['swap']} | {row['variant']} | {row['n']} | " + " | ".join(cells) + " |")
    return lines
