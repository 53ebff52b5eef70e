"""Weight loading: MXNet .params reader (byte-level), name mapping, strict loaders."""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Dict, Iterable, Tuple

import numpy as np
import pytest
import torch
import torch.nn as nn

from network.resnet38 import ResNet38
from network.mxnet_params import mxnet_parameter_name, mxnet_to_resnet38, read_mxnet_params
from network.weights import load_pretrained_backbone, load_trained
from tool.fileio import DataError
from tests.reference_data import reference_keys


TYPE_FLAGS = {np.dtype("float32"): 0, np.dtype("float64"): 1, np.dtype("float16"): 2,
              np.dtype("uint8"): 3, np.dtype("int32"): 4, np.dtype("int8"): 5,
              np.dtype("int64"): 6}


def ndarray_bytes(array: np.ndarray | None, layout: str = "v2") -> bytes:
    """One NDArray record as MXNet writes it (v2), as MXNet 0.9 wrote it (v1) or legacy."""
    shape = () if array is None else array.shape
    if layout == "v2":
        out = struct.pack("<Ii", 0xF993FAC9, 0) + struct.pack(f"<I{len(shape)}q", len(shape), *shape)
    elif layout == "v1":
        out = struct.pack("<I", 0xF993FAC8) + struct.pack(f"<I{len(shape)}q", len(shape), *shape)
    else:
        out = struct.pack(f"<I{len(shape)}I", len(shape), *shape)
    if array is None:
        return out
    out += struct.pack("<ii", 1, 0)  # context: cpu(0)
    out += struct.pack("<i", TYPE_FLAGS[array.dtype])
    return out + np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()


def params_bytes(entries: Iterable[Tuple[str, np.ndarray | None, str]]) -> bytes:
    entries = list(entries)
    out = struct.pack("<QQQ", 0x112, 0, len(entries))
    out += b"".join(ndarray_bytes(array, layout) for _, array, layout in entries)
    out += struct.pack("<Q", len(entries))
    for name, _, _ in entries:
        encoded = name.encode("utf-8")
        out += struct.pack("<Q", len(encoded)) + encoded
    return out


def test_reads_all_three_layouts_and_dtypes(tmp_path: Path) -> None:
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    b = np.array([[1.5, -2.25]], dtype=np.float64)
    c = np.array([0.5, 1.0, -3.0], dtype=np.float16)
    d = np.array([[[[7]]], [[[-9]]]], dtype=np.int32)
    e = np.array([1, -2, 3], dtype=np.int8)
    path = tmp_path / "tiny.params"
    path.write_bytes(params_bytes([("arg:a", a, "v2"), ("arg:b", b, "v1"), ("aux:c", c, "legacy"),
                                   ("d", d, "v2"), ("e", e, "legacy"), ("none", None, "v2")]))
    params = read_mxnet_params(str(path))
    assert list(params) == ["arg:a", "arg:b", "aux:c", "d", "e"]  # the empty array is skipped
    for name, expected in zip(params, (a, b, c, d, e)):
        assert params[name].dtype == expected.dtype, name
        np.testing.assert_array_equal(params[name], expected)


def test_bad_files_raise_data_error(tmp_path: Path) -> None:
    good = params_bytes([("arg:a", np.ones((2, 2), np.float32), "v2")])
    cases = {  # data, expected message (file names are neutral so they cannot match)
        "truncated": (good[:-6], "truncated"),
        "bad magic": (struct.pack("<Q", 0x113) + good[8:], "not an MXNet NDArray list"),
        "trailing": (good + b"\0", "trailing bytes"),
        "no names": (good[:good.rindex(struct.pack("<Q", 1))] + struct.pack("<Q", 0),
                     "1 arrays but 0 names"),
    }
    for index, (data, message) in enumerate(cases.values()):
        path = tmp_path / f"case{index}.params"
        path.write_bytes(data)
        with pytest.raises(DataError, match=message):
            read_mxnet_params(str(path))
    with pytest.raises(DataError, match="not found"):
        read_mxnet_params(str(tmp_path / "absent.params"))


def test_mapping_examples() -> None:
    assert mxnet_parameter_name("arg:conv1a_weight") == "conv1a.weight"
    assert mxnet_parameter_name("res2a_branch1_weight") == "b2.conv_branch1.weight"
    assert mxnet_parameter_name("arg:res2b1_branch2a_weight") == "b2_1.conv_branch2a.weight"
    assert mxnet_parameter_name("arg:bn4b3_branch2b1_gamma") == "b4_3.bn_branch2b1.weight"
    assert mxnet_parameter_name("arg:bn4b3_branch2b1_beta") == "b4_3.bn_branch2b1.bias"
    assert mxnet_parameter_name("aux:bn4b3_branch2b1_moving_mean") == "b4_3.bn_branch2b1.running_mean"
    assert mxnet_parameter_name("aux:bn6a_branch2b2_moving_var") == "b6.bn_branch2b2.running_var"
    assert mxnet_parameter_name("aux:bn7_moving_var") == "bn7.running_var"
    assert mxnet_parameter_name("arg:linear1000_weight") is None
    with pytest.raises(DataError, match="fc_weight"):
        mxnet_parameter_name("arg:fc_weight")


