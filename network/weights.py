"""All weight loading: MXNet ``.params`` (read without MXNet), PSA/SEAM ``.pth``, our checkpoints.

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
from typing import BinaryIO, Callable, Dict, List, Mapping, NamedTuple, Tuple

import numpy as np
import torch
import torch.nn as nn

from network.resnet import ResNet
from network.resnet38 import ResNet38
from tool.fileio import DataError
from tool.training import unwrap_model

# ------------------------------------------------------------------ MXNet .params reader
_LIST_MAGIC = 0x112
_NDARRAY_V1_MAGIC = 0xF993FAC8  # int64 shape dims
_NDARRAY_V2_MAGIC = 0xF993FAC9  # + storage type
# mshadow type flags -> numpy dtypes (little-endian, as MXNet writes them on x86/ARM).
_MXNET_DTYPES: Dict[int, np.dtype] = {
    0: np.dtype("<f4"), 1: np.dtype("<f8"), 2: np.dtype("<f2"), 3: np.dtype("u1"),
    4: np.dtype("<i4"), 5: np.dtype("i1"), 6: np.dtype("<i8"), 7: np.dtype("?"),
    8: np.dtype("<i2"), 9: np.dtype("<u2"), 10: np.dtype("<u4"), 11: np.dtype("<u8"),
}


class _Reader:
    """Little-endian reads from a binary file that raise DataError at a truncated record."""

    def __init__(self, handle: BinaryIO, path: str) -> None:
        self.handle = handle
        self.path = path

    def read(self, size: int, what: str) -> bytes:
        data = self.handle.read(size)
        if len(data) != size:
            raise DataError(f"{self.path}: truncated MXNet params file while reading {what}")
        return data

    def unpack(self, fmt: str, what: str) -> Tuple:
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt), what))


def _read_ndarray(reader: _Reader, index: int) -> np.ndarray | None:
    """One NDArray record (V2, V1 or the legacy layout); None for an empty ("none") array."""
    what = f"array {index}"
    (magic,) = reader.unpack("I", what)
    if magic == _NDARRAY_V2_MAGIC:
        (storage_type,) = reader.unpack("i", what)
        if storage_type != 0:
            raise DataError(f"{reader.path}: {what} has sparse storage type {storage_type}; "
                            "only dense arrays are supported")
        (ndim,) = reader.unpack("I", what)
        shape = reader.unpack(f"{ndim}q", what)
    elif magic == _NDARRAY_V1_MAGIC:
        (ndim,) = reader.unpack("I", what)
        shape = reader.unpack(f"{ndim}q", what)
    elif magic < 64:  # legacy layout without magic: the first uint32 is ndim, dims are uint32
        ndim = magic
        shape = reader.unpack(f"{ndim}I", what)
    else:
        raise DataError(f"{reader.path}: {what} has unknown NDArray magic 0x{magic:08x}")
    if ndim == 0:
        return None
    if any(d < 0 for d in shape):
        raise DataError(f"{reader.path}: {what} has a negative dimension {shape}")
    reader.unpack("ii", what)  # context (dev_type, dev_id): arrays are always read to CPU
    (type_flag,) = reader.unpack("i", what)
    if type_flag not in _MXNET_DTYPES:
        raise DataError(f"{reader.path}: {what} has unsupported MXNet type flag {type_flag}")
    dtype = _MXNET_DTYPES[type_flag]
    count = int(np.prod(shape, dtype=np.int64))
    data = reader.read(count * dtype.itemsize, f"{what} data")
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def read_mxnet_params(path: str) -> Dict[str, np.ndarray]:
    """Read an MXNet ``nd.save`` file (``.params``) into ``{name: array}`` without MXNet.

    Names keep their ``arg:``/``aux:`` prefixes. Layout: uint64 magic 0x112, uint64
    reserved, uint64 count, the arrays, uint64 count, then each name as uint64 length +
    bytes.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: MXNet params file not found")
    with open(path, "rb") as handle:
        reader = _Reader(handle, path)
        magic, _reserved = reader.unpack("QQ", "header")
        if magic != _LIST_MAGIC:
            raise DataError(f"{path}: not an MXNet NDArray list (magic 0x{magic:x}, expected 0x112)")
        (num_arrays,) = reader.unpack("Q", "array count")
        arrays = [_read_ndarray(reader, i) for i in range(num_arrays)]
        (num_names,) = reader.unpack("Q", "name count")
        if num_names != num_arrays:
            raise DataError(f"{path}: {num_arrays} arrays but {num_names} names "
                            "(an unnamed list cannot be mapped to parameters)")
        names = []
        for i in range(num_names):
            (length,) = reader.unpack("Q", f"name {i} length")
            names.append(reader.read(length, f"name {i}").decode("utf-8"))
        if handle.read(1):
            raise DataError(f"{path}: trailing bytes after the MXNet name list")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: duplicate parameter names")
    return {name: array for name, array in zip(names, arrays) if array is not None}


