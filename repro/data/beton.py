"""A pure-numpy reader of FFCV's .beton format, so that a machine without FFCV reads the same files.

Layout (ffcv/types.py, ffcv/reader.py, format version 2): a header, one 1041-byte descriptor per field, a
metadata table (one aligned record per sample, a sub-record per field), the data pages, and at `alloc_table_ptr`
an allocation table of (sample_id, ptr, size) rows. An RGB image's metadata holds its mode (0 jpg, 1 raw),
width, height and the file offset of its bytes; the allocation table gives their length. Only the fields that
`repro prepare-data` writes are understood: ints, floats and RGB images.

JPEGs: FFCV decodes with libjpeg-turbo's fast integer DCT (TJFLAG_FASTDCT), which differs by a few levels from the
accurate DCT that torchvision, PIL and OpenCV use. Where libturbojpeg is installed we call it the same way, so both
backends see identical pixels; elsewhere torchvision.io.decode_jpeg is used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from data_prep.turbojpeg import TJFLAG_FASTDCT, decode_rgb, turbojpeg
from repro.errors import UserError
from repro.hints import prepare_command

FORMAT_VERSION = 2
HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"), ("num_samples", "<u8"),
                   ("alloc_table_ptr", "<u8")], align=True)
FIELD_DESC = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True)
ALLOC = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
RGB_META = np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])
FIELD_META = {0: np.dtype("<f8"), 1: np.dtype("<i8"), 2: RGB_META}  # FloatField, IntField, RGBImageField
JPG, RAW = 0, 1


def decode_jpg(data: np.ndarray, height: int, width: int) -> torch.Tensor:
    """JPEG bytes -> uint8 (3, H, W), decoded as FFCV decodes them when libturbojpeg is available."""
    if turbojpeg()[0] is None:
        return decode_jpeg(torch.from_numpy(np.array(data)), mode=ImageReadMode.RGB)
    out = decode_rgb(data, height=height, width=width, flags=TJFLAG_FASTDCT)
    if out is None:
        raise ValueError("libturbojpeg could not decode an image")
    return torch.from_numpy(out).permute(2, 0, 1)


class BetonReader:
    """Random access to the samples of a .beton: `image(i)` -> uint8 CHW tensor, `labels` -> int64 array."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            header = np.fromfile(self.path, dtype=HEADER, count=1)[0]
            if int(header["version"]) != FORMAT_VERSION:
                raise ValueError(f"format version {int(header['version'])}, expected {FORMAT_VERSION}")
            descs = np.fromfile(self.path, dtype=FIELD_DESC, count=int(header["num_fields"]), offset=HEADER.itemsize)
            names = [bytes(d["name"]).split(b"\0", 1)[0].decode() for d in descs]
            types = [int(d["type_id"]) for d in descs]
            if any(t not in FIELD_META for t in types):
                raise ValueError(f"unsupported field types {types}")
            meta_type = np.dtype([("", FIELD_META[t]) for t in types], align=True)
            self.num_samples = int(header["num_samples"])
            meta = np.fromfile(self.path, dtype=meta_type, count=self.num_samples,
                               offset=HEADER.itemsize + descs.nbytes)
            alloc = np.fromfile(self.path, dtype=ALLOC, offset=int(header["alloc_table_ptr"]))
            if len(meta) != self.num_samples:
                raise ValueError("metadata table is truncated")
        except (OSError, ValueError, IndexError, UnicodeDecodeError) as e:
            raise UserError(f"{self.path}: not a readable .beton file ({e}); "
                            f"run `{prepare_command(self.path.parent, force=True)}`") from None
        fields = {name: meta[f"f{i}"] for i, name in enumerate(names)}
        if "image" not in fields or "label" not in fields or types[names.index("image")] != 2:
            raise UserError(f"{self.path}: expected fields 'image' (RGB) and 'label', found {names}; "
                            f"run `{prepare_command(self.path.parent, force=True)}`")
        self.images_meta = fields["image"]
        self.labels = np.asarray(fields["label"], dtype=np.int64)
        order = np.argsort(alloc["ptr"])
        self._ptrs, self._sizes = alloc["ptr"][order], alloc["size"][order]
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")

    def __len__(self) -> int:
        return self.num_samples

    def raw_bytes(self, i: int) -> np.ndarray:
        ptr = self.images_meta[i]["data_ptr"]
        size = self._sizes[np.searchsorted(self._ptrs, ptr)]
        return self._data[int(ptr):int(ptr) + int(size)]

    def image(self, i: int) -> torch.Tensor:
        """Sample i's stored image as uint8 (3, H, W)."""
        m = self.images_meta[i]
        data = self.raw_bytes(i)
        height, width = int(m["height"]), int(m["width"])
        if int(m["mode"]) == JPG:
            return decode_jpg(data, height, width)
        return torch.from_numpy(np.array(data).reshape(height, width, 3)).permute(2, 0, 1)

    def sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """Heights and widths of all stored images."""
        return self.images_meta["height"].astype(int), self.images_meta["width"].astype(int)
