"""The interactive editor in the browser (issue 28): live injection sliders, the fader, attention maps, photos.

    python scripts/app.py                        # built-in model on http://127.0.0.1:7860
    python scripts/app.py server_port=8000 model=sd15 model.checkpoint=v1-5-pruned-emaonly.safetensors

Gradio is the ecosystem's standard for such pages; it is the `app` extra: pip install -e '.[app]' (make app).
The page and its API (/edit, /attention, /invert) are p2p/app/ui.py; this script only loads the model.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from models.errors import UserError, number  # noqa: E402
from scripts._cli import entry_point  # noqa: E402
from scripts._common import load_model  # noqa: E402

TINY_BLEND_THRESHOLD = 0.4  # conf/blend/local_tiny.yaml
REFERENCE_BLEND_THRESHOLD = 0.3  # the official notebooks
# The built-in model's tensors are tiny: a second thread costs more than it saves, and on a busy 2-core machine
# two contending threads made a slider move 3-6x slower (docs/app.md) — tests/conftest.py found the same.
TINY_THREADS = 1


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local tool: no usage reports to Gradio's servers


@entry_point("app")
def main(cfg: DictConfig) -> None:
    try:
        from p2p.app.ui import AppSettings, build_app
    except ImportError as err:
        raise UserError(f"the app needs gradio ({err}); install the extra: pip install -e '.[app]'") from None
    threads = cfg.threads if cfg.threads is not None else (TINY_THREADS if cfg.model.name == "tiny" else None)
    if threads is not None:
        torch.set_num_threads(number(threads, name="threads", kind=int))
    port = number(cfg.server_port, name="server_port", kind=int) if cfg.server_port is not None else None
    model = load_model(cfg)
    settings = AppSettings(
        model_config=OmegaConf.to_container(cfg.model, resolve=True),
        source=cfg.source,
        target=cfg.target,
        seed=number(cfg.seed, name="seed", kind=int),
        steps=number(cfg.steps, name="steps", kind=int),
        guidance=number(cfg.guidance if cfg.guidance is not None else model.config.guidance, name="guidance"),
        blend_threshold=cfg.blend_threshold
        if cfg.blend_threshold is not None
        else (TINY_BLEND_THRESHOLD if cfg.model.name == "tiny" else REFERENCE_BLEND_THRESHOLD),
        output_dir=Path(cfg.output_dir).resolve(),
        cache_dir=cfg.cache_dir,
    )
    app = build_app(model, settings)
    app.queue(default_concurrency_limit=1, max_size=number(cfg.queue_size, name="queue_size", kind=int))
    app.launch(
        server_name=cfg.server_name,
        server_port=port,
        max_file_size=f"{cfg.max_upload_mb}mb",
        allowed_paths=[str(settings.output_dir)],
        ssr_mode=False,
        show_error=False,
    )


if __name__ == "__main__":
    main()
