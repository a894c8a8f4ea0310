"""Regenerate the built-in sample dataset from Fashion-MNIST (MIT licence).

Source: Debian's ``dataset-fashion-mnist`` package (idx files under
/usr/share/datasets/fashion-mnist/). Takes the first N images of each class from the
official train split (for ``train/``) and the official test split (for ``val/``), upscales
them to ``--size`` px and writes them as RGB JPEGs in ImageFolder layout.

    apt-get install dataset-fashion-mnist && python data/sample/make_sample.py
"""
import argparse
import gzip
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat",
           "sandal", "shirt", "sneaker", "bag", "ankle-boot")


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped idx file (the MNIST container format) into a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_split(images: np.ndarray, labels: np.ndarray, out: Path, per_class: int, size: int) -> None:
    for label, name in enumerate(CLASSES):
        folder = out / name
        folder.mkdir(parents=True)
        for n, index in enumerate(np.flatnonzero(labels == label)[:per_class]):
            image = Image.fromarray(images[index]).resize((size, size), Image.BICUBIC).convert("RGB")
            image.save(folder / f"{name}_{n:04d}.jpg", quality=85)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--val-per-class", type=int, default=100)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    for split, prefix, per_class in (("train", "train", args.train_per_class), ("val", "t10k", args.val_per_class)):
        shutil.rmtree(args.out / split, ignore_errors=True)
        images = read_idx(args.source / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(args.source / f"{prefix}-labels-idx1-ubyte.gz")
        write_split(images, labels, args.out / split, per_class, args.size)


if __name__ == "__main__":
    main()
