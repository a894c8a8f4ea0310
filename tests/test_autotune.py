"""``kernel="auto"``: both paths verified and timed once per case, the faster agreeing one kept
(``scsa.attention.kernels.autotune``).

Without a GPU the Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, the
``interpret`` fixture), where ``auto`` treats CPU tensors like CUDA ones. Most tests replace SE's
Triton path with a stand-in (exact, wrong, or raising) and the timer with fixed times, so they
decide in milliseconds; the interpreted kernels themselves run in the few tests that need them.
"""
import copy
import importlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Dict, List
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import scsa
from scsa.attention import create_attention
from scsa.attention.kernels import autotune
from scsa.complexity import count_macs

pytest.importorskip("triton")
ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
with mock.patch.dict(os.environ, {} if ON_CUDA else {"TRITON_INTERPRET": "1"}):
    se_kernels = importlib.import_module("scsa.attention.kernels.se")

pytestmark = pytest.mark.usefixtures("interpret")


@pytest.fixture(autouse=True)
def fresh_decisions(monkeypatch):
    """Each test starts with no decisions and no agreement hook."""
    monkeypatch.setattr(autotune, "_DECISIONS", {})
    monkeypatch.setattr(autotune, "_agreement", None)


def eager_se(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """SE's formula in plain ops: a stand-in for its Triton path (``scale != 1`` makes it wrong)."""
    a = torch.sigmoid(F.relu(x.mean((2, 3)) @ w1.t()) @ w2.t())
    return x * a[:, :, None, None].to(x.dtype) * scale


class StandIn:
    """Replaces SE's Triton path; counts its calls."""

    def __init__(self, scale: float = 1.0, error: Exception = None):
        self.scale, self.error, self.calls = scale, error, 0

    def __call__(self, x, w1, w2):
        self.calls += 1
        if self.error is not None:
            raise self.error
        return eager_se(x, w1, w2, self.scale)


class Timer:
    """Replaces the timer: fixed ms per path; counts its calls."""

    def __init__(self, **ms: float):
        self.ms, self.calls = ms, 0

    def __call__(self, module, x, grad, path):
        self.calls += 1
        return self.ms[path]


@pytest.fixture
def patch(monkeypatch):
    def apply(stand_in: StandIn, timer: Timer = None):
        monkeypatch.setattr(se_kernels, "se", stand_in)
        if timer is not None:
            monkeypatch.setattr(autotune, "_time_path", timer)
        return stand_in, timer
    return apply


def se_input(b: int = 2, c: int = 16, h: int = 3, w: int = 3) -> torch.Tensor:
    return torch.randn(b, c, h, w, device=DEVICE).contiguous(memory_format=torch.channels_last)


def tiny_model(kernel: str) -> nn.Module:
    """Conv-BN-ReLU, SE, a strided conv, SE, a head: SE meets two cases (16x8x8 and 32x4x4 at 8 px)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         create_attention("se", 16, kernel=kernel), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         create_attention("se", 32, kernel=kernel), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 4)).to(DEVICE)


def sgd_steps(model: nn.Module, steps: int) -> List[float]:
    """``steps`` SGD steps on fixed 8 px batches; the losses."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        images = torch.randn(2, 3, 8, 8, generator=gen).to(DEVICE)
        loss = F.cross_entropy(model(images), torch.tensor([0, 3], device=DEVICE))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_a_raising_triton_path_falls_back_to_eager_with_one_warning_per_case(patch):
    stand_in, _ = patch(StandIn(error=RuntimeError("PTX compile failed\nmore lines")), Timer(triton=1.0, torch=2.0))
    model, eager = tiny_model("auto"), tiny_model("torch")
    with pytest.warns(RuntimeWarning) as caught:
        losses = sgd_steps(model, 2)
    assert losses == sgd_steps(eager, 2)  # bitwise: the same ops ran
    for p, q in zip(model.parameters(), eager.parameters()):
        assert torch.equal(p, q)
    messages = [str(w.message) for w in caught if "kernel=auto" in str(w.message)]
    assert len(messages) == 2 and stand_in.calls == 2  # one try and one warning per case, none at step 2
    assert all("runs the eager path: Triton failed: RuntimeError: PTX compile failed" in m for m in messages)
    assert "SE at 2x16x8x8 (float32, contiguous)" in messages[0]
    assert [d["chosen"] for d in scsa.kernel_decisions()] == ["torch"] * 2


def test_a_disagreeing_triton_path_is_rejected(patch):
    patch(StandIn(scale=1 + 1e-3), Timer(triton=1.0, torch=2.0))
    module = create_attention("se", 16).to(DEVICE)
    x = se_input()
    with pytest.warns(RuntimeWarning, match=r"SE at 2x16x3x3 \(float32, channels_last\) runs the eager path: "
                                            r"Triton disagrees: relative error 1\.00e-03 > 1e-05"):
        out = module(x)
    [decision] = scsa.kernel_decisions()
    assert decision["chosen"] == "torch" and decision["rel_err"] == pytest.approx(1e-3, rel=1e-3)
    module.kernel = "torch"
    assert torch.equal(out, module(x))


@pytest.mark.parametrize("triton_ms, chosen", [(1.0, "triton"), (3.0, "torch")], ids=["faster", "slower"])
def test_the_faster_path_is_chosen(patch, triton_ms, chosen):
    stand_in, timer = patch(StandIn(), Timer(triton=triton_ms, torch=2.0))
    module = create_attention("se", 16).to(DEVICE)
    x = se_input()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when Triton agrees
        module(x)
    [decision] = scsa.kernel_decisions()
    assert decision["chosen"] == chosen and decision["reason"] is None
    assert decision["ms"] == {"triton": triton_ms, "torch": 2.0} and decision["rel_err"] <= 1e-6
    assert timer.calls == 2 * autotune.ROUNDS
    calls = stand_in.calls
    module(x)
    assert stand_in.calls - calls == (chosen == "triton")  # the decided path runs from then on


def test_decisions_are_made_once_per_case(patch):
    _, timer = patch(StandIn(), Timer(triton=1.0, torch=2.0))
    model = tiny_model("auto")
    sgd_steps(model, 1)
    cases = 2
    assert timer.calls == cases * 2 * autotune.ROUNDS and len(scsa.kernel_decisions()) == cases
    sgd_steps(model, 2)
    with torch.no_grad():
        model.eval()(torch.randn(3, 3, 8, 8, device=DEVICE))  # validation at another batch size: the same cases
    assert timer.calls == cases * 2 * autotune.ROUNDS and len(scsa.kernel_decisions()) == cases


def test_a_clear_loser_is_timed_once(patch):
    _, timer = patch(StandIn(), Timer(triton=200.0, torch=2.0))
    create_attention("se", 16).to(DEVICE)(se_input())
    assert timer.calls == 2 and scsa.kernel_decisions()[0]["chosen"] == "torch"


def test_deciding_leaves_batchnorm_statistics_rng_and_grads_alone(monkeypatch):
    """CA's BatchNorm runs in both candidates (its real Triton path, interpreted): after the decision, its
    running statistics, the RNG and the gradients are those of one eager call."""
    monkeypatch.setattr(autotune, "_time_path", Timer(triton=3.0, torch=2.0))
    auto = create_attention("ca", 16).to(DEVICE)
    eager = copy.deepcopy(auto)
    eager.kernel = "torch"
    x = se_input()
    results = []
    for module in (auto, eager):
        torch.manual_seed(5)
        xi = x.clone().requires_grad_()
        module(xi).sum().backward()
        results.append((torch.rand(1), xi.grad, module.state_dict(), [p.grad for p in module.parameters()]))
    [decision] = scsa.kernel_decisions()
    assert decision["chosen"] == "torch" and decision["reason"] is None and decision["rel_err"] <= 1e-5
    (rng, dx, state, grads), (rng_ref, dx_ref, state_ref, grads_ref) = results
    assert torch.equal(rng, rng_ref) and torch.equal(dx, dx_ref)
    for name, value in state.items():
        assert torch.equal(value, state_ref[name]), name
    assert all(torch.equal(g, r) for g, r in zip(grads, grads_ref))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_deciding_inside_activation_checkpointing(patch, reentrant):
    """The first call, which decides, may be a checkpointed forward: the recomputation must match it."""
    patch(StandIn(), Timer(triton=1.0, torch=2.0))
    module = create_attention("se", 16).to(DEVICE)
    eager = copy.deepcopy(module)
    eager.kernel = "torch"
    x, xe = se_input().requires_grad_(), se_input().requires_grad_()
    with torch.no_grad():
        xe.copy_(x)
    checkpoint(module, x, use_reentrant=reentrant).square().sum().backward()
    eager(xe).square().sum().backward()
    assert scsa.kernel_decisions()[0]["chosen"] == "triton"
    torch.testing.assert_close(x.grad, xe.grad, rtol=1e-6, atol=1e-6)
    for p, q in zip(module.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-6)


def test_the_interpreted_kernels_agree_and_lose_to_eager_on_cpu():
    """The real thing, unpatched: Triton's interpreter agrees with eager, and is far slower (one thread: on a
    busy machine, two threads' barriers can stall the eager path's few-microsecond ops for far longer)."""
    if ON_CUDA:
        pytest.skip("the interpreter runs on CPU")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        create_attention("se", 16)(se_input())
    finally:
        torch.set_num_threads(threads)
    [decision] = scsa.kernel_decisions()
    assert decision["chosen"] == "torch" and decision["reason"] is None and decision["rel_err"] <= 1e-5
    assert decision["ms"]["triton"] > decision["ms"]["torch"]
    assert decision["device"] == "cpu (Triton interpreter)" and decision["decide_ms"] > 0


def test_without_the_interpreter_cpu_runs_eager_without_deciding(patch, monkeypatch):
    if ON_CUDA:
        pytest.skip("CPU tensors")
    stand_in, timer = patch(StandIn(), Timer(triton=1.0, torch=2.0))
    monkeypatch.delenv("TRITON_INTERPRET")
    create_attention("se", 16)(se_input())
    assert scsa.kernel_decisions() == [] and stand_in.calls == timer.calls == 0
    with pytest.raises(RuntimeError, match="needs TRITON_INTERPRET=1"):  # triton still insists, loudly
        create_attention("se", 16, kernel="triton")(se_input())


def test_counting_flops_decides_nothing(patch):
    stand_in, timer = patch(StandIn(), Timer(triton=1.0, torch=2.0))
    assert count_macs(tiny_model("auto"), 8) == count_macs(tiny_model("torch"), 8)
    assert scsa.kernel_decisions() == [] and stand_in.calls == timer.calls == 0


def test_tracker_writes_kernels_json_the_table_and_the_wandb_summary(patch, tmp_path, caplog):
    from scsa.training.tracking import Tracker

    class Summary:
        def __init__(self):
            self.values: Dict = {}

        def summary(self, values):
            self.values = values

    patch(StandIn(), Timer(triton=1.0, torch=2.0))
    create_attention("se", 16).to(DEVICE)(se_input())
    wandb_run = Summary()
    with caplog.at_level(logging.INFO, logger="train"):
        Tracker(tmp_path, True, wandb_run).log_kernels(scsa.kernel_decisions())
    assert json.loads((tmp_path / "kernels.json").read_text()) == json.loads(json.dumps(scsa.kernel_decisions()))
    assert "kernel=auto decisions (1 cases" in caplog.text
    assert "| SE | 2x16x3x3 | float32 | channels_last | triton | 1.000 | 2.000 |" in caplog.text
    assert wandb_run.values == {"kernel/SE/2x16x3x3": "triton"}


@pytest.mark.slow
def test_compiled_graph_runs_the_decided_path_as_a_constant(patch, tmp_path, monkeypatch):
    """Decided on an eager call first, the choice is a constant of one full graph; undecided, eager + a warning."""
    from torch._dynamo.testing import CompileCounterWithBackend
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    monkeypatch.setattr(autotune, "_time_path", Timer(triton=1.0, torch=2.0))  # the real (interpreted) kernels
    module = create_attention("se", 16).to(DEVICE)
    x = se_input()
    scsa.decide_kernels(module, x)
    assert scsa.kernel_decisions()[0]["chosen"] == "triton"
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    xc = x.clone().requires_grad_()
    out = compiled(xc)
    out.square().sum().backward()
    targets = {node.target for gm in backend.graphs for node in gm.graph.nodes}
    assert torch.ops.scsa.se_forward.default in targets and backend.frame_count == 1
    xe = x.clone().requires_grad_()
    module.kernel = "torch"
    torch.testing.assert_close(out, module(xe), rtol=1e-5, atol=1e-5)
    module(xe).square().sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-5)

    torch._dynamo.reset()
    other = torch.compile(create_attention("se", 16).to(DEVICE), backend=backend, fullgraph=True)
    with pytest.warns(RuntimeWarning, match="traced by torch.compile at a shape it had not decided"):
        other(se_input(h=5))
    assert len(scsa.kernel_decisions()) == 1  # nothing decided while tracing


