"""`train/<class>/*` and `val/<class>/*` trees such as Imagenette or ImageWoof; class ids are the folder names."""

from __future__ import annotations

from pathlib import Path

from data_prep.sources.base import Source, SourceData, Split, register_source
from data_prep.sources.folders import class_folders, list_classes
from repro.errors import UserError


def load(root: Path | None, opts) -> SourceData:
    if root is None:
        raise UserError("imagefolder needs --root: a folder holding train/<class>/ and val/<class>/")
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder root {root} does not exist; pass --root holding train/<class>/ and val/<class>/")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"{root} has no {split}/ folder; expected {root}/train/<class>/ and {root}/val/<class>/")
    class_ids = class_folders(root / "train")
    extra = sorted(set(class_folders(root / "val")) - set(class_ids))
    if extra:
        raise UserError(f"{root / 'val' / extra[0]} has no matching train/{extra[0]}/ folder; "
                        f"val classes must be train classes")
    train_paths, train_labels = list_classes(root / "train", class_ids)
    val_paths, val_labels = list_classes(root / "val", class_ids, allow_missing=True)
    return SourceData(class_ids, list(class_ids), Split(train_labels, paths=train_paths),
                      Split(val_labels, paths=val_paths))


register_source(Source("imagefolder", load, default_res=256, display_name="image folder",
                       imagenet100="when-present",  # Imagenette's and ImageWoof's folders are WNIDs
                       help="any train/<class>/ and val/<class>/ tree of images, such as Imagenette"))
