"""Train-loader throughput on CPU: the DALI backend (CPU pipeline) vs the torchvision one.

    python -m benchmarks.bench_loader [--images 1024] [--workers 2] [--repeats 5] [--out results.json]

Both are the project's own train loaders (``data.build_loaders`` with ``conf/data/imagenet.yaml``):
RandomResizedCrop(224, scale 0.08-1) + horizontal flip to uint8, then normalisation to float32
NCHW on the device (here the CPU): DALI with ``workers`` threads, torchvision with ``workers``
DataLoader processes (PIL decode). The JPEGs are ImageNet-sized (500x375): the built-in
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
from typing import Dict, Iterable, List

import numpy as np
import PIL
import torch
import torchvision
from omegaconf import OmegaConf
from PIL import Image

from data import build_loaders
from scsa.analysis.benchmark import cpu_model

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "train"


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


def project_loader(backend: str, root: Path, batch_size: int, workers: int) -> Iterable:
    """The ``backend`` train loader of ``train.py data=imagenet``, one epoch per iteration."""
    cfg = OmegaConf.load(REPO / "conf" / "data" / "imagenet.yaml")
    cfg.update({"root": str(root), "loader": backend, "batch_size": batch_size, "workers": workers})
    train = build_loaders(cfg, rank=0, world_size=1, device=torch.device("cpu"), seed=0, channels_last=False).train
    return EveryEpoch(train)


class EveryEpoch:
    """A train loader that starts its next epoch each time it is iterated."""

    def __init__(self, loader):
        self.loader, self.epoch = loader, 0

    def __iter__(self):
        self.loader.set_epoch(self.epoch)
        self.epoch += 1
        return iter(self.loader)


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
    loaders = {name: project_loader(backend, root, batch_size, workers)
               for name, backend in (("torchvision", "torch"), ("dali-cpu", "dali"))}
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
