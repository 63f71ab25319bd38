"""Time of one null-text Adam step with gradient checkpointing on vs off, interleaved in one process.

python scripts/bench_checkpointing.py model.checkpoint=sd_xl_base_1.0.safetensors model=sdxl \
    weights_dtype=fp16 dtype=fp32 height=512 width=512 repeats=3
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.errors import UserError  # noqa: E402
from p2p.experiments.checkpointing_cost import compare  # noqa: E402
from p2p.pipeline import image_size  # noqa: E402
from scripts._cli import entry_point  # noqa: E402
from scripts._common import load_model  # noqa: E402


@entry_point("bench_checkpointing")
def main(cfg: DictConfig) -> None:
    if not isinstance(cfg.repeats, int) or cfg.repeats < 1:
        raise UserError(f"repeats={cfg.repeats!r}: pass a whole number ≥ 1")
    model = load_model(cfg)
    height, width = image_size(model, cfg.height, cfg.width)
    result = compare(model, height=height, width=width, repeats=cfg.repeats)
    print(json.dumps(result))
    print(
        f"model={cfg.model.name} {height}x{width}: one Adam step {result['median_on']:.2f} s with checkpointing, "
        f"{result['median_off']:.2f} s without (median of {cfg.repeats}); ratio {result['ratio']:.2f}"
    )


if __name__ == "__main__":
    main()
