"""Inference precision (``--precision``, tool/device.py): auto resolves to bf16 exactly where the
hardware runs it natively, and a bf16 forward keeps the seeds, DeepLab labels and MSA CAMs of
float32 up to bf16 rounding (the fused CAMs to a few 1e-2, nearly every arg-max pixel)."""
import numpy as np
import pytest
import torch

from network.avc import AVCNet
from network.deeplab import DeepLabV1
from network.methods import METHODS, image_cams
from network.msa import MSANet, msa_cam_dict
from network.spixel import SpixelNet
from tool.cam import seed_from_cam_dict
from tool.device import (cast_autocast_weights, cpu_has_native_bf16, inference_autocast, inference_layout,
                         resolve_precision)
from tool.multiscale import forward_views

NUM_CLASSES = 5


def multiscale_views(image: np.ndarray, scales, flip: bool) -> list[torch.Tensor]:
    """(2, 3, h, w) image + mirror per scale, roughly normalised (what the datasets hand the forward)."""
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 64.0 - 2.0
    views = []
    for scale in scales:
        size = (round(image.shape[0] * scale), round(image.shape[1] * scale))
        view = torch.nn.functional.interpolate(tensor, size=size, mode="bilinear", align_corners=False)
        views.append(torch.cat([view, view.flip(-1)]) if flip else view)
    return views


def test_resolution_follows_the_hardware():
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_precision("auto", "cuda") == "bf16"
    with pytest.raises(ValueError):
        resolve_precision("fp16", "cpu")


def test_autocast_and_layout_only_for_bf16():
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 8, 8)
    with inference_autocast("cpu", "fp32"):
        assert conv(x).dtype == torch.float32
    with inference_autocast("cpu", "bf16"):
        assert conv(x).dtype == torch.bfloat16
    assert inference_layout(conv, "cpu", "fp32").weight.is_contiguous()
    assert inference_layout(torch.nn.Conv2d(3, 4, 3), "cpu", "bf16").weight.is_contiguous(
        memory_format=torch.channels_last)


def test_weights_cast_once_give_autocast_outputs_exactly():
    """The cast inference_layout does for bf16 is the one autocast does at every forward: the CAMs
    (PCM included, whose f9 stays float32 as the model declares) are bit-identical."""
    torch.manual_seed(0)
    model = AVCNet(num_classes=NUM_CLASSES, width_mult=0.0625).eval()
    views = torch.randn(2, 3, 40, 48)
    with torch.inference_mode(), inference_autocast("cpu", "bf16"):
        expected = model.forward_cam(views)
        cast = cast_autocast_weights(model)
        assert cast.fc8.weight.dtype == cast.b2.conv_branch2a.weight.dtype == torch.bfloat16
        assert cast.f9.weight.dtype == torch.float32
        assert torch.equal(cast.forward_cam(views), expected)


def _image(seed: int = 0, size: tuple[int, int] = (56, 48)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.zeros((*size, 3), np.uint8) + 40
    image[10:40, 8:30] = (200, 60, 50)   # a red block and a blue one: structure for the CAMs
    image[20:50, 30:46] = (40, 70, 210)
    return np.clip(image + rng.integers(0, 30, image.shape), 0, 255).astype(np.uint8)


def _both(run):
    fp32 = run("fp32")
    bf16 = run("bf16")
    return fp32, bf16


def test_bf16_seeds_match_float32():
    torch.manual_seed(0)
    model = AVCNet(num_classes=NUM_CLASSES, width_mult=0.0625).eval()
    image, label = _image(), np.array([1, 0, 1, 0, 0], np.float32)
    views = multiscale_views(image, METHODS["avc"].scales, True)

    def run(precision):
        net = inference_layout(model, "cpu", precision)
        with inference_autocast("cpu", precision):
            return image_cams(METHODS["avc"], net, views, label, image.shape[:2], torch.device("cpu")).cam_dict
    fp32, bf16 = _both(run)
    assert sorted(fp32) == sorted(bf16) == [0, 2]
    assert max(np.abs(fp32[k] - bf16[k]).max() for k in fp32) < 0.05
    agree = (seed_from_cam_dict(fp32, NUM_CLASSES, 0.26, image.shape[:2]) == seed_from_cam_dict(bf16, NUM_CLASSES, 0.26, image.shape[:2]))
    assert agree.mean() > 0.98


def test_bf16_deeplab_probabilities_match_float32():
    torch.manual_seed(0)
    model = DeepLabV1(num_classes=NUM_CLASSES + 1, width_mult=0.0625).eval()
    image = _image(1)
    views = multiscale_views(image, (0.75, 1.0), True)

    def run(precision):
        net = inference_layout(model, "cpu", precision)
        with inference_autocast("cpu", precision):
            return torch.softmax(forward_views(net, views, image.shape[:2], align_corners=True).mean(0), 0)
    fp32, bf16 = _both(run)
    assert bf16.dtype == torch.float32
    assert (fp32 - bf16).abs().max() < 0.05
    assert (fp32.argmax(0) == bf16.argmax(0)).float().mean() > 0.98


def test_bf16_msa_cams_match_float32():
    torch.manual_seed(0)
    model, spixel = MSANet(NUM_CLASSES, 0.0625).eval(), SpixelNet(0.25).eval()
    image, label = _image(2, (64, 48)), np.array([0, 1, 0, 1, 0], np.float32)

    def run(precision):
        with inference_autocast("cpu", precision):
            return msa_cam_dict(inference_layout(model, "cpu", precision), inference_layout(spixel, "cpu", precision),
                                image, label, (0.5, 1.0))
    fp32, bf16 = _both(run)
    assert sorted(fp32) == sorted(bf16) == [1, 3]
    assert max(np.abs(fp32[k] - bf16[k]).max() for k in fp32) < 0.05
