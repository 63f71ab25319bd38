"""Loading real images for inversion (P2P_SPEC §7 "Preprocess"): RGB, crop margins, centre crop, resize."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


def load_image(path: str | Path, *, height: int, width: int, margins: tuple[int, int, int, int] = (0, 0, 0, 0)
               ) -> np.ndarray:
    """Any image file → uint8 (height, width, 3).

    `margins` = (left, top, right, bottom) pixels cut off first (the reference's `load_512` offsets); then the
    largest centred crop with the target aspect ratio, resized with Lanczos. Grayscale and palette images are
    converted to RGB; transparency is composited on white.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    try:
        with Image.open(path) as opened:
            opened.load()
            image = opened
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read {str(path)!r} as an image ({err}); use a PNG, JPEG or another format "
                         "Pillow reads") from err
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("RGB")
    left, top, right, bottom = (int(m) for m in margins)
    if min(left, top, right, bottom) < 0 or left + right >= image.width or top + bottom >= image.height:
        raise ValueError(f"margins (left, top, right, bottom)={margins} do not fit a {image.width}×{image.height} "
                         "image; they must be ≥ 0 and leave at least one pixel")
    image = image.crop((left, top, image.width - right, image.height - bottom))
    target_ratio = width / height
    if image.width / image.height > target_ratio:  # too wide: crop the sides
        new_width = round(image.height * target_ratio)
        offset = (image.width - new_width) // 2
        image = image.crop((offset, 0, offset + new_width, image.height))
    else:  # too tall: crop top and bottom
        new_height = round(image.width / target_ratio)
        offset = (image.height - new_height) // 2
        image = image.crop((0, offset, image.width, offset + new_height))
    return np.asarray(image.resize((width, height), Image.LANCZOS), dtype=np.uint8).copy()
