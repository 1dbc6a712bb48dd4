"""libjpeg-turbo's TurboJPEG API through ctypes, where the system has it (`libturbojpeg.so`); None elsewhere.

Decoding a JPEG straight into a numpy array this way costs about two thirds of PIL's open + convert + asarray on
photo-sized files (the same libjpeg-turbo underneath, without PIL's image object and copies). One decompressor
handle per process: FFCV's writer and torch's DataLoader run their workers as processes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import numpy as np

TJPF_RGB = 0
TJFLAG_FASTDCT = 2048
_state = {"lib": None, "handle": None, "pid": None}


def turbojpeg():
    """This process's (library, decompressor handle), or (None, None) when libturbojpeg is not installed."""
    if _state["pid"] != os.getpid():
        name = ctypes.util.find_library("turbojpeg")
        lib = ctypes.CDLL(name) if name else None
        if lib is not None:
            lib.tjInitDecompress.restype = ctypes.c_void_p
            lib.tjDestroy.argtypes = [ctypes.c_void_p]
            lib.tjDecompressHeader3.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulong,
                                                *[ctypes.POINTER(ctypes.c_int)] * 4]
            lib.tjDecompress2.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p,
                                          ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        _state.update(lib=lib, handle=lib.tjInitDecompress() if lib else None, pid=os.getpid())
    return _state["lib"], _state["handle"]


def _reset() -> None:
    """Drop the handle after a failed call: libjpeg-turbo 2.0 leaves it in a state where the next header read
    returns 0 x 0 and the next decode writes out of bounds."""
    if _state["handle"]:
        _state["lib"].tjDestroy(_state["handle"])
    _state["pid"] = None


def decode_rgb(data: np.ndarray, *, min_side: int = 0, height: int = 0, width: int = 0, flags: int = 0,
               max_pixels: int = 1 << 28) -> np.ndarray | None:
    """JPEG bytes (uint8 array) -> uint8 (H, W, 3) RGB, or None when TurboJPEG is missing or reports any problem
    (not a JPEG, CMYK, truncated: the caller's slower decoder then gives the precise reason).

    `min_side` > 0 lets libjpeg shrink by 2, 4 or 8 in the DCT domain while both sides stay >= min_side (what
    PIL's `draft` does). `height`/`width`, when known, skip reading the header. Images over `max_pixels` give None
    before anything is allocated (the caller's decompression-bomb guard decides).
    """
    lib, handle = turbojpeg()
    if lib is None:
        return None
    src = np.ascontiguousarray(data)
    if not (height and width):
        w, h, subsamp, colorspace = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        if lib.tjDecompressHeader3(handle, src.ctypes.data, src.size, ctypes.byref(w), ctypes.byref(h),
                                   ctypes.byref(subsamp), ctypes.byref(colorspace)) != 0:
            _reset()
            return None
        height, width = h.value, w.value
    if not 0 < height * width <= max_pixels:
        return None
    scale = 1
    while min_side and scale < 8 and -(-height // (2 * scale)) >= min_side and -(-width // (2 * scale)) >= min_side:
        scale *= 2
    height, width = -(-height // scale), -(-width // scale)
    out = np.empty((height, width, 3), dtype=np.uint8)
    if lib.tjDecompress2(handle, src.ctypes.data, src.size, out.ctypes.data, width, 0, height, TJPF_RGB, flags) != 0:
        _reset()
        return None  # errors, and warnings such as a truncated file
    return out
