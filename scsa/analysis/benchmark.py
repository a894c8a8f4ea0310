"""Training throughput on synthetic data: img/s and peak memory per configuration.

    python -m scsa.analysis.benchmark --models resnet50 --attentions none,se,scsa --amp bf16 \
        --batch-size 256 --channels-last true --compile false,true --kernels torch,triton --out throughput.json

Configurations are timed in interleaved rounds (a noisy machine slows all of them alike)
and reported as medians, with each one's speed relative to attention=none.
"""
import argparse
import functools
import itertools
import json
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import scsa
from scsa.training.distributed import pick_device
from scsa.attention.kernels import KERNELS
from scsa.training.precision import Precision, configure_backends


def bools(text: str) -> List[bool]:
    return [{"true": True, "false": False}[v.strip().lower()] for v in text.split(",")]


def make_step(model_name: str, attention: str, amp: str, channels_last: bool, compile_model: bool,
              batch_size: int, image_size: int, device: torch.device, kernel: str = "auto") -> Callable[[], None]:
    """One SGD training step of the configuration on a fixed synthetic batch; ``kernel`` picks the
    attention's implementation (``auto``, ``triton`` or ``torch``, see ``scsa.attention.kernels``)."""
    kwargs = {} if attention == "none" else {"kernel": kernel}
    return training_step(scsa.create_model(model_name, attention, **kwargs), amp, channels_last, compile_model,
                         batch_size, image_size, device)


def training_step(model: torch.nn.Module, amp: str, channels_last: bool, compile_model: bool, batch_size: int,
                  image_size: int, device: torch.device, num_classes: int = 1000) -> Callable[[], None]:
    """One SGD training step of ``model`` (``num_classes`` outputs) on a fixed synthetic batch."""
    model = model.to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    precision = Precision(amp, device)
    forward = torch.compile(model) if compile_model else model
    images = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, num_classes, (batch_size,), device=device)

    def step() -> None:
        with precision.autocast():
            logits = forward(images)
        loss = F.cross_entropy(logits.float(), labels)
        precision.scaler.scale(loss).backward()
        precision.scaler.step(optimizer)
        precision.scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds per step over ``steps`` steps."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def inference_throughput(model: torch.nn.Module, batch_size: int, image_size: int, precision: Precision,
                         device: torch.device, steps: int = 10, warmup: int = 3) -> float:
    """Images per second of ``model``'s eval-mode forward on a synthetic batch."""
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    model.eval()

    @torch.no_grad()
    def step() -> None:
        with precision.autocast():
            model(images)

    timed(step, warmup, device)
    return batch_size / timed(step, steps, device)


def interleaved(builders: Sequence[Callable[[], Callable[[], None]]], warmup: int, steps: int, rounds: int,
                device: torch.device) -> List[Tuple[float, Optional[float]]]:
    """Median seconds per step and peak GiB (CUDA; else None) of each built step.

    Each step is built and warmed up (compilation, cudnn autotuning) one at a time, then all
    are timed in ``rounds`` interleaved rounds of ``steps`` steps: a noisy machine slows them alike.
    A step's peak is its own: the memory the steps built before it hold is not counted.
    """
    built, peaks = [], []
    for build in builders:
        held = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            held = torch.cuda.memory_allocated(device)
        step = build()
        timed(step, warmup, device)
        built.append(step)
        peaks.append((torch.cuda.max_memory_allocated(device) - held) / 2**30 if device.type == "cuda" else None)
    seconds: List[List[float]] = [[] for _ in built]
    for _ in range(rounds):
        for i, step in enumerate(built):
            seconds[i].append(timed(step, steps, device))
    return [(statistics.median(times), peak) for times, peak in zip(seconds, peaks)]


def run(args: argparse.Namespace) -> List[Dict]:
    device = pick_device(args.device, 0)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    configure_backends(device, deterministic=False)
    kernels = getattr(args, "kernels", "auto").split(",")
    configs = [dict(model=m, attention=a, kernel=None if a == "none" else r, amp=p, channels_last=c, compile=k)
               for m, p, c, k, a, r in itertools.product(
                   args.models.split(","), args.amp.split(","), bools(args.channels_last), bools(args.compile),
                   args.attentions.split(","), kernels)
               if a != "none" or r == kernels[0]]  # attention=none has no kernel: timed once
    builders = [functools.partial(make_step, c["model"], c["attention"], c["amp"], c["channels_last"], c["compile"],
                                  args.batch_size, args.image_size, device, c["kernel"] or "auto") for c in configs]
    results = []
    for config, (median, peak) in zip(configs, interleaved(builders, args.warmup, args.steps, args.rounds, device)):
        results.append({**config, "batch_size": args.batch_size, "image_size": args.image_size,
                        "img_per_s": args.batch_size / median, "ms_per_step": 1000 * median,
                        "peak_mem_gib": peak, "device": device_name(device)})
    for result in results:
        same_setup = [r for r in results if r["attention"] == "none" and all(
            r[k] == result[k] for k in ("model", "amp", "channels_last", "compile"))]
        base = same_setup[0] if same_setup else None
        result["vs_none"] = result["img_per_s"] / base["img_per_s"] if base else None
    return results


def cpu_model() -> str:
    """The CPU's model name as lscpu reports it (``platform.processor()`` is often empty on Linux)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def markdown(results: List[Dict]) -> str:
    lines = ["| model | attention | kernel | amp | channels_last | compile | batch | img/s | vs none | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        peak = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        ratio = f"{r['vs_none']:.3f}" if r["vs_none"] is not None else "-"
        lines.append(f"| {r['model']} | {r['attention']} | {r.get('kernel') or '-'} | {r['amp']} | "
                     f"{r['channels_last']} | {r['compile']} | "
                     f"{r['batch_size']} | {r['img_per_s']:.0f} | {ratio} | {peak} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50")
    parser.add_argument("--attentions", default="none,se,scsa")
    parser.add_argument("--amp", default="bf16", help="comma list of bf16, fp16, none")
    parser.add_argument("--channels-last", default="true", help="comma list of true/false")
    parser.add_argument("--compile", default="false", help="comma list of true/false")
    parser.add_argument("--kernels", default="auto", help="comma list of auto, triton, torch (the attention's "
                        "implementation; see scsa.attention.kernels)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--out", default="throughput.json")
    args = parser.parse_args()
    unknown = sorted(set(args.kernels.split(",")) - set(KERNELS))
    if unknown:
        parser.error(f"unknown --kernels {','.join(unknown)}: use a comma list of {', '.join(KERNELS)}")
    results = run(args)
    print(f"device: {results[0]['device']}, torch {torch.__version__}")
    print(markdown(results))
    with open(args.out, "w") as f:
        json.dump({"torch": torch.__version__, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
