"""The CUDA paths: AMP, channels_last, compile, NCCL DDP. Skipped on machines without a GPU."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import scsa
from scsa.attention import list_attentions
from scsa.training.precision import Precision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ATTENTIONS = list_attentions()


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_training_step_under_amp_channels_last(attention, amp):
    device = torch.device("cuda")
    model = scsa.create_model("resnet50", attention, num_classes=10).to(device, memory_format=torch.channels_last)
    precision = Precision(amp, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(8, 3, 96, 96, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (8,), device=device)
    for _ in range(2):
        with precision.autocast():
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        precision.scaler.scale(loss).backward()
        precision.scaler.step(optimizer)
        precision.scaler.update()
        optimizer.zero_grad(set_to_none=True)
    assert torch.isfinite(loss)


def test_fast_scsa_matches_reference_on_cuda():
    from tests.reference_scsa import ReferenceSCSA
    torch.manual_seed(0)
    fast = scsa.create_attention("scsa", 64).cuda()
    reference = ReferenceSCSA(64).cuda()
    reference.load_state_dict(fast.state_dict())
    x = torch.randn(2, 64, 13, 17, device="cuda", requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, out_ref = fast(x), reference(x_ref)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["none", "scsa"])
def test_compiled_model_matches_eager(attention):
    model = scsa.create_model("resnet18", attention, num_classes=10).cuda().eval()
    images = torch.randn(4, 3, 64, 64, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(images), model(images), atol=1e-3, rtol=1e-3)


def test_nccl_ddp_step(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        model = scsa.create_model("resnet18", "scsa", num_classes=10).cuda()
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0])
        loss = ddp(torch.randn(4, 3, 64, 64, device="cuda")).logsumexp(1).mean()
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_train_cli_on_gpu(tmp_path, run_cli):
    result = run_cli(["train.py", "data.loader=torch", "trainer.epochs=1", "trainer.max_steps=30",
                      "trainer.amp=bf16", "wandb.mode=disabled", f"hydra.run.dir={tmp_path}/run"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "device=cuda:0" in (tmp_path / "run" / "train.log").read_text()


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("name", ["se", "eca", "cbam", "ca", "ema"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_triton_attention_matches_float64_on_cuda(name, dtype):
    """kernel='triton' at a ResNet-50 stage-3 width (channels_last, odd map) against the eager module in
    float64; bf16/fp16 inputs under autocast."""
    torch.manual_seed(0)
    fast = scsa.create_attention(name, 256, kernel="triton").cuda()
    ref = scsa.create_attention(name, 256, kernel="torch").cuda().double()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(8, 256, 14, 13, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    results = []
    for module, xi, gi in ((fast, x, grad), (ref, x.double(), grad.double())):
        xi = xi.detach().clone().requires_grad_()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32 and module is fast):
            out = module(xi)
        out.backward(gi)
        results.append((out, xi.grad, [p.grad for p in module.parameters()]))
    (out, dx, grads), (ref_out, ref_dx, ref_grads) = results
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    errors = [_rel_err(out, ref_out), _rel_err(dx, ref_dx)] + [_rel_err(g, r) for g, r in zip(grads, ref_grads)]
    assert max(errors) <= tol, errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_auto_kernel_verifies_and_times_both_paths_on_cuda(dtype):
    """kernel=auto at a ResNet-50 stage-2 shape: every Triton path compiles, agrees with eager and is timed;
    the chosen path is the faster one."""
    for name in ("scsa", "se", "eca", "cbam", "ca", "ema"):
        module = scsa.create_attention(name, 128).cuda()
        x = torch.randn(32, 128, 28, 28, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):  # as a bf16 run calls it
            module(x)
        decision = scsa.kernel_decisions()[-1]
        assert decision["module"] == type(module).__name__ and decision["reason"] is None, decision
        assert set(decision["ms"]) == {"triton", "torch"} and decision["chosen"] == min(decision["ms"],
                                                                                         key=decision["ms"].get)
