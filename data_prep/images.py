"""Decoding image files as ImageNet stores them, and the two stored forms (paper crop or capped longer side).

Anything PIL can open becomes RGB: CMYK and greyscale JPEGs, PNGs named .JPEG, palette images. Files that cannot
be decoded raise `SkipImage` with a short reason, which the writer counts and lists in the manifest.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

# ImageNet has a few very large photos; allow them but keep a guard against decompression bombs.
Image.MAX_IMAGE_PIXELS = 1 << 28


class SkipImage(Exception):
    """This file cannot be used; the message is the reason recorded in the manifest."""


def read_image(path: str, res: int) -> Image.Image:
    """Decode `path` to an RGB PIL image, letting libjpeg shrink by up to 8x while staying >= res on both sides."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except PermissionError:
        raise SkipImage("unreadable: permission denied") from None
    except OSError:
        raise SkipImage("unreadable") from None
    if not data:
        raise SkipImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF/ICC chatter from odd files
            im = Image.open(io.BytesIO(data))
            im.draft("RGB", (res, res))  # only JPEG acts on this: decode at a reduced scale, much faster
            return im.convert("RGB")  # convert() forces the full decode, so truncation surfaces here
    except UnidentifiedImageError:
        raise SkipImage("not an image (unknown format)") from None
    except Image.DecompressionBombError:
        raise SkipImage("image too large (over 268M pixels)") from None
    except Exception as e:  # PIL's decoders raise OSError, SyntaxError, struct.error, ... on broken files
        raise SkipImage("truncated image" if "truncated" in str(e).lower() else "cannot decode") from None


def paper_crop(im: Image.Image, res: int) -> np.ndarray:
    """Section 2 of the paper: rescale so the shorter side is `res`, then take the central res x res patch."""
    w, h = im.size
    scale = res / min(w, h)
    nw, nh = max(res, round(w * scale)), max(res, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BILINEAR)  # PIL's bilinear filters when it shrinks (antialias)
    left, top = (nw - res) // 2, (nh - res) // 2
    return np.asarray(im.crop((left, top, left + res, top + res)))


def cap_longer_side(im: Image.Image, res: int) -> np.ndarray:
    """ffcv-imagenet's stored form: keep the aspect ratio, shrink so the longer side is at most `res`."""
    w, h = im.size
    scale = res / max(w, h)
    if scale < 1:
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
    return np.asarray(im)


def to_stored(im: Image.Image, res: int, max_side: bool) -> np.ndarray:
    return cap_longer_side(im, res) if max_side else paper_crop(im, res)


def array_to_stored(img: np.ndarray, res: int, max_side: bool) -> np.ndarray:
    """An in-memory uint8 image (HxW grey or HxWx3) as stored: RGB, resized only when its size differs."""
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)  # FFCV's RGBImageField takes 3 channels only
    h, w = img.shape[:2]
    if (max_side and max(h, w) <= res) or (not max_side and h == w == res):
        return np.ascontiguousarray(img)
    return to_stored(Image.fromarray(img), res, max_side)
