"""Checked reading and atomic writing of every file the pipeline touches.

Reads raise :class:`DataError` naming the file and what is wrong, so a bad input fails
before hours of compute; writes go to a temporary file in the same folder and are renamed
into place, so an interrupted run never leaves a half-written output behind.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from tool.contract import VOC_PALETTE


class DataError(Exception):
    """Bad input data: the message names the file and what is wrong.

    A DataError raised in a DataLoader worker is re-raised by torch as
    ``DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback ...")``;
    the constructor keeps only the original message, so the user still sees one line.
    """

    def __init__(self, message: str = "", *args: Any) -> None:
        if isinstance(message, str) and message.startswith("Caught DataError") and "\nOriginal Traceback" in message:
            marker = "DataError: "
            message = message[message.rfind(marker) + len(marker):].strip() if marker in message else message
        super().__init__(message, *args)


def _umask() -> int:
    """The process umask, read without changing it where /proc tells it (os.umask would, briefly)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- writing
@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    handle, tmp_path = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=suffix)
    os.close(handle)
    try:
        # mkstemp creates 0600; the output gets the mode a plain open() would give it.
        os.chmod(tmp_path, 0o666 & ~_umask())
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as error:
        if error.filename is None:  # a failed write (full disk) names no file: name the output
            raise OSError(error.errno, error.strerror, path) from error
        raise
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp_path:
        with open(tmp_path, "wb") as handle:
            handle.write(data)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_npy(path: str, obj) -> None:
    """``np.save`` written atomically; dicts are pickled as SEAM does (load with allow_pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, obj, allow_pickle=True)
    atomic_write_bytes(path, buffer.getvalue())


def check_finite_scores(path: str, score_dict: Mapping) -> None:
    """Raise DataError naming ``path`` and the first key whose scores hold NaN or inf."""
    for key, value in score_dict.items():
        array = np.asarray(value)
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            raise DataError(f"{path}: scores of key {key} are not finite (NaN or inf; the weights that made "
                            f"them have diverged?)")


def save_score_dict(path: str, score_dict: Mapping) -> None:
    """``save_npy`` of a CAM/CRF dict, refusing one with non-finite scores."""
    check_finite_scores(path, score_dict)
    save_npy(path, score_dict)


def save_palette_png(path: str, label: np.ndarray) -> None:
    """Write a uint8 label map as an 8-bit PNG with the VOC palette."""
    if label.ndim != 2:
        raise ValueError(f"{path}: a label map must be 2-D, got shape {label.shape}")
    image = Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8), mode="P")
    image.putpalette(VOC_PALETTE.tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def save_rgb_image(path: str, image: np.ndarray, quality: int = 95) -> None:
    """Write an HxWx3 uint8 RGB array; the format follows the extension (.jpg or .png)."""
    fmt = "JPEG" if path.lower().endswith((".jpg", ".jpeg")) else "PNG"
    buffer = io.BytesIO()
    options = {"quality": quality} if fmt == "JPEG" else {}
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format=fmt, **options)
    atomic_write_bytes(path, buffer.getvalue())


# --------------------------------------------------------------------------- reading
def read_rgb_image(path: str) -> np.ndarray:
    """Read an image as HxWx3 uint8 RGB; a missing or corrupt file raises DataError."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: image file does not exist")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(f"{path}: cannot decode image ({error})") from error


def image_size(path: str) -> tuple[int, int]:
    """(height, width) from the image header; a missing or unreadable file raises DataError."""
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except FileNotFoundError:
        raise DataError(f"{path}: image file does not exist") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(f"{path}: cannot decode image ({error})") from error


def _decoded_size(path: str) -> tuple[int, int]:
    """(height, width) of an image that fully decodes (JPEGs at 1/8 scale: every byte is still
    parsed, at a fraction of the cost); DataError naming the file otherwise."""
    try:
        with Image.open(path) as image:
            height, width = image.height, image.width
            if height < 1 or width < 1:
                raise DataError(f"{path}: image has size {width}x{height}")
            image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            image.load()
        return height, width
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: image file does not exist") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(f"{path}: cannot decode image ({error})") from error


# In a dataset root: which images were already checked to decode (by file size and mtime).
IMAGE_CHECK_CACHE = ".image_check.json"


def check_images_decode(paths: Sequence[str], cache_path: str | None = None, workers: int = 8) -> None:
    """Check that every image decodes, in parallel threads, before any compute is spent.

    Images already checked with the same size and mtime (``cache_path``, a JSON file) are
    not read again; the cache is best effort (a read-only dataset folder just is not cached).
    The first bad image, in list order, raises DataError.
    """
    cache: dict[str, list[int]] = {}
    if cache_path and os.path.isfile(cache_path):
        try:
            with open(cache_path, encoding="utf-8") as handle:
                loaded = json.load(handle)
            cache = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            cache = {}
    stamps: dict[str, list[int]] = {}
    todo = []
    for path in paths:
        try:
            status = os.stat(path)
        except OSError:
            raise DataError(f"{path}: image file does not exist") from None
        stamps[path] = [status.st_size, status.st_mtime_ns]
        entry = cache.get(os.path.abspath(path))
        if not (isinstance(entry, list) and entry[:2] == stamps[path]):
            todo.append(path)
    if not todo:
        return
    with ThreadPoolExecutor(max(1, min(workers, len(todo), os.cpu_count() or 1))) as pool:
        sizes = list(pool.map(_decoded_size, todo))
    if cache_path:
        cache.update({os.path.abspath(path): stamps[path] + list(size) for path, size in zip(todo, sizes)})
        try:
            atomic_write_text(cache_path, json.dumps(cache, separators=(",", ":")))
        except OSError:
            pass  # only a cache: an unwritable dataset folder is checked again next time


