"""Joint image / label transforms on numpy arrays, with every random choice from an explicit rng.

Images are HxWx3 (uint8 before :func:`normalize`, float32 after), labels HxW uint8. A joint
transform takes ``label=None`` and returns ``(image, label)`` so the same geometric change hits
both; labels are resized with nearest neighbour and padded with ``IGNORE_LABEL`` (255). Each
random transform takes ``rng: np.random.Generator`` and draws nothing from any global state,
so a dataset seeding ``np.random.default_rng((seed, epoch, index))`` is reproducible whatever
the number of workers. The SEAM/PSA behaviours kept here: long-side resize with bicubic
interpolation, crop boxes drawn width first, crop padding 0 after normalisation (= the mean).
"""
from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image

from tool.contract import IGNORE_LABEL, IMAGENET_MEAN, IMAGENET_STD

_RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32)


class CropBox(NamedTuple):
    """Where a crop came from, in PSA's order: ``container[ct:ct+h, cl:cl+w] = image[it:it+h, il:il+w]``."""

    cont_top: int
    cont_left: int
    img_top: int
    img_left: int
    height: int
    width: int


# ------------------------------------------------------------------ resizing
def resize_image(image: np.ndarray, size_wh: tuple[int, int], resample: str = "bicubic") -> np.ndarray:
    """Resize a uint8 HxWx3 image to (width, height) with PIL."""
    if (image.shape[1], image.shape[0]) == tuple(size_wh):
        return image
    return np.asarray(Image.fromarray(image).resize(tuple(size_wh), resample=_RESAMPLE[resample]))


