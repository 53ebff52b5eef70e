"""Multi-scale + flip inference, shared by infer_seed.py (CAMs) and test_deeplab.py (logits).

The input is one tensor per scale: ``(2, 3, h_s, w_s)`` = the image and its horizontal
flip, or ``(1, 3, h_s, w_s)`` without flip. ``forward_views`` runs one forward per scale
with both flips batched (scales of identical shape share a forward too), upsamples each
map to the image size in float32, flips the flipped views back and returns the per-view
maps ``(V, C, H, W)`` in view order (scale-major, flip-minor). On CUDA it uses bf16
autocast and channels_last input; the model itself should already be in eval mode (and in
channels_last memory format, which the caller sets once).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from tool.device import autocast_context, images_to_device

ModelFn = Callable[[torch.Tensor], torch.Tensor]


def _check_views(views: Sequence[torch.Tensor]) -> None:
    if not views:
        raise ValueError("no views given")
    for index, view in enumerate(views):
        if view.ndim != 4 or view.shape[0] not in (1, 2):
            raise ValueError(f"view {index} must be (1 or 2, C, h, w), got {tuple(view.shape)}")


def _run_model(model_fn: ModelFn, batch: torch.Tensor, device: torch.device, amp: bool) -> torch.Tensor:
    with autocast_context(device, amp):
        scores = model_fn(images_to_device(batch, device))
    return scores.float()


def _to_image_size(scores: torch.Tensor, out_size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    if tuple(scores.shape[-2:]) == tuple(out_size):
        return scores
    return F.interpolate(scores, size=tuple(out_size), mode="bilinear", align_corners=align_corners)


def _unflip(maps: torch.Tensor) -> torch.Tensor:
    """Maps of one scale (1 or 2 views): flip the second (the flipped input) back."""
    if maps.shape[0] == 2:
        maps = torch.stack([maps[0], maps[1].flip(-1)])
    return maps


def forward_views(model_fn: ModelFn, views: Sequence[torch.Tensor], out_size: tuple[int, int],
                  align_corners: bool = False, device: torch.device | str = "cpu",
                  amp: bool = True) -> torch.Tensor:
    """Per-view score maps (V, C, H, W) float32 on ``device``; one forward per distinct shape.

    ``model_fn`` maps a (B, 3, h, w) batch to (B, C, h', w') scores; they are upsampled to
    ``out_size`` (bilinear, ``align_corners``: False for SEAM CAMs, True for DeepLab) and
    flipped views are flipped back. ``amp`` enables bf16 autocast on CUDA (ignored on CPU).
    """
    return forward_views_many(model_fn, [views], [out_size], align_corners, device, amp)[0]


def forward_views_many(model_fn: ModelFn, views_per_image: Sequence[Sequence[torch.Tensor]],
                       out_sizes: Sequence[tuple[int, int]], align_corners: bool = False,
                       device: torch.device | str = "cpu", amp: bool = True) -> list[torch.Tensor]:
    """:func:`forward_views` of several images at once: every view shape gets one forward over all
    the images' views of that shape (the GPU path batches images this way); one (V, C, H, W)
    tensor per image, at that image's ``out_sizes`` entry."""
    if len(views_per_image) != len(out_sizes):
        raise ValueError(f"{len(views_per_image)} images but {len(out_sizes)} output sizes")
    for views in views_per_image:
        _check_views(views)
    device = torch.device(device)
    groups: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for image, views in enumerate(views_per_image):
        for index, view in enumerate(views):
            groups.setdefault(tuple(view.shape[1:]), []).append((image, index))
    per_view: list[list[torch.Tensor | None]] = [[None] * len(views) for views in views_per_image]
    with torch.inference_mode():
        for members in groups.values():
            parts = [views_per_image[image][index] for image, index in members]
            batch = torch.cat(parts) if len(parts) > 1 else parts[0]
            scores = _run_model(model_fn, batch, device, amp)
            for (image, index), chunk in zip(members, torch.split(scores, [part.shape[0] for part in parts])):
                per_view[image][index] = _unflip(_to_image_size(chunk, out_sizes[image], align_corners))
        return [torch.cat(maps) for maps in per_view]  # type: ignore[arg-type]

