"""Prompt-to-Prompt on a self-contained latent-diffusion stack.

`models/` is the network (UNet, VAE, text encoder, DDIM, checkpoint loading);
`p2p/` is the method (editing loop, controllers, inversion, shapes world).
"""

from setuptools import find_packages, setup

setup(
    name="p2p",
    version="0.1.0",
    description="Prompt-to-Prompt image editing with cross-attention control, from scratch",
    packages=find_packages(include=["models", "p2p", "p2p.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",  # open_clip_torch imports it; pinned with torch
        "einops",
        "safetensors",
        "open_clip_torch",
        "numpy",
        "pillow",
        "hydra-core",
        "tqdm",  # progress bars for sampling, inversion and training
        "matplotlib",  # ablation plots
        "sentencepiece",  # T5's tokenizer (SD3 / FLUX), read from the user's spiece.model
    ],
    extras_require={
        # diffusers/transformers are the reference implementations we prove parity against;
        # nbclient runs the notebooks in CI; jupytext reads their percent-format .py sources; ruff keeps the
        # house style (lint and format, tests/test_style.py) without anyone policing it; protobuf lets
        # transformers read a SentencePiece model (the T5 tokenizer test). gradio and gradio_client also here so
        # that CI runs the app's API tests; playwright drives the system's Chromium in the app's browser test (its
        # pip package carries the driver: nothing downloaded at test time); the bench extra's packages so that CI
        # runs PIE-Bench's tests.
        "test": [
            "pytest",
            "diffusers",
            "transformers",
            "nbclient",
            "nbformat",
            "ipykernel",
            "jupytext",
            "ruff",
            "protobuf",
            "gradio>=6,<7",
            "gradio_client>=2",
            "playwright",
            "torchmetrics",
            "hydra-submitit-launcher",
            "timm",
        ],
        # the interactive editor in the browser (scripts/app.py): Gradio, the ecosystem's standard for model demos
        "app": ["gradio>=6,<7", "gradio_client>=2"],
        # PIE-Bench (scripts/benchmark.py): the benchmark's metrics, shards on SLURM or one machine; timm builds
        # DINO ViT-B/8 for the structure distance, transformers CLIP for CLIPScore; diffusers (with transformers'
        # CLIP text encoders) for `scripts/bench.py diffusers=true`, its own pipelines side by side with ours
        "bench": ["torchmetrics", "hydra-submitit-launcher", "timm", "transformers", "diffusers"],
    },
    package_data={"models": ["weights/*.safetensors", "weights/*.md"]},
)