# ------------------------------------------------------------------ MXNet -> ResNet38 names
_BN_SUFFIX = {"gamma": "weight", "beta": "bias", "mean": "running_mean", "var": "running_var"}


def _mxnet_block_name(unit: str) -> str:
    """``res4a``/``bn4a`` -> ``b4``; ``res4b3``/``bn4b3`` -> ``b4_3`` (single-digit stage/unit)."""
    if unit.endswith("a"):
        return f"b{unit[-2]}"
    return f"b{unit[-3]}_{unit[-1]}"


def mxnet_parameter_name(name: str) -> str | None:
    """PSA/SEAM ``convert_mxnet_to_torch`` rule for one name; None for the dropped classifier.

    Raises DataError for a name that is not an rna-a1 (ResNet38) parameter, instead of
    mapping it to ``bn7`` as the reference's fall-through does.
    """
    bare = name.split(":", 1)[1] if name.startswith(("arg:", "aux:")) else name
    tokens = bare.split("_")
    unit = tokens[0]
    if unit == "conv1a" and tokens[1:] == ["weight"]:
        return "conv1a.weight"
    if unit == "linear1000":
        return None
    if len(tokens) >= 3 and tokens[1].startswith("branch"):
        block = _mxnet_block_name(unit)
        if unit.startswith("res") and tokens[2:] == ["weight"]:
            return f"{block}.conv_{tokens[1]}.weight"
        if unit.startswith("bn") and tokens[-1] in _BN_SUFFIX:
            return f"{block}.bn_{tokens[1]}.{_BN_SUFFIX[tokens[-1]]}"
    if unit == "bn7" and tokens[-1] in _BN_SUFFIX:
        return f"bn7.{_BN_SUFFIX[tokens[-1]]}"
    raise DataError(f"MXNet parameter {name!r} is not a ResNet38 (rna-a1) parameter")


def mxnet_to_resnet38(params: Mapping[str, np.ndarray]) -> Dict[str, torch.Tensor]:
    """Map MXNet rna-a1 parameters to ResNet38 state-dict entries (``linear1000`` dropped).

    ``num_batches_tracked`` is not produced (MXNet has none).
    """
    state: Dict[str, torch.Tensor] = {}
    for name, array in params.items():
        key = mxnet_parameter_name(name)
        if key is None:
            continue
        if key in state:
            raise DataError(f"MXNet parameter {name!r} maps to {key!r}, which is already taken")
        state[key] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return state


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
    """``torch.load`` on CPU; the full unpickler only where the safe one refuses the content."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types on a corrupt file
        refused = (isinstance(error, pickle.UnpicklingError)
                   and "weights only load failed" in str(error).lower())
        if not refused:
            raise DataError(f"{path}: cannot read weights ({error})") from error
    # Our checkpoints may hold optimiser/RNG state that the safe unpickler refuses.
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # any unpickling failure means a bad file
        raise DataError(f"{path}: cannot read weights ({error})") from error


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

    ``.pth`` may be a bare state dict (PSA/SEAM releases) or our checkpoint (a dict with a
    ``'model'`` entry); ``module.`` prefixes are removed.
    """
    return _state_dict_of(_read_weights_file(path), path)


def _state_dict_of(loaded: object, path: str) -> Dict[str, torch.Tensor]:
    if isinstance(loaded, Mapping):
        for wrapper_key in ("model", "state_dict"):
            if wrapper_key in loaded and isinstance(loaded[wrapper_key], Mapping):
                loaded = loaded[wrapper_key]
                break
    if not isinstance(loaded, Mapping) or not all(
            isinstance(v, torch.Tensor) for v in loaded.values()):
        raise DataError(f"{path}: not a state dict (a mapping from names to tensors)")
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