def resize_label(label: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """Resize a uint8 label map to (width, height) with nearest neighbour (no new values)."""
    if (label.shape[1], label.shape[0]) == tuple(size_wh):
        return label
    return np.asarray(Image.fromarray(label).resize(tuple(size_wh), resample=Image.NEAREST))


def resize_joint(image: np.ndarray, size_wh: tuple[int, int], label: np.ndarray | None = None,
                 resample: str = "bicubic") -> tuple[np.ndarray, np.ndarray | None]:
    return resize_image(image, size_wh, resample), None if label is None else resize_label(label, size_wh)


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """(width, height) scaled as SEAM's multi-scale inference does: Python ``round`` of each side."""
    return max(1, round(width * scale)), max(1, round(height * scale))


def random_resize_long(image: np.ndarray, rng: np.random.Generator, long_range: tuple[int, int],
                       label: np.ndarray | None = None, resample: str = "bicubic"
                       ) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize so the long side is a random integer in ``long_range`` (inclusive), as SEAM's ResizeLong."""
    target_long = int(rng.integers(long_range[0], long_range[1] + 1))
    height, width = image.shape[:2]
    if width < height:
        size = (max(1, int(round(width * target_long / height))), target_long)
    else:
        size = (target_long, max(1, int(round(height * target_long / width))))
    return resize_joint(image, size, label, resample)


def random_rescale(image: np.ndarray, rng: np.random.Generator, scale_range: tuple[float, float] = (0.5, 1.5),
                   label: np.ndarray | None = None, resample: str = "bilinear"
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """Rescale both sides by one factor drawn uniformly from ``scale_range`` (DeepLab: 0.5..1.5)."""
    scale = float(rng.uniform(scale_range[0], scale_range[1]))
    height, width = image.shape[:2]
    size = scaled_size(height, width, scale)
    return resize_joint(image, size, label, resample)


def random_rescale_choice(image: np.ndarray, rng: np.random.Generator, choices: tuple[float, ...],
                          label: np.ndarray | None = None, resample: str = "bilinear"
                          ) -> tuple[np.ndarray, np.ndarray | None]:
    """Rescale by one factor drawn from ``choices`` (DeepLabV2: 0.5, 0.75, 1, 1.25, 1.5); each side
    becomes ``int(side * scale)`` (truncated, as the reference)."""
    scale = float(choices[int(rng.integers(len(choices)))])
    height, width = image.shape[:2]
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    return resize_joint(image, size, label, resample)


# ------------------------------------------------------------------ cropping
def random_crop_box(height: int, width: int, crop_size: int, rng: np.random.Generator) -> CropBox:
    """A crop (or pad) box of ``crop_size`` squared; the width offset is drawn first, as in PSA."""
    box_w, box_h = min(crop_size, width), min(crop_size, height)
    space_w, space_h = width - crop_size, height - crop_size
    cont_left, img_left = (0, int(rng.integers(space_w + 1))) if space_w > 0 else (int(rng.integers(-space_w + 1)), 0)
    cont_top, img_top = (0, int(rng.integers(space_h + 1))) if space_h > 0 else (int(rng.integers(-space_h + 1)), 0)
    return CropBox(cont_top, cont_left, img_top, img_left, box_h, box_w)


def center_crop_box(height: int, width: int, crop_size: int) -> CropBox:
    """The deterministic counterpart of :func:`random_crop_box`: centred crop or centred padding."""
    box_w, box_h = min(crop_size, width), min(crop_size, height)
    space_w, space_h = width - crop_size, height - crop_size
    cont_left, img_left = (0, space_w // 2) if space_w > 0 else (-space_w // 2, 0)
    cont_top, img_top = (0, space_h // 2) if space_h > 0 else (-space_h // 2, 0)
    return CropBox(cont_top, cont_left, img_top, img_left, box_h, box_w)


def apply_crop_box(array: np.ndarray, box: CropBox, crop_size: int, fill: float | int) -> np.ndarray:
    """Paste ``array[box]`` into a ``crop_size`` squared container filled with ``fill`` (any trailing dims)."""
    container = np.full((crop_size, crop_size) + array.shape[2:], fill, dtype=array.dtype)
    container[box.cont_top:box.cont_top + box.height, box.cont_left:box.cont_left + box.width] = \
        array[box.img_top:box.img_top + box.height, box.img_left:box.img_left + box.width]
    return container


def random_crop(image: np.ndarray, crop_size: int, rng: np.random.Generator, label: np.ndarray | None = None,
                image_fill: float = 0.0, label_fill: int = IGNORE_LABEL
                ) -> tuple[np.ndarray, np.ndarray | None, CropBox]:
    """Crop (padding where the image is smaller) image and label to ``crop_size``; returns the box.

    Pad the image after :func:`normalize` so ``image_fill=0`` is the ImageNet mean; the label
    is padded with 255 (ignored by the losses).
    """
    box = random_crop_box(image.shape[0], image.shape[1], crop_size, rng)
    cropped_label = None if label is None else apply_crop_box(label, box, crop_size, label_fill)
    return apply_crop_box(image, box, crop_size, image_fill), cropped_label, box


# ------------------------------------------------------------------ flipping
def hflip(image: np.ndarray, label: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Mirror left-right (copies, so the result can become a tensor)."""
    return image[:, ::-1].copy(), None if label is None else label[:, ::-1].copy()


def random_hflip(image: np.ndarray, rng: np.random.Generator, label: np.ndarray | None = None,
                 probability: float = 0.5) -> tuple[np.ndarray, np.ndarray | None]:
    if rng.random() < probability:
        return hflip(image, label)
    return image, label


# ------------------------------------------------------------------ colour
def color_jitter(image: np.ndarray, rng: np.random.Generator, brightness: float = 0.3, contrast: float = 0.3,
                 saturation: float = 0.3, hue: float = 0.1) -> np.ndarray:
    """torchvision's ColorJitter (SEAM: 0.3, 0.3, 0.3, 0.1) with its order and factors drawn from ``rng``."""
    # Imported here: torchvision pulls in torch._dynamo (seconds), which only training needs.
    import torchvision.transforms.functional as TF

    order = rng.permutation(4)
    factors = (rng.uniform(max(0.0, 1 - brightness), 1 + brightness),
               rng.uniform(max(0.0, 1 - contrast), 1 + contrast),
               rng.uniform(max(0.0, 1 - saturation), 1 + saturation),
               rng.uniform(-hue, hue))
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    picture = Image.fromarray(image)
    for index in order:
        picture = adjust[index](picture, float(factors[index]))
    return np.asarray(picture)


def hsv_jitter(image: np.ndarray, rng: np.random.Generator, hue: int = 10, saturation: int = 10,
               value: int = 10) -> np.ndarray:
    """Shift OpenCV HSV channels by integers drawn in [-r, r] (the DeepLab codebase's RandomHSV).

    Hue wraps around (OpenCV hue is 0..179); saturation and value are clipped to 0..255.
    """
    shift = [int(rng.integers(-limit, limit + 1)) for limit in (hue, saturation, value)]
    hsv = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV).astype(np.int32)
    hsv[..., 0] = (hsv[..., 0] + shift[0]) % 180
    hsv[..., 1:] = np.clip(hsv[..., 1:] + np.asarray(shift[1:]), 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


# ------------------------------------------------------------------ normalisation
def normalize(image: np.ndarray, mean: tuple[float, ...] | None = None,
              std: tuple[float, ...] | None = None) -> np.ndarray:
    """uint8 RGB HxWx3 -> float32 ``(x/255 - mean) / std``; by default the ImageNet statistics
    (MSA passes its own constants)."""
    mean_ = _MEAN if mean is None else np.asarray(mean, dtype=np.float32)
    std_ = _STD if std is None else np.asarray(std, dtype=np.float32)
    return (image.astype(np.float32) / 255.0 - mean_) / std_


def rgb_to_lab_uint8(image: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit LAB of a uint8 RGB image (L * 255 / 100, a + 128, b + 128), HxWx3 uint8
    (the SpixelFCN colour target)."""
    import cv2  # imported late: only the superpixel data path needs OpenCV
    return cv2.cvtColor(np.ascontiguousarray(image, dtype=np.uint8), cv2.COLOR_RGB2LAB)


def denormalize(image: np.ndarray, truncate: bool = False) -> np.ndarray:
    """Inverse of :func:`normalize` -> uint8, clipped to 0..255.

    Rounds to the nearest value (an exact inverse). ``truncate=True`` reproduces PSA's
    ``infer_aff --crf``, which truncates and so can lose one grey level.
    """
    values = np.clip((image.astype(np.float32) * _STD + _MEAN) * 255.0, 0, 255)
    return (values if truncate else np.rint(values)).astype(np.uint8)


def hwc_to_chw(image: np.ndarray) -> np.ndarray:
    """HxWxC -> CxHxW, contiguous (ready for ``torch.from_numpy``)."""
    return np.ascontiguousarray(np.transpose(image, (2, 0, 1)))
