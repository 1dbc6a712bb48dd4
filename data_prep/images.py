"""Decoding image files as ImageNet stores them, and the two stored forms (paper crop or capped longer side).

Anything PIL can open becomes RGB: CMYK and greyscale JPEGs, PNGs named .JPEG, palette images. Files that cannot
be decoded raise `SkipImage` with a short reason, which the writer counts and lists in the manifest.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from data_prep.turbojpeg import decode_rgb

# ImageNet has a few very large photos; allow them but keep a guard against decompression bombs.
Image.MAX_IMAGE_PIXELS = 1 << 28


class SkipImage(Exception):
    """This file cannot be used; the message is the reason recorded in the manifest."""


def _pil_decode(data: bytes, res: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF/ICC chatter from odd files
            im = Image.open(io.BytesIO(data))
            im.draft("RGB", (res, res))  # only JPEG acts on this: decode at a reduced scale, much faster
            return np.asarray(im.convert("RGB"))  # convert() forces the full decode, so truncation surfaces here
    except UnidentifiedImageError:
        raise SkipImage("not an image (unknown format)") from None
    except Image.DecompressionBombError:
        raise SkipImage("image too large (over 268M pixels)") from None
    except Exception as e:  # PIL's decoders raise OSError, SyntaxError, struct.error, ... on broken files
        raise SkipImage("truncated image" if "truncated" in str(e).lower() else "cannot decode") from None


def read_image(path: str, res: int) -> np.ndarray:
    """Decode `path` to uint8 RGB (H, W, 3), letting libjpeg shrink by up to 8x while staying >= res on both sides.

    JPEGs go through TurboJPEG when it is installed (no PIL image object in between); anything else, and any JPEG
    TurboJPEG rejects (CMYK, truncated), through PIL, which also names what is wrong with a bad file.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except PermissionError:
        raise SkipImage("unreadable: permission denied") from None
    except OSError:
        raise SkipImage("unreadable") from None
    if not data:
        raise SkipImage("empty file")
    if data[:2] == b"\xff\xd8":
        img = decode_rgb(np.frombuffer(data, np.uint8), min_side=res, max_pixels=Image.MAX_IMAGE_PIXELS)
        if img is not None:
            return img
    return _pil_decode(data, res)


def resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL's antialiased bilinear resize (the same numbers within rounding), through torch's uint8 kernel, which
    is about three times faster than PIL's or OpenCV's area resize on photo-sized images."""
    if img.shape[:2] == (height, width):
        return img
    if not img.flags.writeable:  # np.asarray of a PIL image is read-only; torch wants to own writable memory
        img = img.copy()
    x = torch.from_numpy(img).permute(2, 0, 1)  # HWC memory seen as CHW: torch's channels-last fast path
    out = TF.resize(x, [height, width], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return np.ascontiguousarray(out.permute(1, 2, 0).numpy())


def paper_crop(img: np.ndarray, res: int) -> np.ndarray:
    """Section 2 of the paper: rescale so the shorter side is `res`, then take the central res x res patch."""
    h, w = img.shape[:2]
    scale = res / min(w, h)
    nw, nh = max(res, round(w * scale)), max(res, round(h * scale))
    img = resize(img, nh, nw)
    left, top = (nw - res) // 2, (nh - res) // 2
    return np.ascontiguousarray(img[top:top + res, left:left + res])


def cap_longer_side(img: np.ndarray, res: int) -> np.ndarray:
    """ffcv-imagenet's stored form: keep the aspect ratio, shrink so the longer side is at most `res`."""
    h, w = img.shape[:2]
    scale = res / max(w, h)
    if scale < 1:
        img = resize(img, max(1, round(h * scale)), max(1, round(w * scale)))
    return img


def to_stored(img: np.ndarray, res: int, max_side: bool) -> np.ndarray:
    return cap_longer_side(img, res) if max_side else paper_crop(img, res)


def array_to_stored(img: np.ndarray, res: int, max_side: bool) -> np.ndarray:
    """An in-memory uint8 image (HxW grey or HxWx3) as stored: RGB, resized only when its size differs."""
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)  # FFCV's RGBImageField takes 3 channels only
    h, w = img.shape[:2]
    if (max_side and max(h, w) <= res) or (not max_side and h == w == res):
        return np.ascontiguousarray(img)
    return to_stored(np.ascontiguousarray(img), res, max_side)
