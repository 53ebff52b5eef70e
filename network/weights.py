"""All weight loading into models: ImageNet backbones, PSA/SEAM/SIPE ``.pth`` releases, our checkpoints.

The ResNet38 MXNet ``.params`` reader lives beside ResNet38 (``network/mxnet_params.py``);
a ``.params`` path is read through it.

Entry points:

* :func:`load_pretrained_backbone` - initialise the ResNet38 backbone of a model from the
  ImageNet MXNet file or any ``.pth`` that holds the backbone; every backbone tensor must
  be present with the right shape, heads stay as initialised.
* :func:`load_trained` - strict load of a whole trained model (ours, PSA's, SEAM's);
  :func:`load_for_inference` builds the model at the checkpoint's width and does the same.
* :func:`start_from_weights` - how the training scripts start (pretrained backbone, frozen).

None ever loads with ``strict=False`` silently: a missing key or a shape conflict raises
:class:`tool.fileio.DataError` naming the file and the keys.
"""
from __future__ import annotations

import os
import pickle
import struct
from typing import Callable, Dict, List, Mapping, NamedTuple, Tuple

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from network.layers import FrozenBatchNorm2d
from network.mxnet_params import MXNET_LIST_MAGIC, mxnet_to_resnet38, read_mxnet_params
from network.resnet import ResNet
from network.resnet38 import ResNet38
from tool.checkpoint import format_keys as _format_keys
from tool.checkpoint import require_finite_weights, state_mismatch
from tool.device import unwrap_model
from tool.fileio import DataError

# ------------------------------------------------------------------ .pth reading
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Remove DataParallel/DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes."""
    cleaned = {}
    for key, value in state.items():
        stripped = key
        while stripped.startswith(_WRAPPER_PREFIXES):
            stripped = stripped.split(".", 1)[1]
        if stripped in cleaned:
            raise DataError(f"key {key!r} collides with another key after removing 'module.'")
        cleaned[stripped] = value
    return cleaned


def _torch_load(path: str):
    """``torch.load`` on CPU with the safe unpickler (our checkpoints hold only tensors and
    plain types, RNG states included); an MXNet file under another name is read as one."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    try:
        # A zip archive (torch >= 1.6) is mapped, not read: the load copies each tensor once,
        # into the model (a full-width ResNet38: 0.4 s less); older pickles are read.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=head.startswith(b"PK\x03\x04"))
    except Exception as error:  # torch raises many types on a corrupt file
        if len(head) == 8 and struct.unpack("<Q", head)[0] == MXNET_LIST_MAGIC:
            return mxnet_to_resnet38(read_mxnet_params(path))
        # A torch file is a zip archive (torch >= 1.6) or a pickle (protocol 2+ starts with 0x80).
        looks_like_torch = head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"
        if (looks_like_torch and isinstance(error, pickle.UnpicklingError)
                and "weights only load failed" in str(error).lower()):
            raise DataError(f"{path}: a torch file holding objects other than tensors and plain types; refused "
                            f"(only weights are loaded, never pickled code)") from error
        raise DataError(f"{path}: neither a torch checkpoint (.pth) nor an MXNet .params file") from error


