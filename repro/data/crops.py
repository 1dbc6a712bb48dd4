"""Where the train-time random crop lands and whether it is flipped: a pure function of the epoch's crop key and
the sample's id.

Every backend draws from here, so all produce the same crops. The draws come from a counter-based hash
(splitmix64) of the sample id and the epoch's two-word key (repro.data.order.crop_key, spawned from (seed, epoch))
rather than from a global random state: FFCV decodes in numba threads whose random states cannot be seeded. So a
run repeats exactly, a resumed run sees the crops an uninterrupted one would, no two (seed, epoch) pairs share
their draws, and a sample's crop does not depend on which batch or which process it lands in.
The functions are numba-compiled when numba is importable, so the FFCV decoder can call them inside its kernel.
"""

from __future__ import annotations

import numpy as np

try:  # compiled when numba is there (it comes with FFCV); plain numpy otherwise, with the same results
    from numba import njit

    _jit = njit(cache=True)  # module-level functions: the compiled code is cached on disk between processes
except ImportError:  # pragma: no cover - the torch fallback on a machine without FFCV
    def _jit(fn):
        return fn

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S27, _S30, _S31, _S63 = np.uint64(27), np.uint64(30), np.uint64(31), np.uint64(63)
_ONE = np.uint64(1)


@_jit
def mix64(z):
    """splitmix64's finaliser on a uint64 array (wraps modulo 2**64, as intended)."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@_jit
def draw_words(batch_indices, key):
    """Three uint64 random words per image, `(n, 3)`, determined by the epoch's `key` (2 uint64) and each image's
    sample id (array arithmetic: it wraps modulo 2**64 in numpy and numba alike, without overflow warnings)."""
    n = len(batch_indices)
    idx = np.empty(n, dtype=np.uint64)
    for k in range(n):
        idx[k] = np.uint64(batch_indices[k])
    r = mix64(mix64(idx * _GOLDEN + key[0]) ^ key[1])
    out = np.empty((n, 3), dtype=np.uint64)
    for j in range(3):
        out[:, j] = r
        r = mix64(r + _GOLDEN)
    return out


@_jit
def crop_window(words, height, width, crop, res):
    """Top, left and side (in stored pixels) of the crop for one image, from its three random words.

    Fixed-size data (height == width == res): a crop x crop sub-window anywhere in the image, the paper's fixed-size
    random crop. Variable-size data: the same window after an imagined resize of the shorter side to `res` and a
    centre square crop, i.e. a square of side shorter*crop/res inside the centre square (the caller resizes it).
    """
    short = min(height, width)
    side = crop if short == res else max(1, int(round(short * crop / res)))
    span = np.uint64(short - side + 1)
    top = (height - short) // 2 + int(words[0] % span)
    left = (width - short) // 2 + int(words[1] % span)
    return top, left, side


@_jit
def flip_bit(words):
    """True for half of the images: the top bit of the third word."""
    return (words[2] >> _S63) == _ONE


@_jit
def mean_image_box(words, height, width, crop, res):
    """Top, left and side of the crop's window in the mean image (res x res, see `data_prep`'s mean image).

    Fixed-size data: the crop's own window. Images stored with their aspect ratio kept: the mean image holds
    their centre squares at res x res, so the window is mapped into it (scaled by res / shorter side) and its
    side is `crop`, which the mapped side equals up to rounding; the corner is rounded and kept inside.
    """
    top, left, side = crop_window(words, height, width, crop, res)
    short = min(height, width)
    if short == res:
        return top, left, side
    scale = res / short
    top = min(max(int(round((top - (height - short) // 2) * scale)), 0), res - crop)
    left = min(max(int(round((left - (width - short) // 2) * scale)), 0), res - crop)
    return top, left, crop


@_jit
def mean_image_crops(batch_indices, key, heights, widths, crop, res, do_flip):
    """(n, 5) int64 rows (top, left, height, width, flip) of each train crop's window in the mean image, for the
    batch's sample ids and the epoch's crop `key`; `heights`/`widths` (n,) are those images' stored sizes."""
    words = draw_words(batch_indices, key)
    out = np.empty((len(batch_indices), 5), dtype=np.int64)
    for k in range(len(batch_indices)):
        top, left, side = mean_image_box(words[k], heights[k], widths[k], crop, res)
        out[k, 0], out[k, 1], out[k, 2], out[k, 3] = top, left, side, side
        out[k, 4] = 1 if do_flip and flip_bit(words[k]) else 0
    return out


@_jit
def train_crops(batch_indices, key, heights, widths, crop, res, do_flip):
    """Everything a training batch's crops need, in one call: (n, 8) int64 rows (top, left, side, mean-image top,
    mean-image left, mean-image height, mean-image width, flip), the columns of `crop_window`, then those of
    `mean_image_crops` (columns 3-7 are its rows). `heights`/`widths` (n,) are the images' stored sizes."""
    words = draw_words(batch_indices, key)
    out = np.empty((len(batch_indices), 8), dtype=np.int64)
    for k in range(len(batch_indices)):
        out[k, 0], out[k, 1], out[k, 2] = crop_window(words[k], heights[k], widths[k], crop, res)
        top, left, side = mean_image_box(words[k], heights[k], widths[k], crop, res)
        out[k, 3], out[k, 4], out[k, 5], out[k, 6] = top, left, side, side
        out[k, 7] = 1 if do_flip and flip_bit(words[k]) else 0
    return out

