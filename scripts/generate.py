"""Text to image (issue 2): one PNG per prompt, all prompts from the same seed.

    python scripts/generate.py                                    # the built-in shapes-world model
    python scripts/generate.py prompts='["a blue square on a white background"]' seed=3 steps=25
    python scripts/generate.py model=sd15 model.checkpoint=v1-5-pruned-emaonly.safetensors \
        prompts='["a cat riding a bicycle"]' seed=0 steps=50 guidance=7.5 height=512 width=512 dtype=fp32 device=cpu

Writes into its own run folder: `{index:02d}_{prompt slug}.png` in prompt order and the resolved `config.yaml`.
The sampling itself is `p2p.pipeline.generate`, the same loop the editing scripts use.
"""
from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from models.ddim import ddim_timesteps  # noqa: E402
from models.errors import UserError  # noqa: E402
from models.stable_diffusion import ModelConfig  # noqa: E402
from models.text import tokenize  # noqa: E402
from p2p.pipeline import generate  # noqa: E402
from scripts._cli import entry_point  # noqa: E402
from scripts._common import (  # noqa: E402
    load_model,
    model_config,
    number,
    prompt_list,
    run_dir,
    sampler_settings,
    save_config,
    save_image,
    slug,
)


def check_request(cfg: DictConfig, config: ModelConfig) -> dict:
    """Prompts, negative prompt, size and steps checked against the model's config, so that a bad value is
    named before sampling (and, for the SD presets, before their multi-GB file is read). Returns the
    `generate` arguments they become: height/width null mean the model's native size."""
    prompts = prompt_list(cfg.prompts)
    negative_prompt = "" if cfg.negative_prompt is None else cfg.negative_prompt
    if not isinstance(negative_prompt, str):
        raise UserError(f"negative_prompt must be one string (used with every prompt), got {negative_prompt!r}")
    height = config.image_size if cfg.height is None else cfg.height
    width = config.image_size if cfg.width is None else cfg.width
    config.check_image_size(height=height, width=width)
    tokenize([*prompts, negative_prompt], context_length=config.text.context_length)  # over-long prompts raise
    ddim_timesteps(number(cfg.steps, name="steps", kind=int), num_train_timesteps=config.num_train_timesteps)
    return dict(prompts=prompts, negative_prompt=negative_prompt, height=height, width=width)


@entry_point("generate")
def main(cfg: DictConfig) -> list[Path]:
    if cfg.model.name != "tiny":  # the SD presets' configs are known without their files (tiny's is in its file)
        check_request(cfg, model_config(cfg))
    out = run_dir()
    model = load_model(cfg)
    request = check_request(cfg, model.config)
    prompts = request["prompts"]
    images = generate(model, prompts, seed=cfg.seed, height=request["height"], width=request["width"],
                      settings=sampler_settings(cfg, model), negative_prompt=request["negative_prompt"],
                      progress=cfg.progress)
    saved = [save_image(image, out / f"{i:02d}_{slug(prompt)}.png") for i, (image, prompt) in enumerate(zip(images, prompts))]
    save_config(cfg, out)
    height, width = images.shape[1:3]
    print(f"wrote {len(saved)} image{'s' if len(saved) != 1 else ''} ({height}×{width}) and config.yaml to {out}")
    return saved


if __name__ == "__main__":
    main()
