"""Forward + backward time of each attention module at ResNet-50's four stage shapes, per kernel.

    python benchmarks/bench_modules.py --out bench_modules.json            # CUDA, batch 256, bf16
    python benchmarks/bench_modules.py --device cpu --batch-size 2 --scale 8 --kernels torch   # smoke check

Each module gets the map it sees in a ResNet-50 at its default position (``mid``: the block's
width 64..512; ``end``: its output 256..2048 channels) at 56, 28, 14 and 7 pixels a side,
channels_last, under autocast. Configurations are timed in interleaved rounds (CUDA events on
a GPU) and reported as medians; ``GB/s`` is the activation bytes the path moves (its passes,
counted by tests/counting.py) over that time.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton on CPU tensors: the interpreter, set before any import

from counting import count  # noqa: E402
from scsa.attention import create_attention, default_position  # noqa: E402
from scsa.analysis.benchmark import device_name  # noqa: E402

STAGES = ((64, 56), (128, 28), (256, 14), (512, 7))  # (bottleneck width, map side)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def shape(name: str, stage: int, batch: int, scale: int) -> tuple:
    width, side = STAGES[stage]
    channels = width if default_position(name) == "mid" else 4 * width
    return batch, channels, max(1, side // scale), max(1, side // scale)


def make_step(name: str, kernel: str, size: tuple, dtype: torch.dtype, device: torch.device):
    """A forward + backward of the module on a fixed map; returns (step, module, map)."""
    torch.manual_seed(0)
    module = create_attention(name, size[1], kernel=kernel).to(device)
    x = torch.randn(size, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    grad = torch.randn_like(x)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = module(x)
        out.backward(grad)
        x.grad = None
        for p in module.parameters():
            p.grad = None

    return step, module, x


def timed(step: Callable[[], None], iters: int, device: torch.device) -> float:
    """Seconds per call, CUDA events on a GPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / iters
    begin = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - begin) / iters


def run(args: argparse.Namespace) -> List[Dict]:
    device = torch.device(args.device)
    dtype = DTYPES[args.amp]
    configs = [(s, n, k) for s in range(len(STAGES)) for n in args.modules.split(",") for k in args.kernels.split(",")]
    steps, rows = [], []
    for stage, name, kernel in configs:
        size = shape(name, stage, args.batch_size, args.scale)
        step, module, x = make_step(name, kernel, size, dtype, device)
        timed(step, args.warmup, device)  # compiles the kernels, tunes cudnn
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            counts = count(module, x.detach())
        steps.append(step)
        rows.append({"stage": stage + 1, "module": name, "kernel": kernel, "shape": list(size), "amp": args.amp,
                     "launches": counts.launches, "passes": counts.passes,
                     "map_bytes": x.numel() * x.element_size()})
    seconds: List[List[float]] = [[] for _ in steps]
    for _ in range(args.rounds):
        for i, step in enumerate(steps):
            seconds[i].append(timed(step, args.iters, device))
    for row, times in zip(rows, seconds):
        row["ms"] = 1000 * statistics.median(times)
        row["gb_per_s"] = row["passes"] * row["map_bytes"] / (row["ms"] / 1000) / 1e9
        row["device"] = device_name(device)
    return rows


def markdown(rows: List[Dict]) -> str:
    kernels = sorted({r["kernel"] for r in rows}, key=lambda k: ("torch", "triton", "auto").index(k))
    by_key = {(r["stage"], r["module"], r["kernel"]): r for r in rows}
    head = "| stage | module | shape | " + " | ".join(f"{k} ms | {k} GB/s" for k in kernels)
    lines = [head + (" | torch/triton |" if {"torch", "triton"} <= set(kernels) else " |"),
             "|" + "---|" * (3 + 2 * len(kernels) + ({"torch", "triton"} <= set(kernels)))]
    for stage, name in dict.fromkeys((r["stage"], r["module"]) for r in rows):
        cells = [by_key[(stage, name, k)] for k in kernels]
        line = f"| {stage} | {name} | {'x'.join(map(str, cells[0]['shape']))} | " + " | ".join(
            f"{c['ms']:.3f} | {c['gb_per_s']:.0f}" for c in cells)
        if {"torch", "triton"} <= set(kernels):
            line += f" | {by_key[(stage, name, 'torch')]['ms'] / by_key[(stage, name, 'triton')]['ms']:.2f}x"
        lines.append(line + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", default="scsa,se,eca,cbam,ca,ema")
    parser.add_argument("--kernels", default="torch,triton", help="comma list of torch, triton, auto")
    parser.add_argument("--amp", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--scale", type=int, default=1, help="divide the map sides by this (smoke checks)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=5, help="calls per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench_modules.json")
    args = parser.parse_args()
    rows = run(args)
    print(f"device: {rows[0]['device']}, torch {torch.__version__}, batch {args.batch_size}, {args.amp}, channels_last")
    print(markdown(rows))
    with open(args.out, "w") as f:
        json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
