"""Multi-scale + flip inference: batched equals one-forward-per-view, flips are undone."""
import pytest
import torch
import torch.nn.functional as F

from bench.unbatched_views import forward_views_unbatched
from tool.multiscale import forward_views


def _views(image: torch.Tensor, scales, flip=True):
    views = []
    for scale in scales:
        size = (round(image.shape[-2] * scale), round(image.shape[-1] * scale))
        scaled = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)
        views.append(torch.cat([scaled, scaled.flip(-1)]) if flip else scaled)
    return views


class CountingModel(torch.nn.Module):
    """A tiny conv net at stride 2 that counts its forwards."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.calls = []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        return self.conv(x)


@pytest.mark.parametrize("align_corners", [False, True])
def test_batched_equals_unbatched(align_corners):
    image = torch.rand(3, 13, 17, generator=torch.Generator().manual_seed(1))
    views = _views(image, [0.5, 1.0, 1.5])
    model = CountingModel().eval()
    batched = forward_views(model, views, (13, 17), align_corners)
    assert len(model.calls) == 3 and all(shape[0] == 2 for shape in model.calls)
    single = forward_views_unbatched(model, views, (13, 17), align_corners)
    assert len(model.calls) == 3 + 6
    assert batched.shape == (6, 5, 13, 17) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_flipped_views_are_flipped_back_in_scale_major_order():
    image = torch.rand(3, 8, 10, generator=torch.Generator().manual_seed(2))
    views = _views(image, [1.0, 2.0])
    # The identity "model" exposes the order: after flip-back, each flipped view equals its unflipped twin.
    maps = forward_views(lambda x: x * 1.0, views, (8, 10))
    assert maps.shape == (4, 3, 8, 10)
    torch.testing.assert_close(maps[1], maps[0])
    torch.testing.assert_close(maps[3], maps[2], atol=1e-6, rtol=0)
    torch.testing.assert_close(maps[0], image)
    assert not torch.allclose(maps[0], maps[2])  # scale 2.0 is resampled, so it differs from scale 1.0


def test_identical_shapes_share_one_forward_and_no_flip_views():
    image = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(3))
    model = CountingModel().eval()
    views = _views(image, [1.0, 1.0], flip=False) + _views(image, [0.5], flip=True)
    maps = forward_views(model, views, (6, 6))
    assert sorted(model.calls) == [(2, 3, 3, 3), (2, 3, 6, 6)]
    assert maps.shape == (4, 5, 6, 6)
    torch.testing.assert_close(maps[0], maps[1])
    torch.testing.assert_close(maps, forward_views_unbatched(model, views, (6, 6)), atol=1e-5, rtol=1e-5)


def test_runs_without_autograd_and_rejects_bad_views():
    model = CountingModel()
    maps = forward_views(model, [torch.rand(2, 3, 4, 4)], (4, 4))
    assert not maps.requires_grad
    with pytest.raises(ValueError):
        forward_views(model, [torch.rand(3, 3, 4, 4)], (4, 4))
    with pytest.raises(ValueError):
        forward_views(model, [], (4, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_channels_last_close_to_fp32():
    image = torch.rand(3, 32, 40, generator=torch.Generator().manual_seed(4))
    views = _views(image, [0.5, 1.0, 1.5])
    model = CountingModel().eval()
    reference = forward_views(model, views, (32, 40))
    model = model.cuda().to(memory_format=torch.channels_last)
    maps = forward_views(model, views, (32, 40), device="cuda")
    assert maps.dtype == torch.float32 and maps.device.type == "cuda"
    torch.testing.assert_close(maps.cpu(), reference, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(maps, forward_views_unbatched(model, views, (32, 40), device="cuda"),
                               atol=5e-2, rtol=5e-2)
