"""ResNet38 backbone: key names, shapes and forward against the SEAM/PSA reference vectors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from network.layers import FrozenBatchNorm2d
from network.resnet38 import ResNet38
from tests.reference_data import load_reference, portable_state_dict, reference_keys


@pytest.fixture(scope="module")
def full_model() -> ResNet38:
    return ResNet38().eval()


def test_keys_and_shapes_match_resnet38d(full_model: ResNet38) -> None:
    expected = reference_keys("SEAM network.resnet38d.Net")
    state = full_model.state_dict()
    assert len(expected) == 228
    assert list(state) == list(expected)  # same keys in the same order
    for key, shape in expected.items():
        assert list(state[key].shape) == shape, key
    weights = sum(v.numel() for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert weights == 105_118_656
    assert full_model.channels == {"conv3": 256, "conv4": 512, "conv5": 1024, "conv6": 4096}


def test_forward_matches_portable_reference(full_model: ResNet38) -> None:
    full_model.load_state_dict(portable_state_dict(full_model.state_dict()))
    reference = load_reference("resnet38_forward_portable.npz")
    with torch.no_grad():
        out = full_model.forward_as_dict(torch.from_numpy(reference["x"]))
    for name in ("conv3", "conv4", "conv5", "conv6"):
        np.testing.assert_allclose(out[name].numpy(), reference[name], atol=1e-4, rtol=1e-4,
                                   err_msg=name)
    with torch.no_grad():
        assert torch.equal(full_model(torch.from_numpy(reference["x"])), out["conv6"])


def test_default_init_fingerprint_seed0() -> None:
    reference = load_reference("resnet38_forward_seed0.npz")
    torch.manual_seed(0)
    model = ResNet38().eval()
    state = model.state_dict()
    sums = np.array([state[k].double().sum().item() for k in reference["param_keys"]])
    if not np.allclose(sums, reference["param_sum"], rtol=1e-6, atol=1e-6):
        pytest.skip("this torch version draws a different default-init stream")
    with torch.no_grad():
        out = model.forward_as_dict(torch.from_numpy(reference["x"]))
    for name in ("conv3", "conv6"):
        flat = out[name].numpy().ravel()
        np.testing.assert_allclose(flat[reference[f"{name}_sample_idx"]],
                                   reference[f"{name}_sample_val"], atol=1e-6, rtol=1e-4)


def test_width_multiplier_shapes_and_strides() -> None:
    model = ResNet38(width_mult=0.125).eval()
    assert model.channels == {"conv3": 32, "conv4": 64, "conv5": 128, "conv6": 512}
    with torch.no_grad():
        out = model.forward_as_dict(torch.randn(2, 3, 90, 90))
    # stride-2 convs give ceil(H/2): 90 -> 45 -> 23 -> 12
    assert out["conv3"].shape == (2, 32, 23, 23)
    assert out["conv4"].shape == (2, 64, 12, 12)
    assert out["conv5"].shape == (2, 128, 12, 12)
    assert out["conv6"].shape == (2, 512, 12, 12)
    assert model.b6.dropout_2b1.p == 0.3 and model.b7.dropout_2b2.p == 0.5
    tiny = ResNet38(width_mult=0.01)
    assert all(v.shape[0] >= 8 for k, v in tiny.state_dict().items() if v.dim() > 0)


def test_bn_trains_from_scratch() -> None:
    model = ResNet38(width_mult=0.125, bn_momentum=0.5).train()
    before = model.b3.bn_branch2a.running_mean.clone()
    model(torch.randn(2, 3, 32, 32) + 1.0)
    assert not torch.equal(before, model.b3.bn_branch2a.running_mean)
    assert all(p.requires_grad for p in model.parameters())


def test_freeze_pretrained_freezes_bn_and_stem() -> None:
    torch.manual_seed(1)
    model = ResNet38(width_mult=0.125)
    # Give the BNs non-trivial statistics, so batch statistics would differ from them.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    keys_before = list(model.state_dict())
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        eval_conv5 = model.eval().forward_as_dict(x)["conv5"]

    model.freeze_pretrained()
    assert list(model.state_dict()) == keys_before
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert isinstance(model.b4_2.bn_branch2b1, FrozenBatchNorm2d)
    assert isinstance(model.bn7, FrozenBatchNorm2d)

    model.train()  # frozen BN ignores train mode; conv5 lies before any dropout
    stats_before = model.b5.bn_branch2a.running_mean.clone()
    out = model.forward_as_dict(x)
    torch.testing.assert_close(out["conv5"], eval_conv5, atol=1e-6, rtol=1e-5)
    assert torch.equal(stats_before, model.b5.bn_branch2a.running_mean)

    out["conv6"].sum().backward()
    for name, parameter in model.named_parameters():
        top = name.split(".")[0]
        is_bn = ".bn_" in name or top == "bn7"
        should_train = not is_bn and top not in ("conv1a", "b2", "b2_1", "b2_2")
        assert parameter.requires_grad == should_train, name
        assert (parameter.grad is not None) == should_train, name


def test_freeze_pretrained_loads_old_state_without_num_batches_tracked() -> None:
    model = ResNet38(width_mult=0.125).freeze_pretrained()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    model.load_state_dict(state, strict=True)
