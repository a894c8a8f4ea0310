"""Checks on an ImageFolder-layout dataset root (train/<class>/, val/<class>/)."""
from pathlib import Path
from typing import List, Set

from scsa.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
BAD_FILES_LIST = "bad_files.txt"


def class_names(split_dir: Path) -> List[str]:
    """Sorted class folder names: the label order of torchvision's ImageFolder."""
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def check_dataset_root(root: str) -> List[str]:
    """Validate ``root`` and return its class names, or raise a one-line UserError."""
    path = Path(root)
    if not path.is_dir():
        raise UserError(f"data.root '{root}' does not exist: point data.root at a folder with train/ and val/")
    classes = {}
    for split in ("train", "val"):
        split_dir = path / split
        if not split_dir.is_dir():
            raise UserError(f"data.root '{root}' has no {split}/ folder: expected {root}/{split}/<class>/<image>")
        classes[split] = class_names(split_dir)
        if not classes[split] or not any(f.suffix.lower() in IMAGE_EXTENSIONS
                                         for d in classes[split] for f in (split_dir / d).iterdir()):
            raise UserError(f"'{split_dir}' holds no images: expected {split}/<class>/<image>.jpg")
    if classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))
        only_val = sorted(set(classes["val"]) - set(classes["train"]))
        raise UserError(f"train/ and val/ class folders differ (only in train: {only_train[:5]}, "
                        f"only in val: {only_val[:5]}): give both splits the same class folders")
    return classes["train"]


def read_bad_files(root: str) -> Set[str]:
    """Paths (relative to ``root``) listed as unreadable by ``python -m data.scan``."""
    listing = Path(root) / BAD_FILES_LIST
    if not listing.is_file():
        return set()
    return {line.strip() for line in listing.read_text().splitlines() if line.strip()}