def _read_weights_file(path: str) -> object:
    """What a weight file holds: the ``.params`` tensors (mapped to ResNet38 names) or the
    ``.pth`` object as saved."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: weight file not found")
    if path.endswith(".params"):
        return mxnet_to_resnet38(read_mxnet_params(path))
    return _torch_load(path)


def _saved_args(loaded: object) -> Dict[str, object]:
    """The ``'args'`` entry of one of our checkpoints; ``{}`` for any other file."""
    args = loaded.get("args") if isinstance(loaded, Mapping) else None
    return dict(args) if isinstance(args, Mapping) else {}


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """State dict from a ``.params`` file (mapped to ResNet38 names) or a ``.pth`` file.

    ``.pth`` may be a bare state dict (PSA/SEAM releases), a SIPE/AE-SIPE release
    (``{'net': state_dict}``) or our checkpoint (a dict with a ``'model'`` entry); ``module.``
    prefixes are removed.
    """
    return _state_dict_of(_read_weights_file(path), path)


def _state_dict_of(loaded: object, path: str, check_finite: bool = True) -> Dict[str, torch.Tensor]:
    if isinstance(loaded, Mapping):
        # ours: 'model'; SIPE/AE-SIPE/IRN releases: 'net'; others: 'state_dict'.
        for wrapper_key in ("model", "net", "state_dict"):
            if wrapper_key in loaded and isinstance(loaded[wrapper_key], Mapping):
                loaded = loaded[wrapper_key]
                break
    if not isinstance(loaded, Mapping) or not all(
            isinstance(v, torch.Tensor) for v in loaded.values()):
        raise DataError(f"{path}: not a state dict (a mapping from names to tensors)")
    if check_finite:
        require_finite_weights(loaded, path)
    return _strip_wrapper_prefixes(loaded)


# ------------------------------------------------------------------ loading into models
class LoadReport(NamedTuple):
    loaded: List[str]        # model keys that got values from the file
    new_keys: List[str]      # model keys left as initialised (heads)
    unused_keys: List[str]   # file keys that were not used


def _find_backbone(model: nn.Module) -> Tuple[str, nn.Module]:
    """The backbone (ResNet38 or ResNet) inside ``model`` and its state-dict prefix ('' when
    model is one)."""
    for name, module in model.named_modules():
        if isinstance(module, (ResNet38, ResNet)):
            return (name + "." if name else ""), module
    raise TypeError(f"{type(model).__name__} contains no backbone of network.backbones")


def load_pretrained_backbone(model: nn.Module, path: str) -> LoadReport:
    """Initialise the ResNet38 backbone inside ``model`` from ``path`` (``.params`` or ``.pth``).

    Every backbone tensor must be in the file with the model's shape (``num_batches_tracked``
    may be absent, as in old files); file keys may be bare (``b4.conv_branch1.weight``) or
    carry the model's prefix (``backbone.``). Other model keys (heads) keep their
    initialisation; the new and the unused keys are printed. Raises DataError naming the
    missing keys or the first shape conflicts.
    """
    file_state = read_state_dict(path)
    prefix, backbone = _find_backbone(model)
    backbone_keys = [prefix + k for k in backbone.backbone_state_keys()]
    values: Dict[str, torch.Tensor] = {}
    used_file_keys = set()
    for model_key in backbone_keys:
        relative_key = model_key[len(prefix):]
        file_key = model_key if model_key in file_state else relative_key
        if file_key in file_state:
            values[model_key] = file_state[file_key]
            used_file_keys.add(file_key)
    # Into the backbone module itself: a model that registers it under several names (SIPE's
    # aliases) gets the values under every name.
    return _load_partial(model, values, backbone_keys, [k for k in file_state if k not in used_file_keys],
                         path, f"{type(backbone).__name__} backbone", into=(backbone, prefix))


def _raise_key_errors(header: str, sections: Tuple[Tuple[str, List[str], int], ...],
                      extra: str | None = None) -> None:
    """DataError ``header; label (n): keys; ...`` for each non-empty section (nothing if all are)."""
    message = [header] + [f"{label} ({len(keys)}): {_format_keys(keys, limit)}" for label, keys, limit in sections
                          if keys]
    if extra:
        message.append(extra)
    if len(message) > 1:
        raise DataError("; ".join(message))


def _load_partial(model: nn.Module, values: Mapping[str, torch.Tensor], required: List[str],
                  unused: List[str], path: str, what: str,
                  into: Tuple[nn.Module, str] | None = None) -> LoadReport:
    """Strictly load ``values`` (model key -> tensor) into ``model``; every ``required`` key must be
    among them with the model's shape, any other value must fit too; the rest stays as initialised.

    The generic step behind every partial start (ResNet38 backbone, DeepLabV2 init): raises
    DataError naming the missing keys and the first shape conflicts. ``into`` = (module, its
    state-dict prefix): load into that sub-module, so every name it is registered under gets
    the values.
    """
    model_state = model.state_dict()
    missing = [k for k in required if k not in values and not k.endswith("num_batches_tracked")]
    foreign = [k for k in values if k not in model_state]
    conflicts = [f"{k}: file {tuple(v.shape)} vs model {tuple(model_state[k].shape)}"
                 for k, v in values.items() if k in model_state and v.shape != model_state[k].shape]
    _raise_key_errors(f"{path}: cannot initialise the {what} of {type(model).__name__}",
                      (("missing backbone keys", missing, 12), ("keys the model does not have", foreign, 12),
                       ("shape conflicts", conflicts, 3)))
    target, prefix = into if into is not None else (model, "")
    merged = target.state_dict()
    merged.update({k[len(prefix):]: v.to(model_state[k].dtype) for k, v in values.items()})
    target.load_state_dict(merged, strict=True)
    report = LoadReport(loaded=sorted(values),
                        new_keys=[k for k in model_state if k not in values
                                  and not k.endswith("num_batches_tracked")],
                        unused_keys=list(unused))
    print(f"loaded {len(report.loaded)} {what} tensors from {path}")
    if report.new_keys:
        print(f"  new (not in the pretrained file): {_format_keys(report.new_keys)}")
    if report.unused_keys:
        print(f"  file keys not used: {_format_keys(report.unused_keys)}")
    return report


# ------------------------------------------------------------------ DeepLabV2 (Caffe ResNet-101) starts
# What a DeepLabV2 training starts from, recorded with every result: a COCO-segmentation init is
# pixel supervision, which weakly supervised results must declare.
DEEPLABV2_INITS = {
    "coco_segmentation": "COCO segmentation (deeplabv1_resnet101-coco.pth, pixel labels)",
    "imagenet_torchvision": "ImageNet classification (torchvision resnet101)",
    "deeplabv2_checkpoint": "a trained DeepLabV2 checkpoint",
    "scratch": "scratch (random init)",
}
_TV_SUFFIX = {"conv1": "reduce", "bn1": "reduce", "conv2": "conv3x3", "bn2": "conv3x3",
              "conv3": "increase", "bn3": "increase"}


def torchvision_to_deeplabv2_name(key: str) -> str | None:
    """torchvision ResNet key -> DeepLabV2MSC key (None for the 1000-way ``fc``).

    ``conv1``/``bn1`` -> ``base.layer1.conv1.conv``/``.bn``; ``layer{i}.{j}.conv1/bn1`` ->
    ``base.layer{i+1}.block{j+1}.reduce.conv/bn`` (``2`` -> ``conv3x3``, ``3`` -> ``increase``);
    ``downsample.0/1`` -> ``shortcut.conv/bn`` (the reference README's derived map).
    """
    parts = key.split(".")
    if parts[0] == "fc":
        return None
    if parts[0] in ("conv1", "bn1") and len(parts) == 2:
        return f"base.layer1.conv1.{'conv' if parts[0] == 'conv1' else 'bn'}.{parts[1]}"
    if parts[0].startswith("layer") and len(parts) >= 4:
        block = f"base.layer{int(parts[0][5:]) + 1}.block{int(parts[1]) + 1}"
        if parts[2] == "downsample" and len(parts) == 5:
            return f"{block}.shortcut.{'conv' if parts[3] == '0' else 'bn'}.{parts[4]}"
        if parts[2] in _TV_SUFFIX and len(parts) == 4:
            return f"{block}.{_TV_SUFFIX[parts[2]]}.{'conv' if parts[2].startswith('conv') else 'bn'}.{parts[3]}"
    raise DataError(f"torchvision ResNet key {key!r} has no DeepLabV2 counterpart")


def deeplabv2_init_kind(state: Mapping[str, torch.Tensor], path: str) -> str:
    """Which layout a DeepLabV2 start file has (a key of :data:`DEEPLABV2_INITS`, never 'scratch')."""
    if "base.layer1.conv1.conv.weight" in state:
        return "deeplabv2_checkpoint"
    if "layer1.conv1.conv.weight" in state:
        return "coco_segmentation"
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        return "imagenet_torchvision"
    raise DataError(f"{path}: not a DeepLabV2 start: expected the reference's DeepLabV1/V2 ResNet-101 keys "
                    "(layer1.conv1.conv.weight, base.layer1...) or torchvision's (conv1.weight, layer1.0...)")


def load_deeplabv2_init(model: nn.Module, path: str) -> tuple[str, str, LoadReport]:
    """Start a ``DeepLabV2MSC`` from ``path``; returns (init kind, input convention, load report).

    * ``deeplabv1_resnet101-coco.pth`` (626 keys, no prefix): the backbone is taken under
      ``base.``, the 91-class COCO ``fc`` is dropped (as the reference), the ASPP is new.
    * torchvision ``resnet101-63fe2227.pth``: renamed by :func:`torchvision_to_deeplabv2_name`,
      ``fc`` dropped, ASPP new (torchvision's weights then expect torchvision's input).
    * a DeepLabV2 checkpoint (``base.*``: the reference's release or ours): the backbone, and
      the ASPP when its class count matches (else the ASPP is new).

    Every backbone tensor must be there with the model's shape (DataError otherwise). The
    input convention is the one the weights expect: ``caffe_bgr`` for the reference's files,
    ``torchvision`` for torchvision's, the saved one for our checkpoints.
    """
    loaded = _read_weights_file(path)
    file_state = _state_dict_of(loaded, path)
    kind = deeplabv2_init_kind(file_state, path)
    convention = "torchvision" if kind == "imagenet_torchvision" else "caffe_bgr"
    convention = str(_saved_args(loaded).get("input_convention", convention))
    model_state = model.state_dict()
    aspp = [k for k in model_state if k.startswith("base.aspp.")]
    backbone = [k for k in model_state if k.startswith("base.") and k not in aspp]
    values: Dict[str, torch.Tensor] = {}
    unused: List[str] = []
    for key, value in file_state.items():
        if kind == "imagenet_torchvision":
            target = torchvision_to_deeplabv2_name(key)
        elif kind == "coco_segmentation":
            target = None if key.startswith("fc.") else "base." + key
        else:
            target = key
        if target in aspp and value.shape != model_state[target].shape:
            target = None  # a classifier of another class count: the ASPP starts anew
        if target is None:
            unused.append(key)
        else:
            values[target] = value
    return kind, convention, _load_partial(model, values, backbone, unused, path, "DeepLabV2 ResNet-101")


def checkpoint_info(path: str, loaded: object | None = None) -> Tuple[Dict[str, object], List[str]]:
    """The flags a checkpoint was trained with (``{}`` for a bare state dict such as a
    release) and its state-dict keys; ``loaded``: the file's content when read already
    (:func:`read_weights`). The values are not checked here, the load does it."""
    loaded = _read_weights_file(path) if loaded is None else loaded
    return _saved_args(loaded), list(_state_dict_of(loaded, path, check_finite=False))


def load_trained(model: nn.Module, path: str) -> None:
    """Strictly load a trained model: our checkpoint, or a PSA/SEAM ``.pth`` state dict.

    Only ``num_batches_tracked`` may be absent (files from torch < 0.4.1). Anything else
    missing, any unexpected key or a shape conflict raises DataError listing them.
    """
    _load_strictly(model, read_state_dict(path), path)


# Modules whose own ``_load_from_state_dict`` reads nothing of their current tensors (it only
# fills a missing ``num_batches_tracked``), so loading into uninitialised memory is exact.
_STATELESS_LOAD_HOOKS = (FrozenBatchNorm2d, nn.modules.batchnorm._NormBase)


def _loads_every_tensor(model: nn.Module) -> bool:
    """Whether a strict load sets every tensor of ``model`` without reading any of them: no
    non-persistent buffer, no tensor kept as a plain attribute, no load hook of its own
    (IRN's adapt_loaded_state, PAMR's fixed-kernel check) outside ``_STATELESS_LOAD_HOOKS``."""
    if hasattr(model, "adapt_loaded_state"):
        return False
    state_keys = set(model.state_dict(keep_vars=True))
    named = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    named += [name for name, _ in model.named_buffers(remove_duplicate=False)]
    if not state_keys.issuperset(named):
        return False
    for module in model.modules():
        if any(isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter)
               for name, value in vars(module).items() if not name.startswith("_")):
            return False
        hook = type(module)._load_from_state_dict
        if hook is not nn.Module._load_from_state_dict and not isinstance(module, _STATELESS_LOAD_HOOKS):
            return False
    return True


class _SkipRandomInit(TorchFunctionMode):
    """Inside: the initialisers (every in-place ``torch.nn.init`` function, ``Tensor.uniform_`` and
    ``normal_``) leave their tensor as it is (allocated, unset); everything else runs. Scoped to
    one model build."""

    _TENSOR_DRAWS = frozenset({"uniform_", "normal_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        is_init = getattr(func, "__module__", None) == "torch.nn.init" and name.endswith("_")
        target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes it by keyword
        if (is_init or name in self._TENSOR_DRAWS) and isinstance(target, torch.Tensor):
            return target
        return func(*args, **kwargs)


def _build_for_loading(build: Callable[[float], nn.Module], width: float) -> nn.Module:
    """``build(width)`` without the random initialisation that the strict load overwrites.

    The kaiming draws of a full-width ResNet38 take 1.2 s of a start (the reference scripts
    build with them, then load): the model is built with them skipped, and kept when the strict
    load will set every one of its tensors (:func:`_loads_every_tensor`), else built again the
    ordinary way.
    """
    with _SkipRandomInit():
        model = build(width)
    return model if _loads_every_tensor(model) else build(width)


def _load_strictly(model: nn.Module, file_state: Dict[str, torch.Tensor], path: str) -> None:
    target = unwrap_model(model)
    adapt = getattr(target, "adapt_loaded_state", None)
    if adapt is not None:  # IRN: drops the reference's derived index buffers, checks aliases
        file_state = adapt(file_state, path)
    model_state = target.state_dict()
    for key, value in model_state.items():
        if key.endswith("num_batches_tracked") and key not in file_state:
            file_state[key] = torch.zeros_like(value)  # as initialised (never read at inference)
    mismatch = state_mismatch(target, file_state, path)
    if mismatch:
        raise DataError(mismatch)
    try:
        target.load_state_dict(file_state, strict=True)
    except ValueError as error:  # a model's own load check (SIPE's aliases, PAMR's fixed kernels)
        raise DataError(f"{path}: {error}") from error


# ------------------------------------------------------------------ shared by the stage scripts
def start_from_weights(model: nn.Module, weights: str | None) -> LoadReport | None:
    """How every training stage starts: from ``weights`` (pretrained backbone) or from scratch.

    With weights (the ImageNet ``.params`` file, or a PSA/SEAM/our ``.pth`` whose backbone is
    reused), the backbone is loaded strictly and then frozen the SEAM/PSA way (BatchNorm on
    running statistics, ``conv1a`` and ``b2*`` fixed). Without, every layer trains, BatchNorm
    included, or the deep network does not learn. Returns the load report (None from scratch).
    """
    if weights is None:
        print(f"{type(model).__name__}: no --weights, training from scratch (BatchNorm trains)")
        return None
    report = load_pretrained_backbone(model, weights)
    # A model with its own freeze_pretrained (SIPE: re-links its stage aliases) does it; else the backbone.
    (model if hasattr(model, "freeze_pretrained") else _find_backbone(model)[1]).freeze_pretrained()
    return report


def read_weights(path: str) -> object:
    """One read of a weight file, for :func:`saved_args` and :func:`load_for_inference`."""
    return _read_weights_file(path)


def saved_args(loaded: object) -> Dict[str, object]:
    """The training flags recorded in one of our checkpoints (method, backbone, width ...); ``{}`` else."""
    return _saved_args(loaded)


def load_for_inference(build: Callable[[float], nn.Module], weights: str, width_mult: float | None,
                       device: torch.device, loaded: object | None = None, skip_init: bool = True) -> nn.Module:
    """The trained model of an inference script, from one read of ``weights``.

    ``build(width)`` makes the network at ``width_mult``, or else at the width saved in the
    checkpoint (1.0 for PSA/SEAM files); the weights load strictly (:func:`load_trained`); the
    model is returned in eval mode on ``device``, channels_last on CUDA. ``loaded``: the file's
    content when the caller has read it already (:func:`read_weights`). ``skip_init`` False: the
    random initialisation runs before the load, as the reference scripts do it (the bench's baseline).
    """
    loaded = _read_weights_file(weights) if loaded is None else loaded
    width = width_mult or float(_saved_args(loaded).get("width_mult", 1.0))
    model = _build_for_loading(build, width) if skip_init else build(width)
    _load_strictly(model, _state_dict_of(loaded, weights), weights)
    model = model.eval().to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model
