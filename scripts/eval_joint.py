"""The joint-attention variants table (issue 33): every variant's color and shape swaps on a flow model of the
shapes world, read by the world's reader.

    python scripts/eval_joint.py model=tiny_mmdit                       # 200 seeds per swap, every variant
    python scripts/eval_joint.py model=tiny_mmdit n=20 'variants=[none,rescale,logits]' steps=20

The variants and the measures are described in `p2p.experiments.joint_eval`. Writes `joint_variants.json` (the
table and per-seed rows) and `joint_variants.md` into the run folder and prints the table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.errors import UserError  # noqa: E402
from models.files import write_text  # noqa: E402
from models.flow_model import FlowModel  # noqa: E402
from p2p.edit import EditSpec  # noqa: E402
from p2p.experiments.joint_eval import joint_study, table_lines, variants_table  # noqa: E402
from p2p.joint_edit import JointSpec  # noqa: E402
from scripts._cli import entry_point  # noqa: E402
from scripts._common import check_counts, load_model, run_dir, sampler_settings  # noqa: E402


@entry_point("eval_joint")
def main(cfg: DictConfig) -> None:
    check_counts(cfg, n=1)
    out = run_dir()
    model = load_model(cfg, flow=True)
    if not isinstance(model, FlowModel):
        raise UserError(
            f"model={cfg.model.name} has no joint attention; use a flow model (model=tiny_mmdit, sd3-medium …)"
        )
    rows = joint_study(
        model,
        variants=list(cfg.variants),
        swaps=list(cfg.swaps),
        n=cfg.n,
        first_seed=cfg.first_seed,
        spec=EditSpec(**OmegaConf.to_container(cfg.edit, resolve=True)),
        joint=JointSpec(**OmegaConf.to_container(cfg.joint, resolve=True)),
        settings=sampler_settings(cfg, model),
    )
    table = variants_table(rows)
    write_text(out / "joint_variants.json", json.dumps({"table": table, "rows": rows}, indent=1, default=float))
    write_text(out / "joint_variants.md", "\n".join(table_lines(table)) + "\n")
    print("\n".join(table_lines(table)))
    print(f"wrote {out / 'joint_variants.json'}")


if __name__ == "__main__":
    main()
