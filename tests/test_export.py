"""Trained models outside the framework: timm's hub layout (safetensors), ONNX, a detection backbone."""
import itertools
import json
from collections import OrderedDict

import numpy as np
import onnx
import onnxruntime
import pytest
import timm
import torch
import torch.nn as nn

import scsa
from options import packaged_attentions
from scsa.errors import UserError
from scsa.export import (VerificationError, default_export_dir, export_checkpoint, export_onnx, export_safetensors,
                         verify_onnx, verify_safetensors)
from scsa.models import backbone_spec, list_backbones
from scsa.trained import TrainedModel

IMAGENET_MEAN, IMAGENET_STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Norm layers as training leaves them: random affine parameters (the fresh zero-init'd last BNs would
    switch every residual branch, and with it the attention, off) and running statistics measured on a few
    batches, so that eval-mode BN normalises. With arbitrary statistics activations grow layer by layer, the
    gates saturate and a deep random network turns chaotic (ResNet-101 + SE: fp32 and fp64 logits 4 % apart):
    no export check means anything on it."""
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    momenta = {m: m.momentum for m in norms if isinstance(m, nn.BatchNorm2d)}
    with torch.no_grad():
        for m in norms:
            m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)
        for block in model.modules():  # the residual branches' last norms, small as in a trained network
            if hasattr(block, "zero_init_last"):
                block.zero_init_last()
        for m in norms:
            if not m.weight.any():
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) * 0.2 + 0.1)
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # a cumulative average over the batches below
        model.train()
        for _ in range(2):
            model(torch.randn(8, 3, 64, 64, generator=generator))
        for m, momentum in momenta.items():
            m.momentum = momentum
    return model.eval()


def make_trained(backbone: str, attention: str, classes: int = 3, image_size: int = 64,
                 **attention_kwargs) -> TrainedModel:
    """What ``load_trained`` returns for a run of this model (config as a checkpoint stores it)."""
    position = scsa.attention.default_position(attention)
    model = scsa.create_model(backbone, attention, num_classes=classes, **attention_kwargs)
    config = {"model": {"name": backbone, "drop_rate": 0.0},
              "attention": {"name": attention, "position": position, "kwargs": {**attention_kwargs, "kernel": "torch"}},
              "data": {"image_size": image_size, "val_resize": image_size * 8 // 7, "mean": IMAGENET_MEAN,
                       "std": IMAGENET_STD}}
    return TrainedModel(trained_like(model), config, [f"class{i}" for i in range(classes)], {})


def assert_bitwise(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_safetensors_round_trip_through_timm_is_bitwise(tmp_path):
    trained = make_trained("resnet18", "scsa", classes=5, head_num=2, window_size=-1)
    files = export_safetensors(trained, tmp_path)
    config = json.loads(files["config"].read_text())
    assert config["architecture"] == "resnet18_scsa" and config["num_classes"] == 5
    assert config["label_names"] == trained.classes
    assert config["model_args"]["head_num"] == 2 and config["model_args"]["window_size"] == -1
    assert config["model_args"]["position"] == "mid" and "kernel" not in config["model_args"]
    assert config["pretrained_cfg"]["input_size"] == [3, 64, 64] and config["pretrained_cfg"]["mean"] == [0.485, 0.456,
                                                                                                            0.406]
    # the call; the exported head is kept whether num_classes is given or not
    for extra in ({"num_classes": 5}, {}):
        model = timm.create_model("resnet18_scsa", pretrained=True, head_num=2, window_size=-1,
                                  pretrained_cfg_overlay=dict(file=str(files["weights"])), **extra)
        assert_bitwise(model, trained.model)
    hub = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()  # config.json's model_args
    assert_bitwise(hub, trained.model)
    assert hub.pretrained_cfg["label_names"] == trained.classes
    assert timm.data.resolve_data_config({}, model=hub)["input_size"] == (3, 64, 64)
    assert repr(hub) == repr(trained.model)  # the modules' settings too (window_size=-1 has no tensor)
    backbone = timm.create_model(f"local-dir:{tmp_path}", pretrained=True, features_only=True)  # for detection
    assert all(torch.equal(v, trained.model.state_dict()[k]) for k, v in backbone.state_dict().items())


def test_a_new_head_is_fresh_as_timm_does_for_fine_tuning(tmp_path):
    trained = make_trained("mobilenetv2", "eca", classes=3)
    files = export_safetensors(trained, tmp_path)
    model = timm.create_model("mobilenetv2_eca", pretrained=True, num_classes=7,
                              pretrained_cfg_overlay=dict(file=str(files["weights"])))
    want = trained.model.state_dict()
    got = model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want if not k.startswith("fc."))
    assert got["fc.weight"].shape == (7, 1280)


def test_a_resnet_without_attention_exports_as_timms_own(tmp_path):
    trained = make_trained("resnet18", "none")
    files = export_safetensors(trained, tmp_path)
    assert json.loads(files["config"].read_text())["architecture"] == "resnet18"
    # timm's own cfg says 1000 classes: the overlay names the file's, or timm starts a fresh head
    model = timm.create_model("resnet18", pretrained=True, num_classes=3,
                              pretrained_cfg_overlay=dict(file=str(files["weights"]), num_classes=3))
    assert_bitwise(model, trained.model)
    assert_bitwise(timm.create_model(f"local-dir:{tmp_path}", pretrained=True), trained.model)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", list_backbones())
def test_every_backbone_without_attention_exports_as_its_timm_twin(tmp_path, backbone):
    trained = make_trained(backbone, "none")
    files = export_safetensors(trained, tmp_path)
    assert json.loads(files["config"].read_text())["architecture"] == backbone_spec(backbone).timm_plain
    verify_safetensors(tmp_path, trained.model)  # timm's own model gives back every tensor, bit for bit


def test_a_mobilenetv2_without_attention_exports_as_timms_own_under_its_names(tmp_path):
    trained = make_trained("mobilenetv2", "none")
    export_safetensors(trained, tmp_path)
    verify_safetensors(tmp_path, trained.model)  # tensor by tensor, in module order
    model = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert model.pretrained_cfg["architecture"] == "mobilenetv2_100" and "conv_stem.weight" in model.state_dict()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(images), trained.model(images), rtol=0, atol=1e-6)


def test_bad_format_and_unwritable_folder_name_the_fix(tmp_path):
    with pytest.raises(UserError, match="unknown export format 'tflite': use export=safetensors or export=onnx"):
        export_checkpoint(str(tmp_path / "best.pt"), "tflite")
    file = tmp_path / "file"
    file.write_text("")
    checkpoint = tmp_path / "best.pt"
    torch.save({"config": make_trained("resnet18", "se").config, "model": {}, "classes": ["a"]}, checkpoint)
    with pytest.raises(UserError, match="cannot create the export folder .* pass export.out=<a writable folder>"):
        export_checkpoint(str(checkpoint), "safetensors", out=str(file / "sub"))
    assert default_export_dir(checkpoint, ema=True) == tmp_path / "best_ema_export"


def run_onnx(path, images: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.numpy()})[0]


def input_dims(path) -> list:
    """The input's axes as the file declares them: a name where dynamic, a size where fixed."""
    return [d.dim_param or d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]


