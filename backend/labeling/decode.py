"""Image bytes → one upright uint8 tensor; the only decode an image gets."""
from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000


class ImageDecodeError(ValueError):
    """The bytes are not an image we can use; the message says why."""


def decoded_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """What ``decode_image`` will allocate for these bytes (from the header only); 0 when it will refuse them."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = image.width * image.height
    except Exception:   # noqa: BLE001 - whatever Pillow raises, decode_image refuses the bytes and allocates nothing
        return 0
    return 3 * pixels if pixels <= max_pixels else 0


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """(3, H, W) uint8 RGB with EXIF orientation applied, as Label Studio displays it.

    The pixel count is checked from the header before decoding, so a decompression bomb costs nothing.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > max_pixels:
                    raise ImageDecodeError(f"image is {image.width}x{image.height} = {image.width * image.height:,} "
                                           f"pixels, above the limit of {max_pixels:,} (MAX_IMAGE_PIXELS)")
                upright = ImageOps.exif_transpose(image).convert("RGB")
                pixels = np.asarray(upright).copy()
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("cannot decode image: not a format Pillow reads (or not an image at all)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise ImageDecodeError(f"cannot decode image: {error}") from None
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
