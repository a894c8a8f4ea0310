"""Benchmark: fast SCSA against the authors' transcription, on CPU.

(a) the SCSA module, forward + backward, at the four ResNet-50 stage shapes (batch 32);
(b) a ResNet-50 training step (batch 8, 224 px) with SCSA, SE or no attention.
Each in fp32 and under bf16 autocast. Variants run interleaved (one call of each per
round) and the median per variant is reported, so slow drifts of a shared machine hit
all variants alike. A benchmark, not a test: nothing is asserted.

    python benchmarks/bench_scsa.py [--quick] [--threads 2] [--channels-last] [--out results.json]
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from reference_scsa import ReferenceSCSA  # noqa: E402
import scsa  # noqa: E402
from scsa.attention import SCSA, register_attention  # noqa: E402
from scsa.analysis.benchmark import cpu_model  # noqa: E402

STAGE_SHAPES = [(32, 64, 56, 56), (32, 128, 28, 28), (32, 256, 14, 14), (32, 512, 7, 7)]
PRECISIONS = ("fp32", "bf16")


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def interleaved(fns: Dict[str, Callable[[], None]], rounds: int, warmup: int,
                budget_s: float = float("inf")) -> Dict[str, float]:
    """Median seconds per call of each function, the functions taking turns.

    Rounds are cut (to no fewer than 3) so that they fit ``budget_s`` at the warm-up's pace.
    """
    start = time.perf_counter()
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    per_round = (time.perf_counter() - start) / max(warmup, 1)
    if budget_s < rounds * per_round:
        rounds = max(3, int(budget_s / per_round))
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def module_step(module: nn.Module, shape, precision: str) -> Callable[[], None]:
    # Under autocast the block before SCSA (conv-bn-relu) hands it a bf16 map.
    x = torch.randn(shape, dtype=torch.bfloat16 if precision == "bf16" else torch.float32, requires_grad=True)
    grad = torch.randn_like(x)

    def step():
        x.grad = None
        with _autocast(precision):
            out = module(x)
        out.backward(grad)
    return step


def bench_modules(rounds: int, warmup: int, precisions: List[str]) -> List[dict]:
    rows = []
    for shape in STAGE_SHAPES:
        for precision in precisions:
            torch.manual_seed(0)
            fast = SCSA(shape[1])
            ref = ReferenceSCSA(shape[1])
            ref.load_state_dict(fast.state_dict())
            t = interleaved({"reference": module_step(ref, shape, precision),
                             "fast": module_step(fast, shape, precision)}, rounds, warmup)
            rows.append(dict(shape=list(shape), precision=precision, reference_ms=t["reference"] * 1e3,
                             fast_ms=t["fast"] * 1e3, ratio=t["fast"] / t["reference"]))
            print(f"  module {shape} {precision}: reference {t['reference'] * 1e3:.1f} ms, "
                  f"fast {t['fast'] * 1e3:.1f} ms, ratio {t['fast'] / t['reference']:.3f}", flush=True)
    return rows


def train_step(model: nn.Module, precision: str, batch: int, channels_last: bool) -> Callable[[], None]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    images = torch.randn(batch, 3, 224, 224).to(memory_format=fmt)
    labels = torch.randint(0, 1000, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        with _autocast(precision):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
    return step


def bench_models(rounds: int, warmup: int, batch: int, channels_last: bool, budget_s: float,
                 precisions: List[str]) -> List[dict]:
    register_attention("scsa_reference", ReferenceSCSA)
    variants = {"none": "none", "scsa": "scsa", "scsa_reference": "scsa_reference", "se": "se"}
    rows = []
    for precision in precisions:
        torch.manual_seed(0)
        steps = {name: train_step(scsa.create_model("resnet50", attention=attn), precision, batch, channels_last)
                 for name, attn in variants.items()}
        t = interleaved(steps, rounds, warmup, budget_s)
        for name in variants:
            rows.append(dict(model=f"resnet50+{name}", precision=precision, batch=batch, channels_last=channels_last,
                             step_ms=t[name] * 1e3, ratio_vs_resnet50=t[name] / t["none"]))
            print(f"  resnet50+{name} {precision}: {t[name] * 1e3:.0f} ms/step, "
                  f"x{t[name] / t['none']:.3f} of resnet50", flush=True)
    return rows


def markdown(result: dict) -> str:
    lines = [f"CPU: {result['cpu']}, {result['threads']} threads; torch {result['torch']}"
             f"{' (--quick)' if result['quick'] else ''}", "",
             "| SCSA forward+backward | precision | reference (ms) | fast (ms) | fast / reference |",
             "|---|---|---:|---:|---:|"]
    for r in result["modules"]:
        lines.append(f"| {tuple(r['shape'])} | {r['precision']} | {r['reference_ms']:.1f} | {r['fast_ms']:.1f} "
                     f"| {r['ratio']:.2f} |")
    fmt = "channels_last" if result["channels_last"] else "NCHW"
    lines += ["", f"| ResNet-50 training step, batch {result['batch']}, 224 px, {fmt} | precision | ms / step "
              "| x ResNet-50 |", "|---|---|---:|---:|"]
    for r in result["models"]:
        lines.append(f"| {r['model']} | {r['precision']} | {r['step_ms']:.0f} | {r['ratio_vs_resnet50']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few rounds: a smoke run, not a measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="batch of the ResNet-50 training step")
    parser.add_argument("--channels-last", action="store_true", help="run the ResNet-50 steps in channels_last")
    parser.add_argument("--budget-s", type=float, default=600,
                        help="time for the timed rounds of each ResNet-50 precision (bf16 is very slow on "
                             "CPUs without native bf16): rounds are cut to fit, to no fewer than 3")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--skip-modules", action="store_true")
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_scsa.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    module_rounds, model_rounds, warmup = (3, 3, 1) if args.quick else (15, 15, 3)
    result = dict(cpu=cpu_model(), threads=args.threads, torch=torch.__version__, quick=args.quick,
                  batch=args.batch, channels_last=args.channels_last, modules=[], models=[])
    if not args.skip_modules:
        print("SCSA module, forward + backward:", flush=True)
        result["modules"] = bench_modules(module_rounds, warmup, args.precisions)
    if not args.skip_models:
        print("ResNet-50 training step:", flush=True)
        result["models"] = bench_models(model_rounds, 1, args.batch, args.channels_last, args.budget_s,
                                        args.precisions)  # one warm-up round: a training step is long
    print()
    print(markdown(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
