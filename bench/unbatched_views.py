"""Multi-scale + flip inference with one forward per view: the straightforward loop of the
reference scripts, kept as the baseline that ``tool.multiscale.forward_views`` is tested and
timed against. Not used by the pipeline.
"""
from __future__ import annotations

from typing import Sequence

import torch

from tool.multiscale import ModelFn, _check_views, _run_model, _to_image_size, _unflip


def forward_views_unbatched(model_fn: ModelFn, views: Sequence[torch.Tensor], out_size: tuple[int, int],
                            align_corners: bool = False, device: torch.device | str = "cpu",
                            amp: bool = True) -> torch.Tensor:
    """Same result as :func:`tool.multiscale.forward_views` with one forward per view."""
    _check_views(views)
    device = torch.device(device)
    per_scale = []
    with torch.inference_mode():
        for view in views:
            maps = torch.cat([_to_image_size(_run_model(model_fn, view[j:j + 1], device, amp),
                                             out_size, align_corners)
                              for j in range(view.shape[0])])
            per_scale.append(_unflip(maps))
        return torch.cat(per_scale)
