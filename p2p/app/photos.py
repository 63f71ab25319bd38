"""Photos on the page: upload, caption, invert once (paper §3.3 with Mokady et al. 2023), edit many times.

An inversion goes through the on-disk cache of p2p/real/cache.py (a restarted server reuses it) and is kept in
memory under its cache key, the page's "photo id"; every edit of the photo starts from its x_T and null embeddings.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.errors import UserError, number
from models.stable_diffusion import StableDiffusion
from p2p.interactive import Start
from p2p.pipeline import SamplerSettings, decode, image_size, sample
from p2p.real.cache import cached_invert, inversion_key, model_fingerprint
from p2p.real.images import load_image
from p2p.real.inversion import Inversion, psnr
from p2p.real.photo import InversionSettings

# The page's inversion choices (conf/inversion/*.yaml); null_text_fast first: the default, seconds on the built-in model.
INVERSIONS = {
    "null_text_fast": InversionSettings(method="null_text", init="negative_prompt", tolerance_scale=0.1),
    "null_text": InversionSettings(method="null_text"),
    "negative_prompt": InversionSettings(method="negative_prompt", inner_steps=0),
    "ddim": InversionSettings(method="ddim", inner_steps=0),
}
KEPT_PHOTOS = 8


@dataclass
class Photo:
    key: str  # the inversion cache's key: image, caption, model, steps, guidance, method
    caption: str
    method: str
    settings: SamplerSettings
    original: np.ndarray  # uint8 (H, W, 3) as the model sees it
    reconstruction: np.ndarray  # the caption sampled from the inversion
    inversion: Inversion
    seconds: float
    from_cache: bool

    @property
    def psnr(self) -> float:
        return psnr(self.reconstruction, self.original)

    @property
    def start(self) -> Start:
        embeddings = self.inversion.uncond_embeddings
        return Start(
            photo_key=self.key,
            x_T=self.inversion.x_T,
            uncond_embeddings=tuple(embeddings) if embeddings is not None else None,
        )

    def check(self, source: str, settings: SamplerSettings) -> None:
        """An inversion is valid for its caption, steps and guidance only."""
        if source != self.caption:
            raise UserError(
                f"the photo was inverted with the caption {self.caption!r}, but the source prompt is "
                f"{source!r}; the source must be the caption (or clear the photo id to use seeds)"
            )
        if (settings.steps, settings.guidance) != (self.settings.steps, self.settings.guidance):
            raise UserError(
                f"the photo was inverted for steps={self.settings.steps} guidance={self.settings.guidance}, "
                f"not steps={settings.steps} guidance={settings.guidance}; set those or invert again"
            )


class Photos:
    def __init__(self, model: StableDiffusion, *, cache_dir: str | Path | None):
        self.model, self.cache_dir = model, cache_dir
        self.kept: OrderedDict[str, Photo] = OrderedDict()
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    def invert(self, image_path: str | None, caption: str, *, method: str, steps, guidance) -> Photo:
        if not image_path:
            raise UserError("no photo: upload an image (PNG, JPEG or another format Pillow reads) first")
        caption = (caption or "").strip()
        if not caption:
            raise UserError("the caption is empty; describe the photo (it becomes the source prompt)")
        if method not in INVERSIONS:
            raise UserError(f"inversion {method!r} is not one of {list(INVERSIONS)}")
        height, width = image_size(self.model, None, None)
        original = load_image(image_path, height=height, width=width)
        settings = SamplerSettings(
            steps=number(steps, name="steps", kind=int), guidance=number(guidance, name="guidance")
        )
        chosen = INVERSIONS[method]
        key = inversion_key(
            image=original,
            prompt=caption,
            fingerprint=self.fingerprint(),
            method=chosen.method,
            settings=settings,
            inner_steps=chosen.inner_steps,
            null_init=chosen.init,
            tolerance_scale=chosen.tolerance_scale,
            inversion_guidance=chosen.guidance,
        )
        if key in self.kept:
            return dataclasses.replace(self.kept[key], from_cache=True)
        started = time.perf_counter()
        inversion, from_cache = cached_invert(
            self.model,
            original,
            caption,
            cache_dir=self.cache_dir,
            method=chosen.method,
            settings=settings,
            inner_steps=chosen.inner_steps,
            null_init=chosen.init,
            tolerance_scale=chosen.tolerance_scale,
            inversion_guidance=chosen.guidance,
            progress=True,
        )
        reconstruction = decode(
            self.model,
            sample(
                self.model,
                [caption],
                latent=inversion.x_T,
                settings=settings,
                uncond_embeddings=inversion.uncond_embeddings,
                progress=False,
            ),
        )[0]
        photo = Photo(
            key=key,
            caption=caption,
            method=method,
            settings=settings,
            original=original,
            reconstruction=reconstruction,
            inversion=inversion,
            from_cache=from_cache,
            seconds=inversion.seconds if inversion.seconds is not None else time.perf_counter() - started,
        )
        self.kept[key] = photo
        while len(self.kept) > KEPT_PHOTOS:
            self.kept.popitem(last=False)
        return photo

    def get(self, key: str) -> Photo:
        if key not in self.kept:
            raise UserError(
                f"photo id {key!r} is unknown to this server; invert the photo first (known ids: "
                f"{list(self.kept) or 'none'})"
            )
        return self.kept[key]