def _rank(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks: SE at two shapes; at 3x3 the ranks' timings disagree, at 4x4 Triton fails on rank 1."""
    from scsa.training import distributed
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), TRITON_INTERPRET="1")
    fast = {0: Timer(triton=1.0, torch=2.0), 1: Timer(triton=2.0, torch=1.0)}[rank]
    fails_here = StandIn(error=RuntimeError("no kernel image")) if rank == 1 else StandIn()

    def triton_path(x, w1, w2):
        return (fails_here if x.shape[2] == 4 else StandIn())(x, w1, w2)

    with mock.patch.object(autotune, "_time_path", fast), mock.patch.object(se_kernels, "se", triton_path), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with distributed.process_group("cpu"):
            module = create_attention("se", 16)
            for size in (3, 4):
                module(se_input(h=size, w=size))
            Path(out).write_text(json.dumps(scsa.kernel_decisions()))
    assert not dist.is_initialized() and autotune._agreement is None


@pytest.mark.slow
@pytest.mark.skipif(ON_CUDA, reason="two CPU ranks")
def test_two_gloo_ranks_make_the_same_choice(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outs = [str(tmp_path / f"rank{r}.json") for r in range(2)]
    mp.start_processes(_spawned, args=(port, outs), nprocs=2, start_method="spawn")
    rank0, rank1 = (json.loads(Path(p).read_text()) for p in outs)
    assert [d["chosen"] for d in rank0] == [d["chosen"] for d in rank1] == ["triton", "torch"]
    assert rank1[0]["ms"] == {"triton": 2.0, "torch": 1.0} and rank1[0]["reason"] == "the ranks agreed on triton"
    assert rank0[1]["reason"] == "the ranks agreed on torch" and rank0[1]["ms"]["triton"] == 1.0
    assert rank1[1]["reason"].startswith("Triton failed: RuntimeError: no kernel image")


def _spawned(rank: int, port: int, outs: List[str]) -> None:
    _rank(rank, port, outs[rank])


@pytest.mark.slow
def test_train_run_writes_kernels_json_and_the_log_table(tmp_path, subset, run_cli):
    """train.py with kernel=auto in the interpreter: SE decides its four cases at the first step (eager wins;
    one thread, as in the test above)."""
    root = subset(2, 1, classes=4)
    run_dir = tmp_path / "run"
    result = run_cli(["train.py", "model=resnet18", "attention=se", f"data.root={root}", "data.image_size=32",
                      "data.val_resize=32", "data.batch_size=4", "data.workers=0", "data.loader=torch",
                      "trainer.epochs=1", "attention.kwargs.kernel=auto", "wandb.mode=disabled",
                      f"hydra.run.dir={run_dir}"], env_extra={"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    decisions = json.loads((run_dir / "kernels.json").read_text())
    assert [d["shape"] for d in decisions] == [[4, 64, 8, 8], [4, 128, 4, 4], [4, 256, 2, 2], [4, 512, 1, 1]]
    assert all(d["chosen"] == "torch" and set(d["ms"]) == {"triton", "torch"} for d in decisions)
    log = (run_dir / "train.log").read_text()
    assert "kernel=auto decisions (4 cases" in log and log.count("| SE | 4x") == 4


class Batches(list):
    """Fixed batches as a train loader (the parts of the Loader contract an epoch uses)."""

    def set_epoch(self, epoch: int) -> None:
        pass


@pytest.mark.slow
def test_trainer_decides_before_compiling_and_reports_after_the_first_step(patch, tmp_path, compose_train,
                                                                           monkeypatch):
    from scsa.training.distributed import DistInfo
    from scsa.training.preemption import PreemptionWatcher
    from scsa.training.precision import Precision
    from scsa.training.recipe import build_scheduler
    from scsa.training.tracking import Tracker
    from scsa.training.trainer import Trainer, TrainerConfig
    from scsa.training.wandb_run import WandbRun

    torch._dynamo.reset()
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compile_(model, backend="aot_eager", fullgraph=True))
    patch(StandIn(), Timer(triton=1.0, torch=2.0))
    model = tiny_model("auto")
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(2, 3, 8, 8, generator=gen), torch.tensor([0, 3])) for _ in range(3)]
    cfg = compose_train("trainer.epochs=1", "trainer.compile=true", "schedule=step")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer(TrainerConfig.from_config(cfg.trainer, cfg.checkpoint), model=model, optimizer=optimizer,
                      scheduler=build_scheduler(cfg.schedule, optimizer, 1, len(batches)),
                      criterion=nn.CrossEntropyLoss(), train_loader=Batches(batches), val_loader=[],
                      precision=Precision("none", DEVICE), dist=DistInfo(), device=DEVICE,
                      tracker=Tracker(tmp_path, True, WandbRun("disabled", "p", tmp_path, {}, "n", [])),
                      checkpoint_dir=tmp_path, meta={})
    trainer.wrap()
    watcher = PreemptionWatcher()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no case is traced undecided
        try:
            trainer.train_one_epoch(0, watcher)
        finally:
            watcher.close()
    assert trainer.state.step == 3 and [d["chosen"] for d in scsa.kernel_decisions()] == ["triton"] * 2
    assert json.loads((tmp_path / "kernels.json").read_text()) == json.loads(json.dumps(scsa.kernel_decisions()))
    assert model[1].num_batches_tracked.item() == 3  # the deciding forward left BatchNorm alone
