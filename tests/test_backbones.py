"""The backbone table: every entry follows the protocol; ResNet keys equal torchvision's."""
import pytest
import torch
import torchvision

from network.backbones import BACKBONES, OUTPUT_STRIDE_16, build_backbone
from network.layers import FrozenBatchNorm2d
from network.resnet import ResNet


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_follows_the_protocol(name):
    torch.manual_seed(0)
    model = build_backbone(name, width_mult=0.0625).eval()
    with torch.no_grad():
        features = model.forward_as_dict(torch.randn(1, 3, 64, 48))
    assert set(model.channels) <= set(features)
    for key, channels in model.channels.items():
        assert features[key].shape[1] == channels, key
        assert torch.isfinite(features[key]).all()
    assert set(model.backbone_state_keys()) <= set(model.state_dict())
    model.freeze_pretrained()
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert list(model.state_dict()) == list(build_backbone(name, width_mult=0.0625).state_dict())


@pytest.mark.parametrize("depth", [50, 101])
def test_resnet_keys_and_shapes_equal_torchvision(depth):
    ours = ResNet(depth).state_dict()
    theirs = getattr(torchvision.models, f"resnet{depth}")(weights=None).state_dict()
    theirs = {k: v for k, v in theirs.items() if not k.startswith("fc.")}
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_resnet_forward_equals_torchvision_and_strides():
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None).eval()
    ours = ResNet(50).eval()
    ours.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(1, 3, 65, 50)
    with torch.no_grad():
        expected = reference.layer4(reference.layer3(reference.layer2(reference.layer1(
            reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))))))
        assert torch.allclose(ours(x), expected, atol=1e-5)
        # Output stride 16 (SIPE/IRN/MSA): every stride-2 step maps n -> ceil(n / 2).
        os16 = ResNet(50, width_mult=0.0625, **OUTPUT_STRIDE_16).eval().forward_as_dict(x)
    assert {k: tuple(v.shape[2:]) for k, v in os16.items()} == {
        "stem": (17, 13), "layer1": (17, 13), "layer2": (9, 7), "layer3": (5, 4), "layer4": (5, 4)}


def test_freeze_pretrained_fixes_statistics_and_stem():
    model = ResNet(50, width_mult=0.0625).freeze_pretrained()
    assert not any(p.requires_grad for p in model.conv1.parameters())
    assert not any(p.requires_grad for p in model.bn1.parameters())
    assert model.layer3[0].bn1.weight.requires_grad  # FixedBatchNorm: gamma/beta still learn
    before = model.layer2[0].bn1.running_mean.clone()
    model.train()(torch.randn(2, 3, 32, 32))
    assert torch.equal(model.layer2[0].bn1.running_mean, before)