def read_label_png(path: str, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Read a label map PNG as HxW uint8 (palette indices, not colours)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: label file does not exist")
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L", "I", "I;16"):
                raise DataError(f"{path}: label PNG has mode {image.mode}; expected an indexed (P) or grey (L) map")
            label = np.asarray(image)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(f"{path}: cannot decode label PNG ({error})") from error
    if label.ndim != 2:
        raise DataError(f"{path}: label map must be 2-D, got shape {label.shape}")
    if expected_hw is not None and tuple(label.shape) != tuple(expected_hw):
        raise DataError(f"{path}: label size {label.shape[0]}x{label.shape[1]} does not match "
                        f"image size {expected_hw[0]}x{expected_hw[1]}")
    return label.astype(np.uint8, copy=False)


def load_npy_dict(path: str, expected: str) -> Mapping:
    """The dict saved in a ``.npy`` file (SEAM's format for CAM, CRF and label dicts).

    An unreadable file or a content that is not a dict raises DataError; ``expected``
    describes the dict in that message.
    """
    try:
        loaded = np.load(path, allow_pickle=True)
        content = loaded.item() if isinstance(loaded, np.ndarray) and loaded.dtype == object else loaded
    except (OSError, ValueError, EOFError, pickle.UnpicklingError) as error:
        raise DataError(f"{path}: cannot read .npy ({error})") from error
    if not isinstance(content, Mapping):
        raise DataError(f"{path}: expected a dict {expected}, got {type(content).__name__}")
    return content


def load_score_dict(path: str, num_keys: int, one_based: bool = False) -> dict[int, np.ndarray]:
    """Load a CAM dict (0-based keys < num_keys) or CRF dict (keys 0..num_keys, 0 = bg).

    Raises DataError for a missing or unreadable file, a non-dict, a key outside the class
    range, or values of different sizes.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: score dict does not exist")
    score_dict = load_npy_dict(path, "{class_index: HxW array}")
    upper = num_keys + 1 if one_based else num_keys
    shapes = set()
    result: dict[int, np.ndarray] = {}
    for key, value in score_dict.items():
        if not (isinstance(key, (int, np.integer)) and 0 <= int(key) < upper):
            raise DataError(f"{path}: key {key!r} is outside the class range 0..{upper - 1}")
        value = np.asarray(value, dtype=np.float32)
        if value.ndim != 2:
            raise DataError(f"{path}: value of key {key} has shape {value.shape}; expected HxW")
        shapes.add(value.shape)
        result[int(key)] = value
    if len(shapes) > 1:
        raise DataError(f"{path}: values have different sizes {sorted(shapes)}")
    check_finite_scores(path, result)
    return result


def read_id_list(path: str) -> list[str]:
    """Read an image-id list (one id per line; a VOC ``id label`` line keeps only the id)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: list file does not exist")
    with open(path, encoding="utf-8") as handle:
        numbered = [(number, line.split()[0]) for number, line in enumerate(handle, 1) if line.strip()]
    if not numbered:
        raise DataError(f"{path}: list is empty")
    # Some VOC lists name files ('/JPEGImages/2007_000032.jpg'): keep the stem.
    ids, first_line = [], {}
    for number, entry in numbered:
        image_id = os.path.splitext(os.path.basename(entry))[0]
        if image_id in first_line:  # evaluation would count it twice, training would oversample it
            raise DataError(f"{path}: id {image_id!r} is listed twice (lines {first_line[image_id]} and {number})")
        first_line[image_id] = number
        ids.append(image_id)
    return ids


def read_json_if_present(path: str) -> Any | None:
    """The JSON content of ``path``, or None when the file does not exist (yet)."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def output_done(path: str) -> bool:
    """A finished output: outputs are written atomically, so an existing, non-empty, readable
    file is a complete one (a zero-byte or unreadable file was not made by this pipeline)."""
    try:
        return os.path.isfile(path) and os.path.getsize(path) > 0 and os.access(path, os.R_OK)
    except OSError:
        return False


def pending_ids(image_ids: Iterable[str], outputs_of: Callable[[str], Iterable[str]]) -> list[str]:
    """The ids, in order, whose output files are not all done yet: what an inference stage
    still has to do (see :func:`output_done`)."""
    return [image_id for image_id in image_ids if not all(output_done(path) for path in outputs_of(image_id))]


def require_files(paths: Iterable[str], what: str, source: str | None = None) -> None:
    """Raise one DataError listing the first ten missing files and the count."""
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        origin = f" named in {source}" if source else ""
        shown = "\n  ".join(missing[:10])
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DataError(f"{len(missing)} {what}{origin} do not exist:\n  {shown}{more}")
