"""The CUDA paths: AMP, channels_last, compile, NCCL DDP. Skipped on machines without a GPU."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import scsa
from scsa.engine.precision import Precision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ATTENTIONS = ("none", "scsa", "se", "cbam", "eca", "ca", "ema")


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
