"""Launches and activation passes per forward + backward of every attention module (issue #13).

    python benchmarks/count_passes.py [--out benchmarks/results/count_passes.json]  # and .md beside it

Counted by ``tests/counting.py`` (its docstring defines both) on the issue's input: B=4, C=64,
56x56, fp32, channels_last; today's eager path (``kernel="torch"``) against the Triton path
(``kernel="triton"``), plus the authors' SCSA transcription (``tests/reference_scsa.py``).
Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors: the counts are the
same, they do not depend on where the kernels run.

A second table asks whether fusing the gate multiply into the block's residual add and ReLU
would pay, for the modules placed at the end of the residual branch (SE, ECA, CBAM): the
passes of attention + add + ReLU, and of a whole ResNet-50 stage-1 bottleneck (256 channels,
56x56; passes over its 256-channel tensors).
"""
import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined

import torch.nn as nn  # noqa: E402

from counting import count  # noqa: E402
from reference_scsa import ReferenceSCSA  # noqa: E402
from scsa.attention import attention_spec, create_attention, default_position, list_attentions  # noqa: E402
from scsa.models.resnet import Bottleneck  # noqa: E402

MODULES = [a for a in list_attentions() if attention_spec(a).takes_kernel]  # with a Triton path to count
END_MODULES = [a for a in MODULES if default_position(a) == "end"]  # their gate meets the residual add


class Tail(nn.Module):
    """``relu(attn(x) + identity)``: the end of a bottleneck with ``end`` attention."""

    def __init__(self, attn: nn.Module, identity: torch.Tensor):
        super().__init__()
        self.attn = attn
        self.identity = nn.Parameter(identity)  # its gradient is the residual branch's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu_(self.attn(x) + self.identity)


def _row(counts) -> dict:
    return {"launches": counts.launches, "passes": counts.passes, "ops": counts.ops}


def module_counts(device: torch.device) -> dict:
    x = torch.randn(4, 64, 56, 56, device=device).contiguous(memory_format=torch.channels_last)
    rows = {"scsa (authors')": {"torch": _row(count(ReferenceSCSA(64).to(device), x))}}
    for name in MODULES:
        rows[name] = {k: _row(count(create_attention(name, 64, kernel=k).to(device), x)) for k in ("torch", "triton")}
    return rows


def block_counts(device: torch.device) -> dict:
    x = torch.randn(4, 256, 56, 56, device=device).contiguous(memory_format=torch.channels_last)
    rows = {"none": {"block": _row(count(Bottleneck(256, 64).to(device), x))}}
    for name in END_MODULES:
        rows[name] = {}
        for k in ("torch", "triton"):
            def factory(c: int, k=k) -> nn.Module:
                return create_attention(name, c, kernel=k)
            block = Bottleneck(256, 64, attn_layer=factory, attn_position=default_position(name)).to(device)
            rows[name][k] = {"tail": _row(count(Tail(factory(256).to(device), torch.randn_like(x)), x)),
                             "attention": _row(count(factory(256).to(device), x)),
                             "block": _row(count(block, x))}
    return rows


def markdown(modules: dict, blocks: dict) -> str:
    lines = ["| module | launches (today) | passes (today) | launches (Triton) | passes (Triton) |",
             "|---|---:|---:|---:|---:|"]
    for name, r in modules.items():
        tri = r.get("triton")
        today = f"| {name} | {r['torch']['launches']} | {r['torch']['passes']:g} |"
        lines.append(today + (f" {tri['launches']} | {tri['passes']:g} |" if tri else " - | - |"))
    lines += ["", "Bottleneck (256 channels, 56x56), passes over its 256-channel tensors:", "",
              "| attention | path | attention | + add + ReLU | whole block |", "|---|---|---:|---:|---:|",
              f"| none | - | - | - | {blocks['none']['block']['passes']:g} |"]
    for name in END_MODULES:
        for k, r in blocks[name].items():
            lines.append(f"| {name} | {k} | {r['attention']['passes']:g} | {r['tail']['passes']:g} | "
                         f"{r['block']['passes']:g} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/count_passes.json"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    modules, blocks = module_counts(device), block_counts(device)
    import triton
    table = markdown(modules, blocks)
    print(table)
    Path(args.out).with_suffix(".md").write_text(table + "\n")
    with open(args.out, "w") as f:
        json.dump({"input": "B=4, C=64, 56x56, fp32, channels_last; blocks: C=256",
                   "device": torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()} CPU "
                   "(Triton interpreter)", "torch": torch.__version__, "triton": triton.__version__,
                   "modules": modules, "blocks": blocks}, f, indent=1)


if __name__ == "__main__":
    main()
