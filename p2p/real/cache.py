"""On-disk cache of inversions, keyed by everything that determines them.

One null-text inversion (minutes on SD) serves many edits of the same photo; the key covers the image
pixels, the caption, the model's weights (a fingerprint), the sampler settings, the method and its
options, so a changed prompt or model never reuses a stale inversion.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.errors import UserError
from models.stable_diffusion import StableDiffusion
from p2p.pipeline import SamplerSettings
from p2p.real.inversion import DDIM_INVERSION_GUIDANCE, Inversion, image_to_tensor, invert

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the stored layout changes


@torch.no_grad()
def model_fingerprint(model: StableDiffusion) -> str:
    """sha256 of the model config and, per tensor, its name, shape, sum and absolute sum (float64)."""
    digest = hashlib.sha256(model.config.to_json().encode())
    for name, tensor in model.state_dict().items():
        t = tensor.double()
        digest.update(f"{name}{tuple(t.shape)}{t.sum().item():.10e}{t.abs().sum().item():.10e}".encode())
    return digest.hexdigest()


def inversion_key(
    *,
    image: np.ndarray,
    prompt: str,
    fingerprint: str,
    method: str,
    settings: SamplerSettings,
    inner_steps: int,
    null_init: str = "empty",
    tolerance_scale: float = 1.0,
    inversion_guidance: float = DDIM_INVERSION_GUIDANCE,
) -> str:
    digest = hashlib.sha256()
    digest.update(f"{image.shape}{image.dtype}".encode() + np.ascontiguousarray(image).tobytes())
    fields = {
        "prompt": prompt,
        "model": fingerprint,
        "method": method,
        "steps": settings.steps,
        "guidance": settings.guidance,
        "offset": settings.offset,
        "inner_steps": inner_steps,
        "format": CACHE_FORMAT,
    }
    # Options added later enter the key only when they differ from their old fixed value: old entries stay valid.
    if method == "null_text":  # only null-text has a starting point and a stopping rule
        fields["null_init"] = null_init
        if tolerance_scale != 1.0:
            fields["tolerance_scale"] = float(tolerance_scale)
    if inversion_guidance != DDIM_INVERSION_GUIDANCE:
        fields["inversion_guidance"] = inversion_guidance
    digest.update(json.dumps(fields, sort_keys=True).encode())
    return digest.hexdigest()[:32]


def save_inversion(inversion: Inversion, path: Path) -> Path:
    tensors = {"x_T": inversion.x_T.detach().cpu().clone()}  # x_T is also the last trajectory entry
    tensors.update({f"trajectory.{i}": z.detach().cpu().clone() for i, z in enumerate(inversion.trajectory)})
    for i, e in enumerate(inversion.uncond_embeddings or []):
        tensors[f"uncond.{i}"] = e.float().contiguous().cpu()
    meta = {
        "method": inversion.method,
        "losses": json.dumps(inversion.losses),
        "inner_steps": json.dumps(inversion.inner_steps),
        "seconds": json.dumps(inversion.seconds),
        "format": str(CACHE_FORMAT),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written under a name of its own, then renamed (atomic): a killed run never leaves a half-written entry,
    # and two runs writing the same entry at once never write into one file.
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def load_inversion(path: Path) -> Inversion:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(str(path))
    count = lambda prefix: sum(1 for k in tensors if k.startswith(prefix))
    uncond = [tensors[f"uncond.{i}"] for i in range(count("uncond."))] or None
    return Inversion(
        x_T=tensors["x_T"],
        trajectory=[tensors[f"trajectory.{i}"] for i in range(count("trajectory."))],
        uncond_embeddings=uncond,
        method=meta["method"],
        losses=json.loads(meta["losses"]),
        inner_steps=json.loads(meta["inner_steps"]),
        seconds=json.loads(meta.get("seconds", "null")),
    )


def _fits(inversion: Inversion, *, method: str, steps: int) -> bool:
    """Whether a loaded entry is the complete inversion its key promises (a hand-edited file may not be)."""
    embeddings = inversion.uncond_embeddings
    return (
        inversion.method == method
        and len(inversion.trajectory) == steps + 1
        and inversion.x_T.shape == inversion.trajectory[-1].shape
        and (embeddings is None) == (method in ("ddim", "direct"))
        and (embeddings is None or len(embeddings) == steps)
    )


def cached_invert(
    model: StableDiffusion,
    image: np.ndarray,
    prompt: str,
    *,
    cache_dir: str | Path | None,
    method: str,
    settings: SamplerSettings,
    inner_steps: int,
    null_init: str = "empty",
    tolerance_scale: float = 1.0,
    inversion_guidance: float = DDIM_INVERSION_GUIDANCE,
    progress: bool = True,
) -> tuple[Inversion, bool]:
    """`p2p.real.inversion.invert` through the cache; returns (inversion, whether it came from the cache).

    An entry that cannot be read (truncated, overwritten, from another version) is logged and recomputed.
    """

    def compute() -> Inversion:
        return invert(
            model,
            image,
            prompt,
            method=method,
            settings=settings,
            inner_steps=inner_steps,
            null_init=null_init,
            tolerance_scale=tolerance_scale,
            inversion_guidance=inversion_guidance,
            progress=progress,
        )

    if cache_dir is None:
        return compute(), False
    if Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise UserError(f"cache_dir {str(cache_dir)!r} is a file; pass a folder, or null for no cache")
    image_to_tensor(image)  # names a wrong image before it is hashed
    key = inversion_key(
        image=image,
        prompt=prompt,
        fingerprint=model_fingerprint(model),
        method=method,
        settings=settings,
        inner_steps=inner_steps,
        null_init=null_init,
        tolerance_scale=tolerance_scale,
        inversion_guidance=inversion_guidance,
    )
    path = Path(cache_dir) / f"{method}-{key}.safetensors"
    if path.exists():
        try:
            cached = load_inversion(path)
        except Exception as err:  # any unreadable file: safetensors, JSON and missing keys raise different types
            log.warning(
                "inversion cache entry %s is unreadable (%s: %s); recomputing it", path, type(err).__name__, err
            )
        else:
            if _fits(cached, method=method, steps=settings.steps):
                return cached, True
            log.warning("inversion cache entry %s is incomplete; recomputing it", path)
    inversion = compute()
    save_inversion(inversion, path)
    return inversion, False