@pytest.mark.parametrize("max_pool", [False, True])
def test_scsas_export_pooling_equals_torchs_at_every_window(max_pool):
    """Under export SCSA pools through size-following masks (ONNX pools take a fixed kernel): the same windows,
    whole ones only, as F.avg_pool2d/max_pool2d, also where the window shrinks to a small map."""
    from scsa.attention.scsa import SCSA, _window_pool_any_size
    pool = torch.nn.functional.max_pool2d if max_pool else torch.nn.functional.avg_pool2d
    module = SCSA(8, window_size=7)
    for h, w in ((16, 16), (13, 20), (7, 7), (5, 9), (3, 30)):
        x = torch.randn(2, 8, h, w)
        window = module.pool_window(h, w)
        torch.testing.assert_close(_window_pool_any_size(x, window, max_pool), pool(x, window, window))


@pytest.mark.slow
@pytest.mark.parametrize("attention", scsa.list_attentions())
def test_onnx_matches_pytorch_for_every_attention(tmp_path, attention):
    trained = make_trained("resnet18", attention, classes=10, image_size=64)
    exported = export_onnx(trained, tmp_path)
    assert exported.max_abs_diff <= 1e-4 and exported.verified_sizes == [(64, 64), (96, 128)]
    assert input_dims(exported.path) == ["batch", 3, "height", "width"]
    assert exported.opset == 18 == onnx.load(str(exported.path)).opset_import[0].version
    for n, height, width in ((1, 64, 64), (5, 72, 40)):  # two image sizes besides the export's own checks
        images = torch.randn(n, 3, height, width)
        with torch.no_grad():
            want = trained.model(images).numpy()
        assert np.abs(want).max() > 0.1  # logits large enough for 1e-4 to mean something
        np.testing.assert_allclose(run_onnx(exported.path, images), want, rtol=0, atol=1e-4)


# SCSA, EMA and CA take minutes to export on the deep backbones; their graphs do not depend on the backbone, and
# test_onnx_matches_pytorch_for_every_attention exports each of them at two sizes.
CHEAP_TO_EXPORT = [m for m in packaged_attentions() if m not in ("none", "scsa", "ema", "ca")]


@pytest.mark.slow
@pytest.mark.parametrize("backbone,attention", list(zip(list_backbones(), itertools.cycle(CHEAP_TO_EXPORT))))
def test_onnx_matches_pytorch_for_every_backbone(tmp_path, backbone, attention):
    """Each backbone with one attention module, verified at 32 px and 64 x 96 within 1e-4."""
    exported = export_onnx(make_trained(backbone, attention, classes=10, image_size=32), tmp_path)
    assert exported.max_abs_diff <= 1e-4 and len(exported.verified_sizes) == 2


