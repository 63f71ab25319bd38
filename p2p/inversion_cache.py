"""On-disk cache of inversions, keyed by everything that determines them.

One null-text inversion (minutes on SD) serves many edits of the same photo; the key covers the image
pixels, the caption, the model's weights (a fingerprint), the sampler settings, the method and its
options, so a changed prompt or model never reuses a stale inversion.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.stable_diffusion import StableDiffusion
from p2p.inversion import Inversion, invert
from p2p.pipeline import SamplerSettings

CACHE_FORMAT = 1  # bump when the stored layout changes


@torch.no_grad()
def model_fingerprint(model: StableDiffusion) -> str:
    """sha256 of the model config and, per tensor, its name, shape, sum and absolute sum (float64)."""
    digest = hashlib.sha256(model.config.to_json().encode())
    for name, tensor in model.state_dict().items():
        t = tensor.double()
        digest.update(f"{name}{tuple(t.shape)}{t.sum().item():.10e}{t.abs().sum().item():.10e}".encode())
    return digest.hexdigest()


def inversion_key(*, image: np.ndarray, prompt: str, fingerprint: str, method: str, settings: SamplerSettings,
                  inner_steps: int, null_init: str = "empty") -> str:
    digest = hashlib.sha256()
    digest.update(str(image.shape).encode() + image.tobytes())
    fields = {"prompt": prompt, "model": fingerprint, "method": method, "steps": settings.steps,
              "guidance": settings.guidance, "offset": settings.offset, "inner_steps": inner_steps,
              "format": CACHE_FORMAT}
    if method == "null_text":  # only null-text has a starting point (kept out of other keys: old entries stay valid)
        fields["null_init"] = null_init
    digest.update(json.dumps(fields, sort_keys=True).encode())
    return digest.hexdigest()[:32]


def save_inversion(inversion: Inversion, path: Path) -> Path:
    tensors = {"x_T": inversion.x_T.detach().cpu().clone()}  # x_T is also the last trajectory entry
    tensors.update({f"trajectory.{i}": z.detach().cpu().clone() for i, z in enumerate(inversion.trajectory)})
    for i, e in enumerate(inversion.uncond_embeddings or []):
        tensors[f"uncond.{i}"] = e.float().contiguous().cpu()
    meta = {"method": inversion.method, "losses": json.dumps(inversion.losses),
            "inner_steps": json.dumps(inversion.inner_steps), "format": str(CACHE_FORMAT)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)  # atomic: a killed run never leaves a half-written cache entry
    return path


def load_inversion(path: Path) -> Inversion:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    count = lambda prefix: sum(1 for k in tensors if k.startswith(prefix))
    uncond = [tensors[f"uncond.{i}"] for i in range(count("uncond."))] or None
    return Inversion(x_T=tensors["x_T"], trajectory=[tensors[f"trajectory.{i}"] for i in range(count("trajectory."))],
                     uncond_embeddings=uncond, method=meta["method"], losses=json.loads(meta["losses"]),
                     inner_steps=json.loads(meta["inner_steps"]))


def cached_invert(model: StableDiffusion, image: np.ndarray, prompt: str, *, cache_dir: str | Path | None,
                  method: str, settings: SamplerSettings, inner_steps: int, null_init: str = "empty",
                  progress: bool = True) -> tuple[Inversion, bool]:
    """`p2p.inversion.invert` through the cache; returns (inversion, whether it came from the cache)."""
    if cache_dir is None:
        return invert(model, image, prompt, method=method, settings=settings, inner_steps=inner_steps,
                      null_init=null_init, progress=progress), False
    key = inversion_key(image=image, prompt=prompt, fingerprint=model_fingerprint(model), method=method,
                        settings=settings, inner_steps=inner_steps, null_init=null_init)
    path = Path(cache_dir) / f"{method}-{key}.safetensors"
    if path.exists():
        return load_inversion(path), True
    inversion = invert(model, image, prompt, method=method, settings=settings, inner_steps=inner_steps,
                       null_init=null_init, progress=progress)
    save_inversion(inversion, path)
    return inversion, False
