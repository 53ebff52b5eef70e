"""DeepLabV1-ResNet38: reference key names/shapes, output size, determinism, head init."""
from __future__ import annotations


import pytest
import torch

from network.deeplab import DeepLabV1
from network.weights import start_from_weights
from tests.reference_data import reference_keys

REFERENCE_MODEL = "semantic-segmentation-codebase deeplabv1 (backbone resnet38, seamv1-pseudovoc)"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_state_dict_matches_reference_keys_and_shapes() -> None:
    reference = reference_keys(REFERENCE_MODEL)
    # The meta device allocates no memory: the 124M-parameter model builds in a blink.
    with torch.device("meta"):
        model = DeepLabV1(num_classes=20, width_mult=1.0)
    ours = {key: list(tensor.shape) for key, tensor in model.state_dict().items()}
    assert len(reference) == 242
    assert list(ours) == list(reference)  # same names, same order
    assert ours == reference
    parameters = sum(p.numel() for k, p in model.state_dict().items()
                     if not k.endswith("num_batches_tracked"))
    assert parameters == 124_270_037


def test_output_shape_at_small_width() -> None:
    torch.manual_seed(0)
    model = DeepLabV1(num_classes=20, width_mult=0.125).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 65, 47))
    assert out.shape == (2, 21, 65, 47)
    assert torch.isfinite(out).all()


def test_eval_mode_is_deterministic_and_train_mode_uses_dropout() -> None:
    torch.manual_seed(0)
    model = DeepLabV1(num_classes=3, width_mult=0.0625)
    x = torch.randn(1, 3, 33, 41)
    model.eval()
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.equal(first, second)
    model.train()
    with torch.no_grad():
        torch.manual_seed(1)
        train_a = model(torch.cat([x, x]))
    # Dropout draws a different mask per sample, so the two copies differ in training.
    assert not torch.equal(train_a[0], train_a[1])


def test_head_initialisation_and_new_layers() -> None:
    torch.manual_seed(0)
    model = DeepLabV1(num_classes=20, width_mult=0.0625)
    for name in DeepLabV1.new_layers:
        assert hasattr(model, name)
    assert model.conv_fov.dilation == (12, 12) and model.conv_fov.padding == (12, 12)
    assert model.conv_fov.bias is None and model.conv_fov2.bias is None
    assert model.cls_conv.bias is not None
    assert model.bn_fov.momentum == pytest.approx(0.0003)
    assert model.backbone.bn7.momentum == pytest.approx(0.0003)
    # He-normal with fan_out: std = sqrt(2 / (out_channels * kernel area)).
    weight = model.conv_fov2.weight
    expected_std = (2.0 / 512) ** 0.5
    assert weight.std().item() == pytest.approx(expected_std, rel=0.05)
    assert torch.equal(model.bn_fov.weight, torch.ones(512))
    assert torch.equal(model.bn_fov2.bias, torch.zeros(512))
    # The classifier starts small, so the first loss is near log(21), not near 8.
    assert model.cls_conv.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.equal(model.cls_conv.bias, torch.zeros(21))


def test_load_pretrained_backbone_fills_and_freezes_the_backbone_only(tmp_path) -> None:
    from network.layers import FrozenBatchNorm2d
    from network.resnet38 import ResNet38
    from tool.optim import parameter_groups

    torch.manual_seed(1)
    classifier = ResNet38(width_mult=0.0625)
    with torch.no_grad():
        classifier.bn7.running_mean.uniform_(-1, 1)
    path = str(tmp_path / "backbone.pth")
    torch.save(classifier.state_dict(), path)

    torch.manual_seed(2)
    model = DeepLabV1(num_classes=20, width_mult=0.0625)
    head_before = model.conv_fov.weight.clone()
    report = start_from_weights(model, path)
    assert sorted(report.loaded) == sorted("backbone." + key for key in classifier.state_dict())
    for key, value in classifier.state_dict().items():
        assert torch.equal(model.state_dict()["backbone." + key], value), key
    assert torch.equal(model.conv_fov.weight, head_before)
    assert isinstance(model.backbone.bn7, FrozenBatchNorm2d)
    assert isinstance(model.bn_fov, torch.nn.BatchNorm2d)  # the head's BatchNorm still trains
    assert not model.backbone.conv1a.weight.requires_grad and model.backbone.b3.conv_branch2a.weight.requires_grad
    groups = parameter_groups(model, lr=0.001, weight_decay=5e-4)
    grouped = {id(p) for group in groups for p in group["params"]}
    assert id(model.backbone.conv1a.weight) not in grouped and id(model.cls_conv.bias) in grouped
    assert len(model.state_dict()) == len(DeepLabV1(num_classes=20, width_mult=0.0625).state_dict())