@pytest.mark.slow
def test_onnx_with_a_fixed_size_and_verification_failing_loudly(tmp_path):
    trained = make_trained("resnet18", "eca", image_size=32)
    exported = export_onnx(trained, tmp_path, dynamic_size=False)
    assert input_dims(exported.path) == ["batch", 3, 32, 32] and exported.verified_sizes == [(32, 32)]
    trained_like(trained.model, seed=1)  # PyTorch's weights move on: the file no longer matches them
    with pytest.raises(VerificationError, match="differs from PyTorch's outputs by up to .* do not deploy it"):
        verify_onnx(exported.path, trained.model, torch.randn(2, 3, 32, 32))


class TimmFPN(nn.Module):
    """torchvision's FPN over a timm ``features_only`` backbone: what torchvision's detectors take."""

    def __init__(self, name: str, out_channels: int = 64):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
        self.body = timm.create_model(name, features_only=True, out_indices=(1, 2, 3, 4))
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), out_channels, LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


@pytest.mark.slow
def test_faster_rcnn_on_a_resnet50_scsa_feature_backbone_trains_on_cpu():
    from torchvision.models.detection import FasterRCNN
    torch.manual_seed(0)
    backbone = TimmFPN("resnet50_scsa")
    trained_like(backbone.body)  # as an ImageNet checkpoint would be: the residual branches (and attention) on
    detector = FasterRCNN(backbone, num_classes=3, min_size=96, max_size=96,
                          rpn_batch_size_per_image=32, box_batch_size_per_image=32)
    images = [torch.rand(3, 96, 80), torch.rand(3, 72, 96)]
    targets = []
    for _ in images:
        corners = torch.rand(2, 2, 2) * 60
        boxes = torch.cat([corners.min(1).values, corners.max(1).values + 8], 1)  # x1 y1 x2 y2, non-empty
        targets.append({"boxes": boxes, "labels": torch.randint(1, 3, (2,))})
    losses = detector.train()(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    attention_grads = [p.grad for n, p in detector.named_parameters() if ".attn." in n]
    assert attention_grads and all(g is not None and torch.isfinite(g).all() for g in attention_grads)
    assert any(g.abs().sum() > 0 for g in attention_grads)
    with torch.no_grad():
        detections = detector.eval()(images)
    assert len(detections) == 2 and detections[0]["boxes"].shape[1] == 4


@pytest.mark.slow
def test_evaluate_exports_a_trained_checkpoint(tmp_path, subset, run_cli):
    """train.py, then evaluate.py export=... on its checkpoint (SCSA's export: the tests above)."""
    run_dir = tmp_path / "run"
    trained = run_cli(["train.py", "model=resnet18", "attention=eca", f"data.root={subset(4, 2, classes=3)}",
                       "data.image_size=32", "data.val_resize=32", "data.batch_size=4", "data.workers=0",
                       "data.loader=torch", "trainer.epochs=1", "trainer.model_ema=true", "wandb.mode=disabled",
                       f"hydra.run.dir={run_dir}"])
    assert trained.returncode == 0, trained.stderr[-3000:]
    checkpoint_path = run_dir / "checkpoints" / "last.pt"
    checkpoint = torch.load(checkpoint_path, weights_only=True)

    def export(*overrides):
        return run_cli(["evaluate.py", f"checkpoint={checkpoint_path}", *overrides,
                        f"hydra.run.dir={tmp_path / 'evaluate'}"])

    result = export("export=safetensors", "ema=true", f"export.out={tmp_path / 'ema'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["out"] == str(tmp_path / "ema")
    model = timm.create_model("resnet18_eca", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "ema" / "model.safetensors")))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in checkpoint["model_ema"].items())
    assert not torch.equal(checkpoint["model"]["fc.weight"], checkpoint["model_ema"]["fc.weight"])

    result = export("export=onnx")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    onnx_file = run_dir / "checkpoints" / "last_export" / "model.onnx"
    assert report["files"] == [str(onnx_file)] and report["opset"] == onnx.load(str(onnx_file)).opset_import[0].version
    assert report["dynamic_axes"] == ["batch", "height", "width"] and report["verified_sizes"] == [[32, 32], [64, 96]]
    assert report["max_abs_diff"] <= 1e-4 and "opset 18, dynamic batch/height/width" in result.stdout

    # torch 2.14's converter has no way down to 17 for this model: it writes 18, which must not pass for 17
    result = export("export=onnx", "export.opset=17", f"export.out={tmp_path / 'opset17'}")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: torch's ONNX exporter cannot write opset 17")
    assert not (tmp_path / "opset17" / "model.onnx").exists() and "opset" not in result.stdout

    result = export("export=onnx", f"export.out={checkpoint_path}/sub")  # under a file
    assert result.returncode == 2 and "cannot create the export folder" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