def test_mapping_matches_reference_table() -> None:
    table: Dict[str, str | None] = reference_keys("_mxnet_to_torch")["mapping"]
    assert len(table) == 193
    for mxnet_name, torch_name in table.items():
        assert mxnet_parameter_name(mxnet_name) == torch_name, mxnet_name
    resnet_keys = [k for k in reference_keys("SEAM network.resnet38d.Net")
                   if not k.endswith("num_batches_tracked")]
    produced = mxnet_to_resnet38({name: np.zeros(1, np.float32) for name in table})
    assert sorted(produced) == sorted(resnet_keys) and len(produced) == 191


class TinyHeadNet(ResNet38):
    """A SEAM-like subclass: backbone keys at the top level next to a head."""

    def __init__(self) -> None:
        super().__init__(width_mult=0.125)
        self.fc8 = nn.Conv2d(self.channels["conv6"], 3, 1, bias=False)


class WrappedBackbone(nn.Module):
    """A DeepLab-like model: the backbone under a ``backbone.`` prefix."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = ResNet38(width_mult=0.125)
        self.head = nn.Conv2d(self.backbone.channels["conv6"], 3, 1)


def small_mxnet_file(tmp_path: Path, drop: str | None = None, bad_shape: str | None = None) -> Tuple[Path, Dict[str, torch.Tensor]]:
    """A .params file with MXNet names whose arrays fit ResNet38(width 0.125)."""
    table = reference_keys("_mxnet_to_torch")["mapping"]
    state = ResNet38(width_mult=0.125).state_dict()
    rng = np.random.default_rng(3)
    entries, expected = [], {}
    for mxnet_name, key in table.items():
        shape = (5, 4) if key is None else tuple(state[key].shape)
        if key == bad_shape:
            shape = (shape[0] + 1,) + shape[1:]
        array = rng.standard_normal(shape).astype(np.float32)
        if key == drop:
            continue
        entries.append((mxnet_name, array, "v2"))
        if key is not None:
            expected[key] = torch.from_numpy(array)
    path = tmp_path / "small.params"
    path.write_bytes(params_bytes(entries))
    return path, expected


def test_load_pretrained_backbone_from_params(tmp_path: Path, capsys) -> None:
    path, expected = small_mxnet_file(tmp_path)
    model = TinyHeadNet()
    head_before = model.fc8.weight.detach().clone()
    report = load_pretrained_backbone(model, str(path))
    state = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    assert torch.equal(model.fc8.weight, head_before)
    assert report.new_keys == ["fc8.weight"] and report.unused_keys == []
    assert "fc8.weight" in capsys.readouterr().out

    wrapped = WrappedBackbone()
    load_pretrained_backbone(wrapped, str(path))
    assert torch.equal(wrapped.backbone.b4_3.bn_branch2b1.running_mean,
                       expected["b4_3.bn_branch2b1.running_mean"])


def test_load_pretrained_backbone_rejects_missing_and_misshaped(tmp_path: Path) -> None:
    path, _ = small_mxnet_file(tmp_path, drop="b5_1.conv_branch2a.weight")
    with pytest.raises(DataError, match=r"missing backbone keys \(1\): b5_1\.conv_branch2a\.weight"):
        load_pretrained_backbone(TinyHeadNet(), str(path))
    path, _ = small_mxnet_file(tmp_path, bad_shape="bn7.bias")
    with pytest.raises(DataError, match="bn7.bias"):
        load_pretrained_backbone(TinyHeadNet(), str(path))


def test_load_pretrained_backbone_from_pth_with_module_prefix(tmp_path: Path, capsys) -> None:
    source = TinyHeadNet()
    path = tmp_path / "seam_like.pth"
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, path)
    target = WrappedBackbone()
    report = load_pretrained_backbone(target, str(path))
    assert torch.equal(target.backbone.b7.conv_branch1.weight, source.b7.conv_branch1.weight)
    assert report.unused_keys == ["fc8.weight"]
    assert set(report.new_keys) == {"head.weight", "head.bias"}
    assert "file keys not used: fc8.weight" in capsys.readouterr().out


def test_load_trained_round_trip_and_errors(tmp_path: Path) -> None:
    source = TinyHeadNet()
    checkpoint = tmp_path / "ours.pth"
    torch.save({"model": source.state_dict(), "step": 3}, checkpoint)
    target = TinyHeadNet()
    load_trained(target, str(checkpoint))
    assert torch.equal(target.fc8.weight, source.fc8.weight)

    # PSA/SEAM style: bare state dict with module. prefix and no num_batches_tracked.
    old = {"module." + k: v for k, v in source.state_dict().items()
           if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")
    load_trained(TinyHeadNet(), str(tmp_path / "old.pth"))

    state = source.state_dict()
    del state["b3_1.conv_branch2a.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["fc8.weight"] = torch.zeros(4, 512, 1, 1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(DataError) as info:
        load_trained(TinyHeadNet(), str(tmp_path / "bad.pth"))
    message = str(info.value)
    assert "missing keys (1): b3_1.conv_branch2a.weight" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "first shape conflict: fc8.weight: file (4, 512, 1, 1) vs model (3, 512, 1, 1)" in message


def test_unreadable_pth_raises_data_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(DataError, match="neither a torch checkpoint .* nor an MXNet .params file"):
        load_trained(TinyHeadNet(), str(path))
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(DataError, match="not a state dict"):
        load_trained(TinyHeadNet(), str(tmp_path / "list.pth"))
    torch.save({"model": TinyHeadNet().state_dict(), "rng": np.random.default_rng(0).bit_generator.state},
               tmp_path / "with_rng.pth")
    load_trained(TinyHeadNet(), str(tmp_path / "with_rng.pth"))
    # Pickled objects beyond tensors and plain types are refused (no weights_only=False fallback).
    torch.save({"model": TinyHeadNet().state_dict(), "numpy": np.zeros(2)}, tmp_path / "with_numpy.pth")
    with pytest.raises(DataError, match="objects other than tensors"):
        load_trained(TinyHeadNet(), str(tmp_path / "with_numpy.pth"))


# ------------------------------------------------------------------ inference loads skip the random init
def _model_builders() -> Dict[str, object]:
    from network import MODELS
    from network.irn import IRNet  # loads through adapt_loaded_state: the ordinary build
    builders = {name: (lambda width, c=c: c(width_mult=width)) if name in ("resnet38", "affinity")
                else (lambda width, c=c: c(num_classes=5, width_mult=width)) for name, c in MODELS.items()}
    builders["irn"] = lambda width: IRNet(width_mult=width)
    return builders


@pytest.mark.parametrize("name", sorted(_model_builders()))
def test_load_for_inference_equals_an_initialised_build(name: str, tmp_path: Path) -> None:
    """The inference load (random initialisation skipped where the load sets every tensor) gives
    exactly the model of the reference way: build with init, then load."""
    from network.weights import load_for_inference
    build = _model_builders()[name]
    torch.manual_seed(0)
    trained = build(0.125).eval()
    path = tmp_path / "w.pth"
    torch.save({"model": trained.state_dict(), "args": {"width_mult": 0.125}}, path)
    torch.manual_seed(1)  # the ordinary build would draw other values: only the file may decide
    fast = load_for_inference(build, str(path), None, torch.device("cpu"))
    slow = load_for_inference(build, str(path), None, torch.device("cpu"), skip_init=False)
    for model in (fast, slow):
        state = model.state_dict(keep_vars=True)
        assert list(state) == list(trained.state_dict())
        assert all(torch.equal(state[key], value) for key, value in trained.state_dict().items())
        # tensors the model shares (SIPE's stage aliases) are still one tensor
        assert len({id(v) for v in state.values()}) == len({id(v) for v in trained.state_dict(keep_vars=True).values()})


def test_skipped_init_only_where_the_load_sets_every_tensor(tmp_path: Path) -> None:
    from network.weights import _build_for_loading, load_for_inference

    class WithDerivedBuffer(nn.Module):  # a non-persistent buffer: the file cannot set it
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            nn.init.normal_(self.conv.weight)
            self.register_buffer("grid", torch.arange(6.0), persistent=False)
            nn.init.constant_(self.grid, 2.0)

    torch.manual_seed(0)
    trained = WithDerivedBuffer()
    torch.save(trained.state_dict(), tmp_path / "w.pth")
    model = load_for_inference(lambda width: WithDerivedBuffer(), str(tmp_path / "w.pth"), 1.0, torch.device("cpu"))
    assert torch.equal(model.grid, torch.full((6,), 2.0))  # built the ordinary way
    assert torch.equal(model.conv.weight, trained.conv.weight)
    skipped = _build_for_loading(lambda width: nn.Conv2d(3, 4, 3), 1.0)  # every tensor in the state dict
    assert skipped.weight.shape == (4, 3, 3, 3)
