"""Write a shapes-PIE set: PIE-Bench's format (mapping_file.json + annotation_images/) from the shapes world.

    python scripts/make_shapes_pie.py out=data/shapes_pie n=50 seed=0

Entries cycle through the edits the world can do: change color, change object (shape), change background,
add object, delete object; masks are exact (the world's ground truth), at the world's 32 px (p2p/shapes/pie.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.errors import UserError  # noqa: E402
from p2p.shapes.pie import write_shapes_pie  # noqa: E402
from scripts._cli import entry_point  # noqa: E402
from scripts._common import check_counts  # noqa: E402


@entry_point("make_shapes_pie")
def main(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "out"):
        raise UserError("out is required: pass out=PATH/TO/shapes_pie (a new folder)")
    check_counts(cfg, n=1, seed=0)
    out = write_shapes_pie(Path(cfg.out), n=cfg.n, seed=cfg.seed)
    print(f"{cfg.n} entries in {out}")


if __name__ == "__main__":
    main()
