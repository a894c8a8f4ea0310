"""Train-loader throughput on CPU: DALI (CPU pipeline) vs torchvision, same JPEGs, same augmentation.

    python -m benchmarks.bench_loader [--images 1024] [--workers 2] [--repeats 5] [--out results.json]

Both run RandomResizedCrop(224, scale 0.08-1) + horizontal flip + normalisation to float NCHW
batches: DALI with ``workers`` threads, torchvision as ImageFolder + DataLoader with ``workers``
processes (PIL decode, ToTensor, Normalize). The JPEGs are ImageNet-sized (500x375): the built-in
sample images upscaled with photo-like grain, or ``--data`` (an ImageFolder root). Epochs of the
two loaders alternate after a warm-up epoch each; the table gives medians of steady-state rates.
"""
import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from data.dali import build_dali_loaders
from scsa.benchmark import cpu_model

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "train"


def make_jpegs(root: Path, count: int, size=(500, 375), classes: int = 8) -> Path:
    """``count`` ImageNet-sized JPEGs in ``root/train/<class>/`` (sample images, else smooth noise)."""
    rng = np.random.default_rng(0)
    sources = sorted(SAMPLE.glob("*/*.jpg"))[::50] if SAMPLE.is_dir() else []
    for i in range(count):
        if sources:
            base = Image.open(sources[i % len(sources)]).convert("RGB").resize(size, Image.BICUBIC)
        else:
            base = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        grain = rng.normal(0, 8, (size[1], size[0], 3))
        pixels = np.clip(np.asarray(base, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
        folder = root / "train" / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    (root / "val").mkdir(exist_ok=True)
    for c in range(classes):  # the DALI builder also opens val/: one image per class is enough
        folder = root / "val" / f"class{c}"
        folder.mkdir(exist_ok=True)
        Image.new("RGB", size).save(folder / "0.jpg")
    return root


def torchvision_loader(root: Path, batch_size: int, workers: int) -> DataLoader:
    transform = transforms.Compose([
        transforms.RandomResizedCrop(224, antialias=True), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize([m / 255 for m in MEAN], [s / 255 for s in STD])])
    return DataLoader(datasets.ImageFolder(str(root / "train"), transform), batch_size=batch_size, shuffle=True,
                      num_workers=workers, persistent_workers=True)


def dali_loader(root: Path, batch_size: int, workers: int) -> Iterable:
    train, _ = build_dali_loaders(str(root), batch_size=batch_size, image_size=224, val_resize=256, mean=MEAN,
                                  std=STD, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, workers=workers,
                                  rank=0, world_size=1, device=torch.device("cpu"), seed=0)
    return train


def epoch_rate(loader: Iterable, skip: int = 2) -> float:
    """Steady-state images per second over one epoch, from its ``skip``-th batch on.

    Skipping the first batches leaves out the pipeline fill, and the head start DALI gets by
    prefetching the next epoch while the other loader runs.
    """
    images, start = 0, None
    for i, (batch, _) in enumerate(loader):
        if i == skip:
            start = time.perf_counter()
        elif i > skip:
            images += batch.shape[0]
    return images / (time.perf_counter() - start)


def run(root: Path, batch_size: int, workers: int, repeats: int) -> Dict[str, List[float]]:
    builders: Dict[str, Callable] = {"torchvision": torchvision_loader, "dali-cpu": dali_loader}
    loaders = {name: build(root, batch_size, workers) for name, build in builders.items()}
    for loader in loaders.values():
        epoch_rate(loader)  # warm-up: worker start, page cache, DALI buffers
    rates: Dict[str, List[float]] = {name: [] for name in loaders}
    for _ in range(repeats):
        for name, loader in loaders.items():
            rates[name].append(epoch_rate(loader))
    return rates


def table(rates: Dict[str, List[float]]) -> str:
    baseline = statistics.median(rates["torchvision"])
    lines = ["| loader | img/s (median) | min | max | vs torchvision |", "|---|---:|---:|---:|---:|"]
    for name, values in rates.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.0f} | {min(values):.0f} | {max(values):.0f} | {median / baseline:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="ImageFolder root with train/ and val/ (default: generated)")
    parser.add_argument("--images", type=int, default=1024, help="JPEGs to generate")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DALI threads / DataLoader processes")
    parser.add_argument("--repeats", type=int, default=7, help="timed epochs per loader")
    parser.add_argument("--out", type=Path, help="write the raw rates and environment as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the main process only collates; keep it off the workers' cores
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or make_jpegs(Path(tmp), args.images)
        rates = run(root, args.batch_size, args.workers, args.repeats)
    env = {"cpu": cpu_model(), "cores": torch.multiprocessing.cpu_count(), "python": platform.python_version(),
           "torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__,
           "dali": __import__("nvidia.dali", fromlist=["__version__"]).__version__}
    print(table(rates))
    print(", ".join(f"{k} {v}" for k, v in env.items()))
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "env": env,
                                        "img_per_s": rates}, indent=2))


if __name__ == "__main__":
    main()
