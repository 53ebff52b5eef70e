"""ImageNet weights of ResNet38 (model A1): MXNet ``.params`` read without MXNet, mapped to its names.

* :func:`read_mxnet_params` - an MXNet ``nd.save`` file -> ``{name: array}``;
* :func:`mxnet_parameter_name` / :func:`mxnet_to_resnet38` - PSA/SEAM's name mapping to the
  ResNet38 state-dict keys (``linear1000`` dropped).
"""
from __future__ import annotations

import os
import struct
from typing import BinaryIO, Dict, Mapping, Tuple

import numpy as np
import torch

from tool.fileio import DataError

# ------------------------------------------------------------------ MXNet .params reader
MXNET_LIST_MAGIC = 0x112
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
        if magic != MXNET_LIST_MAGIC:
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
