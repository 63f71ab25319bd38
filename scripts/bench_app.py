"""How long a slider move takes in the app (issue 28): the page's own code path, timed without the browser.

    python scripts/bench_app.py                      # built-in model, 25 and 50 steps, torch's default threads
    python scripts/bench_app.py threads=2 'steps=[25]' moves=20

Per steps value: the first render (source and baselines sampled), then `moves` cross-injection slider moves, each a
new window, so only the cached source is reused. "grid" is what a move waits for (/edit: the targets' sampling and
the grid), "+ views" adds the chained /attention (the targets again, recording their maps: Fig. 4 tiles, mask,
self-attention components); "full edit" is p2p.edit.edit of the same request without the cache, recording the maps.
Prints a table; writes nothing.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.errors import UserError, number  # noqa: E402
from scripts._cli import entry_point  # noqa: E402
from scripts._common import load_model  # noqa: E402
from scripts.app import TINY_THREADS  # noqa: E402


def seconds(call, *args, **kwargs) -> float:
    start = time.perf_counter()
    call(*args, **kwargs)
    return time.perf_counter() - start


def measure(model, cfg: DictConfig, *, steps: int, guidance: float, moves: int) -> str:
    """One row of the table: the page's Editor, as p2p/app/ui.py serves it."""
    from p2p.app.ui import EDIT_CONTROLS, AppSettings, Editor
    from p2p.edit import edit

    editor = Editor(model, AppSettings(model_config={}))
    page = dict(
        source=cfg.source,
        targets=cfg.target,
        kind="auto",
        reweight_word="",
        reweight_scale=1.0,
        cross_start=0.0,
        cross_end=0.8,
        self_fraction=0.4,
        windows="",
        blend="",
        blend_threshold=0.4,
        restore_pixels=True,
        seed=cfg.seed,
        steps=steps,
        guidance=guidance,
    )
    values = lambda **change: [dict(page, **change)[k] for k in EDIT_CONTROLS] + [""]  # + the photo id
    first = seconds(editor.edit, *values())
    grid, views = [], []
    for i in range(moves):
        move = values(cross_end=round(0.1 + 0.8 * i / max(moves - 1, 1), 3) + 0.001)
        grid.append(seconds(editor.edit, *move))
        views.append(grid[-1] + seconds(editor.attention, *move))
    request = editor.kept[next(reversed(editor.kept))].request
    full = seconds(
        edit,
        model,
        request.prompts,
        seed=cfg.seed,
        spec=request.spec,
        store=editor.store,
        settings=request.settings,
        progress=False,
    )
    return (
        f"{steps:>5} {first:>12.2f}s {statistics.median(grid):>10.2f}s "
        f"{f'({min(grid):.2f}-{max(grid):.2f})':>13} {statistics.median(views):>7.2f}s {full:>9.2f}s"
    )


@entry_point("bench_app")
def main(cfg: DictConfig) -> None:
    try:
        import gradio  # noqa: F401
    except ImportError as err:
        raise UserError(f"the app needs gradio ({err}); install the extra: pip install -e '.[app]'") from None
    threads = cfg.threads if cfg.threads is not None else (TINY_THREADS if cfg.model.name == "tiny" else None)
    if threads is not None:
        torch.set_num_threads(number(threads, name="threads", kind=int))
    moves = number(cfg.moves, name="moves", kind=int)
    model = load_model(cfg)
    guidance = number(cfg.guidance if cfg.guidance is not None else model.config.guidance, name="guidance")
    print(
        f"model={cfg.model.name} threads={torch.get_num_threads()} cpus={os.cpu_count()} "
        f"load average={os.getloadavg()[0]:.2f} (1 min) moves={moves}"
    )
    print(f"{'steps':>5} {'first render':>13} {'move: grid':>11} {'(min-max)':>13} {'+ views':>8} {'full edit':>10}")
    for steps in OmegaConf.to_container(cfg.steps) if OmegaConf.is_list(cfg.steps) else [cfg.steps]:
        print(measure(model, cfg, steps=number(steps, name="steps", kind=int), guidance=guidance, moves=moves))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
