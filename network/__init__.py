"""Networks of the pipeline and one table from names to constructors.

Add a model with one line in ``MODELS``; scripts call ``build_model(name, **kwargs)``. Seed
classifiers are built through the seed-method table (``network/methods.py``), backbones through
``network/backbones.py``.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch.nn as nn

from network.affinity import AffinityNet
from network.avc import AVCNet
from network.deeplab import DeepLabV1
from network.deeplabv2 import DeepLabV2MSC
from network.resnet38 import ResNet38
from network.sipe import SIPENet

MODELS: Dict[str, Callable[..., nn.Module]] = {
    "resnet38": ResNet38,
    "avc": AVCNet,
    "affinity": AffinityNet,
    "deeplab": DeepLabV1,
    "sipe": SIPENet,  # also AE-SIPE (affinity_enhanced=True); seed methods: network/methods.py
    "deeplabv2": DeepLabV2MSC,
}


def build_model(name: str, **kwargs) -> nn.Module:
    """Construct the model registered as ``name`` with keyword arguments ``kwargs``."""
    try:
        constructor = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}") from None
    return constructor(**kwargs)
