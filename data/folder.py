"""An ImageFolder-layout dataset root (``<split>/<class>/<image>``): checks, classes, file lists,
and ``FolderSource``, a split as the ``data.order.Source`` both backends read.

Both input backends and ``python -m data.scan`` read a root through this module, so they agree
on which files are images, on the class order and on the labels.
"""
from pathlib import Path
from typing import Collection, List, Set, Tuple

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from data.order import sample_ids
from scsa.errors import UserError

IMAGE_EXTENSIONS = IMG_EXTENSIONS  # torchvision's list; PIL and DALI decode all of them
BAD_FILES_LIST = "bad_files.txt"


def is_image(path: "str | Path") -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def class_names(split_dir: Path) -> List[str]:
    """Sorted class folder names: the label order of torchvision's ImageFolder."""
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def check_dataset_root(root: str, splits: Collection[str] = ("train", "val")) -> List[str]:
    """Validate ``root``'s ``splits`` and return their class names, or raise a one-line UserError."""
    path = Path(root)
    if not path.is_dir():
        raise UserError(f"data.root '{root}' does not exist: point data.root at a folder with "
                        f"{' and '.join(f'{s}/' for s in splits)}")
    classes = {}
    for split in splits:
        split_dir = path / split
        if not split_dir.is_dir():
            raise UserError(f"data.root '{root}' has no {split}/ folder: expected {root}/{split}/<class>/<image>")
        classes[split] = class_names(split_dir)
        if not classes[split]:
            raise UserError(f"'{split_dir}' holds no images: expected {split}/<class>/<image>.jpg")
        for name in classes[split]:  # as torchvision's ImageFolder: an empty class is an error, not a class
            if not any(is_image(f) for f in (split_dir / name).iterdir()):
                raise UserError(f"class folder '{split_dir / name}' holds no images: add its images or remove the "
                                f"folder (from every split)")
    first, *others = splits
    for split in others:
        if classes[split] != classes[first]:
            only_first = sorted(set(classes[first]) - set(classes[split]))
            only_other = sorted(set(classes[split]) - set(classes[first]))
            raise UserError(f"{first}/ and {split}/ class folders differ (only in {first}: {only_first[:5]}, "
                            f"only in {split}: {only_other[:5]}): give both splits the same class folders")
    return classes[first]


def read_bad_files(root: str) -> Set[str]:
    """Paths (relative to ``root``) listed as unreadable by ``python -m data.scan``."""
    listing = Path(root) / BAD_FILES_LIST
    if not listing.is_file():
        return set()
    return {line.strip() for line in listing.read_text().splitlines() if line.strip()}


def list_images(root: str, split: str, classes: List[str]) -> Tuple[List[str], List[int]]:
    """``split``'s image paths relative to ``root`` and their labels (indices into ``classes``).

    Files in ``bad_files.txt`` are left out. torchvision's own folder walk, so the order and the
    labels are ImageFolder's.
    """
    skip = read_bad_files(root)
    samples = make_dataset(str(Path(root) / split), {name: i for i, name in enumerate(classes)}, allow_empty=True,
                           is_valid_file=lambda p: is_image(p) and str(Path(p).relative_to(root)) not in skip)
    return [str(Path(p).relative_to(root)) for p, _ in samples], [label for _, label in samples]


class FolderSource:
    """One split of an ImageFolder root as a ``data.order.Source`` (files in ``bad_files.txt`` left out).

    Paths are kept in one NumPy bytes array, not a list of ``str``: forked DataLoader workers then
    share its pages instead of copying them as reference counts change (1.28 M paths on ImageNet).
    """

    def __init__(self, root: str, split: str, classes: List[str]):
        files, labels = list_images(root, split, classes)
        self.root, self.classes, self.groups = Path(root), classes, None
        self.paths = np.array([f.encode() for f in files], dtype=bytes)
        self.ids = sample_ids(files)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, index: int) -> str:
        return self.paths[index].decode()

    def read(self, index: int) -> bytes:
        return (self.root / self.name(index)).read_bytes()