def _format_keys(keys: List[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


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
    model_state = model.state_dict()
    backbone_keys = [prefix + k for k in backbone.backbone_state_keys()]

    values: Dict[str, torch.Tensor] = {}
    used_file_keys = set()
    missing, conflicts = [], []
    for model_key in backbone_keys:
        relative_key = model_key[len(prefix):]
        file_key = model_key if model_key in file_state else relative_key
        if file_key not in file_state:
            if not model_key.endswith("num_batches_tracked"):
                missing.append(model_key)
            continue
        value = file_state[file_key]
        if value.shape != model_state[model_key].shape:
            conflicts.append(f"{model_key}: file {tuple(value.shape)} vs model "
                             f"{tuple(model_state[model_key].shape)}")
            continue
        values[model_key] = value
        used_file_keys.add(file_key)
    if missing or conflicts:
        message = [f"{path}: cannot initialise the {type(backbone).__name__} backbone of {type(model).__name__}"]
        if missing:
            message.append(f"missing backbone keys ({len(missing)}): {_format_keys(missing)}")
        if conflicts:
            message.append(f"shape conflicts ({len(conflicts)}): {_format_keys(conflicts, 3)}")
        raise DataError("; ".join(message))

    merged = dict(model_state)
    merged.update({k: v.to(model_state[k].dtype) for k, v in values.items()})
    model.load_state_dict(merged, strict=True)

    report = LoadReport(loaded=sorted(values),
                        new_keys=[k for k in model_state if k not in values
                                  and not k.endswith("num_batches_tracked")],
                        unused_keys=[k for k in file_state if k not in used_file_keys])
    print(f"loaded {len(report.loaded)} backbone tensors from {path}")
    if report.new_keys:
        print(f"  new (not in the pretrained file): {_format_keys(report.new_keys)}")
    if report.unused_keys:
        print(f"  file keys not used: {_format_keys(report.unused_keys)}")
    return report


def load_trained(model: nn.Module, path: str) -> None:
    """Strictly load a trained model: our checkpoint, or a PSA/SEAM ``.pth`` state dict.

    Only ``num_batches_tracked`` may be absent (files from torch < 0.4.1). Anything else
    missing, any unexpected key or a shape conflict raises DataError listing them.
    """
    _load_strictly(model, read_state_dict(path), path)


def _load_strictly(model: nn.Module, file_state: Dict[str, torch.Tensor], path: str) -> None:
    target = unwrap_model(model)
    adapt = getattr(target, "adapt_loaded_state", None)
    if adapt is not None:  # IRN: drops the reference's derived index buffers, checks aliases
        file_state = adapt(file_state, path)
    model_state = target.state_dict()
    for key, value in model_state.items():
        if key.endswith("num_batches_tracked") and key not in file_state:
            file_state[key] = value.clone()
    missing = [k for k in model_state if k not in file_state]
    unexpected = [k for k in file_state if k not in model_state]
    conflict = next((f"{k}: file {tuple(file_state[k].shape)} vs model {tuple(v.shape)}"
                     for k, v in model_state.items()
                     if k in file_state and file_state[k].shape != v.shape), None)
    if missing or unexpected or conflict:
        message = [f"{path} does not match {type(target).__name__}"]
        if missing:
            message.append(f"missing keys ({len(missing)}): {_format_keys(missing)}")
        if unexpected:
            message.append(f"unexpected keys ({len(unexpected)}): {_format_keys(unexpected)}")
        if conflict:
            message.append(f"first shape conflict: {conflict}")
        raise DataError("; ".join(message))
    target.load_state_dict(file_state, strict=True)


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
    _find_backbone(model)[1].freeze_pretrained()
    return report


def load_for_inference(build: Callable[[float], nn.Module], weights: str, width_mult: float | None,
                       device: torch.device) -> nn.Module:
    """The trained model of an inference script, from one read of ``weights``.

    ``build(width)`` makes the network at ``width_mult``, or else at the width saved in the
    checkpoint (1.0 for PSA/SEAM files); the weights load strictly (:func:`load_trained`); the
    model is returned in eval mode on ``device``, channels_last on CUDA.
    """
    loaded = _read_weights_file(weights)
    model = build(width_mult or float(_saved_args(loaded).get("width_mult", 1.0)))
    _load_strictly(model, _state_dict_of(loaded, weights), weights)
    model = model.eval().to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model
