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

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from scripts._common import load_model, prompt_list, run_dir, sampler_settings, save_config, save_image, slug  # noqa: E402
from p2p.pipeline import generate  # noqa: E402


@hydra.main(config_path="../conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> list[Path]:
    prompts = prompt_list(cfg.prompts)
    out = run_dir()
    model = load_model(cfg)
    # height/width null: the model's own size; a size the VAE cannot halve evenly raises before sampling
    images = generate(model, prompts, seed=cfg.seed, height=cfg.height, width=cfg.width,
                      settings=sampler_settings(cfg, model), negative_prompt=cfg.negative_prompt,
                      progress=cfg.progress)
    saved = [save_image(image, out / f"{i:02d}_{slug(prompt)}.png") for i, (image, prompt) in enumerate(zip(images, prompts))]
    save_config(cfg, out)
    height, width = images.shape[1:3]
    print(f"wrote {len(saved)} image{'s' if len(saved) != 1 else ''} ({height}×{width}) and config.yaml to {out}")
    return saved


if __name__ == "__main__":
    main()
