"""What ``kernel=auto`` decides, and what deciding costs: per attention, a model's first training step
(which decides every case) against its later steps, then the decision table.

    python benchmarks/kernel_decisions.py --model resnet50 --attentions scsa,se,eca,cbam,ca,ema \
        --batch-size 256 --amp bf16 --channels-last true --out kernel_decisions.json        # on a GPU
    TRITON_INTERPRET=1 python benchmarks/kernel_decisions.py --model resnet18 --attentions scsa,se \
        --batch-size 8 --image-size 64 --amp none --out kernel_decisions.json               # on CPU, interpreted

Deciding runs once per process: a step's first call pays it, later ones do not. The overhead is
the first step less the median later step (the first also warms up allocators and caches, so on
a GPU it bounds the cost from above); ``decide s`` is the decisions' own wall time.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import scsa  # noqa: E402
from scsa.analysis.benchmark import device_name, make_step  # noqa: E402
from scsa.attention.kernels.autotune import format_decisions  # noqa: E402
from scsa.training.distributed import pick_device  # noqa: E402
from scsa.training.precision import configure_backends  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--attentions", default="scsa,se,eca,cbam,ca,ema")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--amp", default="bf16", help="bf16 | fp16 | none")
    parser.add_argument("--channels-last", default="true", choices=["true", "false"])
    parser.add_argument("--steps", type=int, default=3, help="later steps timed after the first")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="kernel_decisions.json")
    return parser.parse_args()


def seconds(step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    device = pick_device(args.device, 0)
    configure_backends(device, deterministic=False)
    results = []
    for attention in args.attentions.split(","):
        done = len(scsa.kernel_decisions())
        step = make_step(args.model, attention, args.amp, args.channels_last == "true", False, args.batch_size,
                         args.image_size, device, kernel="auto")
        first = seconds(step, device)
        later = statistics.median(seconds(step, device) for _ in range(args.steps))
        decisions = scsa.kernel_decisions()[done:]
        results.append({"attention": attention, "cases": len(decisions), "first_step_s": first, "step_s": later,
                        "decide_s": sum(d["decide_ms"] for d in decisions) / 1000, "decisions": decisions})
        print(f"{attention}: first step {first:.2f} s, later {later:.3f} s, {len(decisions)} cases", flush=True)
    name = device_name(device)
    print(f"\ndevice: {name}; {args.model}, batch {args.batch_size}, {args.image_size} px, amp {args.amp}, "
          f"channels_last {args.channels_last}")
    print("| attention | cases | first step s | later step s | overhead s | overhead in steps | decide s |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        overhead = r["first_step_s"] - r["step_s"]
        print(f"| {r['attention']} | {r['cases']} | {r['first_step_s']:.3f} | {r['step_s']:.3f} | {overhead:.3f} | "
              f"{overhead / r['step_s']:.1f} | {r['decide_s']:.3f} |")
    print()
    print(format_decisions([d for r in results for d in r["decisions"]]))
    with open(args.out, "w") as f:
        json.dump({"device": name, "config": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
