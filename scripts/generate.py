"""Text to image (issue 2): one PNG per prompt, all prompts from the same seed.

    python scripts/generate.py                                    # the built-in shapes-world model
    python scripts/generate.py prompts='["a blue square on a white background"]' seed=3 steps=25
    python scripts/generate.py model=sd15 model.checkpoint=v1-5-pruned-emaonly.safetensors \
        prompts='["a cat riding a bicycle"]' seed=0 steps=50 guidance=7.5 height=512 width=512 dtype=fp32 device=cpu
    python scripts/generate.py model=sd3-medium model.checkpoint=sd3_medium_incl_clips_t5xxlfp16.safetensors \
        model.t5_tokenizer=tokenizer_3/spiece.model prompts='["a cat riding a bicycle"]' seed=0 steps=28 guidance=7 \
        height=1024 width=1024 weights_dtype=bf16 dtype=fp32
    python scripts/generate.py model=flux-dev model.checkpoint=flux1-dev.safetensors model.vae=ae.safetensors \
        model.text_encoders.clip_l=clip_l.safetensors model.text_encoders.t5xxl=t5xxl_fp16.safetensors \
        model.t5_tokenizer=tokenizer_2/spiece.model prompts='["a cat riding a bicycle"]' device=cuda dtype=bf16

Writes into its own run folder: `{index:02d}_{prompt slug}.png` in prompt order and the resolved `config.yaml`.
The sampling itself is `p2p.pipeline.generate` (DDIM models), the same loop the editing scripts use, or
`p2p.flow.generate` for the rectified-flow presets (sd3-medium, sd35-medium, sd35-large, flux-dev, flux-schnell).
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from models.ddim import ddim_timesteps  # noqa: E402
from models.errors import UserError  # noqa: E402
from models.flow_model import FlowModelConfig  # noqa: E402
from models.stable_diffusion import ModelConfig  # noqa: E402
from models.text import tokenize  # noqa: E402
from p2p import flow  # noqa: E402
from p2p.pipeline import generate  # noqa: E402
from scripts._cli import entry_point  # noqa: E402
from scripts._common import (  # noqa: E402
    DEFAULT_DDIM_STEPS,
    is_flow,
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


def check_request(cfg: DictConfig, config: ModelConfig | FlowModelConfig) -> dict:
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
    if isinstance(config, ModelConfig):
        tokenize([*prompts, negative_prompt], context_length=config.text.context_length)  # over-long prompts raise
        steps = DEFAULT_DDIM_STEPS if cfg.steps is None else cfg.steps
        ddim_timesteps(number(steps, name="steps", kind=int), num_train_timesteps=config.num_train_timesteps)
    else:  # SD3 / FLUX: CLIP's 77 positions bound the prompt; T5 truncates as the reference pipelines do
        tokenize([*prompts, negative_prompt], context_length=77)
        flow.check_negative_prompt(config, negative_prompt)
        if cfg.steps is not None and number(cfg.steps, name="steps", kind=int) < 1:
            raise UserError(f"steps={cfg.steps!r} must be a positive integer")
    return dict(prompts=prompts, negative_prompt=negative_prompt, height=height, width=width)


@entry_point("generate")
def main(cfg: DictConfig) -> list[Path]:
    if cfg.model.name != "tiny":  # the SD presets' configs are known without their files (tiny's is in its file)
        check_request(cfg, model_config(cfg))
    out = run_dir()
    model = load_model(cfg, flow=True)
    request = check_request(cfg, model.config)
    prompts = request["prompts"]
    sample = flow.generate if is_flow(cfg) else generate
    images = sample(
        model,
        prompts,
        seed=cfg.seed,
        height=request["height"],
        width=request["width"],
        settings=sampler_settings(cfg, model),
        negative_prompt=request["negative_prompt"],
        progress=cfg.progress,
    )
    saved = [
        save_image(image, out / f"{i:02d}_{slug(prompt)}.png") for i, (image, prompt) in enumerate(zip(images, prompts))
    ]
    save_config(cfg, out)
    height, width = images.shape[1:3]
    print(f"wrote {len(saved)} image{'s' if len(saved) != 1 else ''} ({height}×{width}) and config.yaml to {out}")
    return saved


if __name__ == "__main__":
    main()
