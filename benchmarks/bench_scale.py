"""Data layer at scale: ImageNet's layout with N images, as a folder and as tar shards, both backends.

    python -m benchmarks.bench_scale [--sizes 10000 50000] [--batches 40] [--workers 2] [--out results.json]

For each size, a synthetic ImageNet-layout tree (1,000 classes, small JPEGs, one val image per
class) is written, then converted (``python -m data.make_shards``, timed). Each (source,
backend) pair then runs ``repeats`` times, each in a fresh process (one rank, ``workers`` DataLoader processes or DALI
threads) that reports:

- start-up: opening the sources alone (``open_sources``: the directory walk, or the manifest and
  tables), then ``build_loaders`` (which opens them again) and the first training batch, from
  that call (imports excluded);
- peak memory of the rank with its workers: the largest sum of their proportional set sizes
  (PSS: pages shared by forked workers counted once), sampled every 20 ms;
- steady img/s over ``batches`` batches after a warm-up of 3.

Page cache warm (the tree was just written): start-up here is CPU work, the part that grows
with the number of files; on a network file system a directory walk costs far more.
"""
import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLASSES = 1000
IMAGE_SIZE = 64       # the crop the loaders produce: small, so start-up and I/O show, not decoding
JPEG_VARIANTS = 64    # distinct small JPEGs cycled through the tree


def make_tree(root: Path, images: int) -> Path:
    """``images`` training JPEGs (96x72, a few KB) spread over 1,000 classes, and one val image per class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    variants = []
    for _ in range(JPEG_VARIANTS):
        base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((96, 72), Image.BICUBIC)
        out = io.BytesIO()
        base.save(out, format="JPEG", quality=90)
        variants.append(out.getvalue())
    for split, count in (("train", images), ("val", CLASSES)):
        for c in range(CLASSES):
            (root / split / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            c = i % CLASSES
            (root / split / f"n{c:08d}" / f"n{c:08d}_{i}.JPEG").write_bytes(variants[i % JPEG_VARIANTS])
    return root


def process_tree_pss(pid: int) -> int:
    """Bytes of PSS of ``pid`` and all its descendants (0 for a process that has gone)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            for line in Path(f"/proc/{current}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return total


def measure(root: str, backend: str, batches: int, workers: int, batch_size: int) -> Dict:
    """In this process: start-up, first batch, peak memory and steady img/s of ``backend`` on ``root``."""
    import torch
    from omegaconf import OmegaConf

    from data import build_loaders, open_sources

    torch.set_num_threads(1)
    peak, running = [0], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], process_tree_pss(os.getpid()))
            time.sleep(0.02)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cfg = OmegaConf.load(REPO / "conf" / "data" / "imagenet.yaml")
    cfg.update({"root": root, "loader": backend, "batch_size": batch_size, "workers": workers,
                "image_size": IMAGE_SIZE, "val_resize": IMAGE_SIZE})
    began = time.perf_counter()
    open_sources(root, ("train", "val"))  # the part that depends on the number of images
    opened = time.perf_counter()
    loaders = build_loaders(cfg, rank=0, world_size=1, device=torch.device("cpu"), seed=0, channels_last=False)
    built = time.perf_counter()
    loaders.train.set_epoch(0)
    stream = iter(loaders.train)
    next(stream)
    first = time.perf_counter()
    for _ in range(3):
        next(stream)
    steady = time.perf_counter()
    for _ in range(batches):
        next(stream)
    rate = batches * batch_size / (time.perf_counter() - steady)
    running[0] = False
    sampler.join()
    return {"open_s": opened - began, "build_s": built - opened, "first_batch_s": first - opened,
            "peak_pss_mb": peak[0] / 2**20, "img_per_s": rate, "train_images": len(loaders.train.backend.order.ids)}


def run_child(root: Path, backend: str, args: argparse.Namespace) -> Dict:
    """Medians over ``args.repeats`` fresh processes (the VM is shared: single runs are noisy)."""
    runs = [_child(root, backend, args) for _ in range(args.repeats)]
    return {k: statistics.median(run[k] for run in runs) for k in runs[0]}


def _child(root: Path, backend: str, args: argparse.Namespace) -> Dict:
    command = [sys.executable, "-m", "benchmarks.bench_scale", "--measure", str(root), backend,
               "--batches", str(args.batches), "--workers", str(args.workers), "--batch-size", str(args.batch_size)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode != 0:
        raise RuntimeError(f"{backend} on {root} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench(size: int, backends: List[str], args: argparse.Namespace) -> Dict:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = make_tree(Path(tmp) / "folder", size)
        began = time.perf_counter()
        subprocess.run([sys.executable, "-m", "data.make_shards", str(folder), str(Path(tmp) / "shards"),
                        "--workers", str(args.workers)], cwd=REPO, check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
        result = {"images": size, "convert_s": time.perf_counter() - began, "runs": {}}
        for source in ("folder", "shards"):
            for backend in backends:
                result["runs"][f"{source}/{backend}"] = run_child(Path(tmp) / source, backend, args)
                print(f"{size} {source}/{backend}: {result['runs'][f'{source}/{backend}']}", flush=True)
    return result


def table(results: List[Dict]) -> str:
    lines = ["| images | source / backend | open sources (s) | build_loaders (s) | to first batch (s) "
             "| peak PSS, rank + workers (MB) | steady img/s |", "|---:|---|---:|---:|---:|---:|---:|"]
    for result in results:
        lines.append(f"| {result['images']:,} | conversion (make_shards, wall) | | {result['convert_s']:.1f} | | | |")
        for name, run in result["runs"].items():
            lines.append(f"| {result['images']:,} | {name} | {run['open_s']:.3f} | {run['build_s']:.2f} | "
                         f"{run['first_batch_s']:.2f} | {run['peak_pss_mb']:.0f} | {run['img_per_s']:.0f} |")
    if len(results) > 1:  # how start-up grows from the smallest size to the largest
        small, large = results[0], results[-1]
        lines.append("")
        growth = {name: large["runs"][name]["open_s"] / small["runs"][name]["open_s"] for name in large["runs"]}
        lines.append(f"{small['images']:,} -> {large['images']:,} images: open sources "
                     + ", ".join(f"{name} {factor:.1f}x" for name, factor in growth.items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000], help="training images")
    parser.add_argument("--backends", nargs="+", default=["torch", "dali"])
    parser.add_argument("--batches", type=int, default=30, help="timed batches per run")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per (source, backend): medians")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader processes / DALI threads / converters")
    parser.add_argument("--tmp", help="where the trees are written (default: the system's temp folder)")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--measure", nargs=2, metavar=("ROOT", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, args.batches, args.workers, args.batch_size)))
        return
    from scsa.analysis.benchmark import cpu_model

    results = [bench(size, args.backends, args) for size in args.sizes]
    env = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": sys.version.split()[0]}
    print(table(results))
    print(", ".join(f"{k} {v}" for k, v in env.items()))
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "env": env,
                                        "results": results}, indent=2))


if __name__ == "__main__":
    main()
