"""Loading real images for inversion (P2P_SPEC §7 "Preprocess"): RGB, crop margins, centre crop, resize."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models.errors import MissingFileError, UserError, WrongTypeError

ImageSource = str | Path | Image.Image | np.ndarray
SIXTEEN_BIT_MAX = 65535  # "I;16…" and "I" images (16-bit PNG, TIFF) are read as 16-bit: 65535 → 255
ARRAY_LAYOUTS = "(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8, uint16, bool or float in [0, 1]"


def load_image(source: ImageSource, *, height: int, width: int, margins=(0, 0, 0, 0)) -> np.ndarray:
    """An image file (or a PIL image, or an array of ARRAY_LAYOUTS) → uint8 (height, width, 3).

    The EXIF orientation is applied first (a phone photo comes out the way viewers show it). Grayscale,
    1-bit, palette, CMYK and other modes are converted to RGB; 16-bit and 32-bit integer images are read as
    16-bit, float images as [0, 1] (as [0, 255] when a value exceeds 1); transparency is composited on white;
    an animated file gives its first frame. `margins` = (left, top, right, bottom) pixels cut off next (the
    reference's `load_512` offsets); then the largest centred crop with the target aspect ratio, resized
    with Lanczos (images smaller than the target are upsampled).
    """
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise UserError(f"{name}={value!r} must be a positive whole number of pixels")
    left, top, right, bottom = _check_margins(margins)
    image = _to_rgb(_open(source))
    if left + right >= image.width or top + bottom >= image.height:
        raise UserError(
            f"margins (left, top, right, bottom)={tuple(margins)} leave nothing of a "
            f"{image.width}×{image.height} image; left + right must be < {image.width} and "
            f"top + bottom < {image.height}"
        )
    image = image.crop((left, top, image.width - right, image.height - bottom))
    target_ratio = width / height
    if image.width / image.height > target_ratio:  # too wide: crop the sides (at least one pixel stays)
        new_width = max(1, round(image.height * target_ratio))
        offset = (image.width - new_width) // 2
        image = image.crop((offset, 0, offset + new_width, image.height))
    else:  # too tall: crop top and bottom
        new_height = max(1, round(image.width / target_ratio))
        offset = (image.height - new_height) // 2
        image = image.crop((0, offset, image.width, offset + new_height))
    return np.asarray(image.resize((int(width), int(height)), Image.LANCZOS), dtype=np.uint8).copy()


def _check_margins(margins) -> tuple[int, int, int, int]:
    explanation = (
        f"margins={margins!r} must be four whole numbers of pixels ≥ 0: (left, top, right, bottom) "
        "cut off before the centre crop"
    )
    if isinstance(margins, (str, bytes)) or not hasattr(margins, "__len__") or len(margins) != 4:
        raise UserError(explanation)
    values = []
    for margin in margins:
        if isinstance(margin, bool) or not isinstance(margin, (int, float, np.integer, np.floating)):
            raise UserError(explanation)
        if not float(margin).is_integer() or margin < 0:
            raise UserError(explanation)
        values.append(int(margin))
    return tuple(values)


def _open(source: ImageSource) -> Image.Image:
    """A loaded PIL image, EXIF orientation applied; files that are no image give a ValueError naming them."""
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, Image.Image):
        return ImageOps.exif_transpose(source)
    if not isinstance(source, (str, Path)):
        raise WrongTypeError(
            f"image source of type {type(source).__name__} is not supported; pass a file path, "
            f"a PIL image or a numpy array {ARRAY_LAYOUTS}"
        )
    path = Path(source).expanduser()  # `image=~/photo.png` on a command line reaches us unexpanded
    if path.is_dir():
        raise UserError(f"image {str(path)!r} is a directory; pass the path of an image file")
    if not path.is_file():
        raise MissingFileError(f"image {str(path)!r} does not exist")
    try:
        with Image.open(path) as opened:
            opened.load()  # reads the whole file now: a truncated file fails here, not later
            return ImageOps.exif_transpose(opened)  # a new image that outlives the file
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as err:
        raise UserError(
            f"cannot read {str(path)!r} as an image ({err}); use a PNG, JPEG or another format Pillow reads"
        ) from err


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))) or 0 in array.shape:
        raise UserError(f"image array of shape {array.shape} is not supported; pass {ARRAY_LAYOUTS}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = np.round(array / SIXTEEN_BIT_MAX * 255).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise UserError(
                f"float image array has values outside [0, 1] (min {np.nanmin(array)}, max "
                f"{np.nanmax(array)}); pass {ARRAY_LAYOUTS}"
            )
        array = np.round(array * 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise UserError(f"image array of dtype {array.dtype} is not supported; pass {ARRAY_LAYOUTS}")
    return Image.fromarray(np.ascontiguousarray(array))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode → RGB: high bit depths scaled to 8 bits, transparency composited on white."""
    if image.mode.startswith("I") or image.mode == "F":  # Pillow's own convert would clip, not scale
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if image.mode == "F":
            scale = 255.0 if values.max(initial=0) <= 1 else 1.0  # [0, 1] floats, else already [0, 255]
        else:
            scale = 255.0 / SIXTEEN_BIT_MAX
        image = Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8))
    if image.has_transparency_data:  # alpha channel, or a palette/colour key marked transparent
        rgba = image.convert("RGBA") if image.mode != "La" else image.convert("LA").convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise UserError(f"cannot convert an image of mode {image.mode!r} to RGB ({err}); save it as RGB") from err
