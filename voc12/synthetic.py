"""A deterministic synthetic dataset in the PASCAL VOC layout, small enough to train on CPU.

    python -m voc12.synthetic --out ROOT [--num_train 160 --num_val 48 --image_size 112
                                          --num_classes 6 --seed 0] [--prepare]

Writes ``JPEGImages/<id>.jpg`` (quality 95), ``SegmentationClass/<id>.png`` and an identical
``SegmentationClassAug/<id>.png`` (VOC palette PNGs), ``ImageSets/Segmentation/{train,val}.txt``
and ``class_names.txt`` (background first). ``--prepare`` also runs ``voc12.prepare`` on it.

A class is a combination of shape, texture and colour family. With 4 or more classes each
attribute value used is shared by at least two classes, so no single attribute identifies
a class: the network has to combine them (and weak supervision must find which pixels carry
them). Each image holds 1 to 4 objects of 1 to 3 classes with jittered colour, size and
rotation over a cluttered background of muted blobs, thin lines of any colour and noise;
objects may occlude each other (each keeps at least half of itself visible). As in VOC, the
label has a 255 band (2 px: one each side) on every object outline.

``--style parts`` draws another difficulty, the one WSSS methods address: a classifier that
recognises the classes but activates only their most discriminative part. Every object is a
body of random shape painted with a grey checker (the same for every class, so it carries no
class evidence, but unlike the muted background) holding one plain-coloured badge (a disc of
0.6-0.7 of the object's radius) whose colour names the class: a hue family (red,
green, blue; with more than 6 classes also yellow, cyan, magenta) in a light or a dark tone
(the tones are far apart in value, which SEAM's hue jitter does not change). The label is the
whole object, badge and body. Up to 12 classes.
"""
from __future__ import annotations

import argparse
import colorsys
import logging
import os
from dataclasses import dataclass

import cv2
import numpy as np
from tqdm import tqdm

from tool.cli import run_cli
from tool.contract import IGNORE_LABEL
from tool.fileio import DataError, atomic_write_text, save_palette_png, save_rgb_image
from voc12 import layout
from voc12.prepare import prepare_voc

LOGGER = logging.getLogger(__name__)

SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "ring", "cross")
# Listed most distinct first: with few classes only the first values are used.
TEXTURES: tuple[str, ...] = ("striped", "dotted", "plain", "checked")
# Colour family -> hue centre (0..1). Three families a third of the hue circle apart: SEAM's
# colour jitter shifts hue by up to +-0.1, which with the +-0.03 per-object jitter must not
# carry one family into another (6 families 1/6 apart would overlap under augmentation).
COLOUR_HUES: dict[str, float] = {"red": 0.0, "green": 1 / 3, "blue": 2 / 3}
MIN_CLASSES, MAX_CLASSES = 2, 20
MAX_OBJECTS, MAX_CLASSES_PER_IMAGE = 4, 3
# Object diameter as a fraction of the geometric mean image side.
OBJECT_SIZE_RANGE = (0.22, 0.45)
# Fraction of its own area an occluded object keeps visible; minimum visible pixels.
MIN_VISIBLE_FRACTION, MIN_VISIBLE_PIXELS = 0.5, 40
_PLACEMENT_TRIES = 25
_CLASS_SEARCH_TRIES = 400


@dataclass(frozen=True)
class SyntheticClass:
    shape: str
    texture: str
    colour: str

    @property
    def name(self) -> str:
        return f"{self.colour}_{self.texture}_{self.shape}"


# ---------------------------------------------------------------------------- class design
def class_definitions(num_classes: int) -> list[SyntheticClass]:
    """The attribute triples of ``num_classes`` classes (depends on the count only, not the seed).

    Each attribute cycles through ``m = max(2, min(len(values), num_classes // 2))`` values, so
    every value used is shared by ``num_classes // m >= 2`` classes when ``num_classes >= 4``
    (2 or 3 classes cannot satisfy this: some value must then be unique). Among random
    pairings of the three balanced sequences, keep the one whose closest pair of classes
    differs in the most attributes.
    """
    if not MIN_CLASSES <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in {MIN_CLASSES}..{MAX_CLASSES}, got {num_classes}")
    colours = tuple(COLOUR_HUES)

    def balanced(values: tuple[str, ...]) -> np.ndarray:
        count = max(2, min(len(values), num_classes // 2))
        return np.arange(num_classes) % count

    shape_seq, texture_seq, colour_seq = balanced(SHAPES), balanced(TEXTURES), balanced(colours)
    rng = np.random.default_rng(1000 + num_classes)
    best, best_score = None, None
    for _ in range(_CLASS_SEARCH_TRIES):
        triples = np.stack([shape_seq, rng.permutation(texture_seq), rng.permutation(colour_seq)], axis=1)
        distances = (triples[:, None, :] != triples[None, :, :]).sum(-1)
        pair_distances = distances[np.triu_indices(num_classes, 1)]
        score = (pair_distances.min(), -(pair_distances == pair_distances.min()).sum())
        if best_score is None or score > best_score:
            best, best_score = triples, score
    if best_score[0] == 0:
        raise AssertionError(f"no distinct attribute triples found for {num_classes} classes")
    return [SyntheticClass(SHAPES[s], TEXTURES[t], colours[c]) for s, t, c in best]


@dataclass(frozen=True)
class BadgeClass:
    """A class of the ``parts`` style: the colour of its badge."""

    colour: str
    tone: str

    @property
    def name(self) -> str:
        return f"{self.tone}_{self.colour}_badge"


# Badge hues: the three families a third of the circle apart first (robust to the +-0.1 hue
# jitter of training), then the three between them for more than 6 classes.
BADGE_HUES: dict[str, float] = {**COLOUR_HUES, "yellow": 1 / 6, "cyan": 1 / 2, "magenta": 5 / 6}
BADGE_TONES: dict[str, tuple[float, float]] = {"light": (0.95, 1.0), "dark": (0.4, 0.5)}  # HSV value ranges
MAX_PARTS_CLASSES = len(BADGE_HUES) * len(BADGE_TONES)
BADGE_RADIUS_RANGE = (0.6, 0.7)  # of the object's radius


def badge_class_definitions(num_classes: int) -> list[BadgeClass]:
    """The badge colours of ``num_classes`` classes: hue-major over the first hues needed."""
    if not MIN_CLASSES <= num_classes <= MAX_PARTS_CLASSES:
        raise ValueError(f"num_classes must be in {MIN_CLASSES}..{MAX_PARTS_CLASSES} for the parts style, "
                         f"got {num_classes}")
    hues = list(BADGE_HUES)[: max(3, -(-num_classes // len(BADGE_TONES)))]
    return [BadgeClass(hue, tone) for tone in BADGE_TONES for hue in hues][:num_classes]


# Style -> its class definitions (``--style``).
STYLE_CLASSES = {"attributes": class_definitions, "parts": badge_class_definitions}
STYLES: tuple[str, ...] = tuple(STYLE_CLASSES)


def class_names(num_classes: int, style: str = "attributes") -> list[str]:
    """``['background', '<colour>_<texture>_<shape>', ...]`` (parts: ``'<tone>_<hue>_badge'``)."""
    return ["background"] + [cls.name for cls in _classes(num_classes, style)]


def _classes(num_classes: int, style: str) -> list:
    if style not in STYLE_CLASSES:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    return STYLE_CLASSES[style](num_classes)


# ---------------------------------------------------------------------------- drawing
def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.asarray(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), dtype=np.float32) * 255.0


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
    """Mask of a shape of outer radius ``radius`` in object coordinates (u, v)."""
    if shape == "disc":
        return u * u + v * v <= radius * radius
    if shape == "ring":
        squared = u * u + v * v
        return (squared <= radius * radius) & (squared >= (0.5 * radius) ** 2)
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82 * radius
    if shape == "triangle":
        # Equilateral, circumradius ``radius``: inside the three edges at distance radius / 2.
        inside = np.ones(u.shape, dtype=bool)
        for angle in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
            inside &= u * np.cos(angle) + v * np.sin(angle) >= -0.5 * radius
        return inside
    if shape == "cross":
        arm = 0.32 * radius
        return ((np.abs(u) <= arm) & (np.abs(v) <= radius)) | ((np.abs(v) <= arm) & (np.abs(u) <= radius))
    raise ValueError(f"unknown shape {shape!r}")


def _texture_pattern(texture: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """Boolean map: True where the texture takes its second (dark) colour."""
    half = period / 2.0
    if texture == "striped":
        return np.floor(u / half).astype(np.int64) % 2 == 1
    if texture == "checked":
        return (np.floor(u / half).astype(np.int64) + np.floor(v / half).astype(np.int64)) % 2 == 1
    if texture == "dotted":
        du, dv = np.mod(u, period) - half, np.mod(v, period) - half
        return du * du + dv * dv <= (0.25 * period) ** 2   # sparse: unlike the 50% checker
    if texture == "plain":
        return np.zeros(u.shape, dtype=bool)
    raise ValueError(f"unknown texture {texture!r}")


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, side: float) -> np.ndarray:
    """Clutter that looks unlike any object: a muted gradient, soft muted blobs, thin lines."""
    height, width = yy.shape
    muted = lambda: _hsv(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.25, 0.9))  # noqa: E731
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx / width + np.sin(angle) * yy / height)
    ramp = ((ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6))[..., None]
    image = muted() * (1 - ramp) + muted() * ramp
    for _ in range(int(rng.integers(3, 8))):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        axes = rng.uniform(0.08, 0.35, size=2) * side
        theta = rng.uniform(0, np.pi)
        du = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
        dv = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
        distance = np.sqrt((du / axes[0]) ** 2 + (dv / axes[1]) ** 2)
        alpha = (np.clip((1.0 - distance) * 3.0, 0.0, 1.0) * rng.uniform(0.4, 0.9))[..., None]
        image = image * (1 - alpha) + muted() * alpha
    for _ in range(int(rng.integers(2, 7))):
        start = rng.uniform((0, 0), (width, height))
        end = rng.uniform((0, 0), (width, height))
        direction = end - start
        t = np.clip(((xx - start[0]) * direction[0] + (yy - start[1]) * direction[1])
                    / max(float(direction @ direction), 1e-6), 0.0, 1.0)
        distance = np.hypot(xx - start[0] - t * direction[0], yy - start[1] - t * direction[1])
        line = distance <= rng.uniform(0.5, 1.2)
        image[line] = _hsv(rng.random(), rng.uniform(0.0, 1.0), rng.uniform(0.3, 1.0))
    return image


def generate_sample(rng: np.random.Generator, classes: list, image_size: int,
                    min_aspect: float = 0.75) -> tuple[np.ndarray, np.ndarray]:
    """One (uint8 HxWx3 RGB image, uint8 HxW label) pair; the long side is ``image_size``.
    ``classes``: :class:`SyntheticClass` (attributes style) or :class:`BadgeClass` (parts) entries."""
    short = int(round(image_size * rng.uniform(min_aspect, 1.0)))
    height, width = (image_size, short) if rng.random() < 0.5 else (short, image_size)
    side = float(np.sqrt(height * width))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = _background(rng, yy, xx, side)

    num_image_classes = int(rng.integers(1, min(MAX_CLASSES_PER_IMAGE, len(classes)) + 1))
    image_classes = rng.choice(len(classes), size=num_image_classes, replace=False)
    num_objects = int(rng.integers(num_image_classes, MAX_OBJECTS + 1))
    # Distinct classes first, so each of them is placed while the canvas is still free.
    object_classes = list(image_classes) + list(rng.choice(image_classes, size=num_objects - num_image_classes))

    owner = np.zeros((height, width), dtype=np.int32)      # 0 = background, k = k-th placed object
    full_areas: list[int] = []
    placed_classes: list[int] = []
    for class_index in object_classes:
        cls = classes[int(class_index)]
        for attempt in range(_PLACEMENT_TRIES):
            radius = 0.5 * side * rng.uniform(*OBJECT_SIZE_RANGE) * (0.93 ** attempt)
            cy = rng.uniform(0.6 * radius, height - 0.6 * radius)
            cx = rng.uniform(0.6 * radius, width - 0.6 * radius)
            theta = rng.uniform(0, 2 * np.pi)
            u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
            v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
            shape = cls.shape if isinstance(cls, SyntheticClass) else SHAPES[int(rng.integers(len(SHAPES)))]
            mask = _shape_mask(shape, u, v, radius)
            area = int(mask.sum())
            if area < MIN_VISIBLE_PIXELS / MIN_VISIBLE_FRACTION:
                continue
            trial = np.where(mask, len(full_areas) + 1, owner)
            visible = np.bincount(trial.ravel(), minlength=len(full_areas) + 2)[1:]
            needed = np.maximum(MIN_VISIBLE_FRACTION * np.asarray(full_areas + [area]), MIN_VISIBLE_PIXELS)
            if np.all(visible >= needed):
                break
        else:
            continue  # no room left for this object: the label is derived from what was drawn
        owner = trial
        full_areas.append(area)
        placed_classes.append(int(class_index))
        if isinstance(cls, SyntheticClass):
            image = _paint_object(rng, image, mask, cls, u, v, radius, side)
        else:
            image = _paint_badged_object(rng, image, mask, cls, u, v, radius, side)

    image = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 0.6)  # soften aliased edges
    image = image + rng.normal(0.0, rng.uniform(2.0, 7.0), size=image.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)

    class_of_owner = np.asarray([0] + [c + 1 for c in placed_classes], dtype=np.uint8)
    label = class_of_owner[owner]
    label[_outline(owner)] = IGNORE_LABEL
    return image, label


def _paint_object(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, cls: SyntheticClass,
                  u: np.ndarray, v: np.ndarray, radius: float, side: float) -> np.ndarray:
    hue = COLOUR_HUES[cls.colour] + rng.uniform(-0.03, 0.03)
    saturation, value = rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0)
    light = _hsv(hue, saturation, value)
    dark = _hsv(hue, saturation, value * rng.uniform(0.35, 0.5))
    period = side * rng.uniform(0.075, 0.1)
    phase_u, phase_v = rng.uniform(0, period, size=2)
    pattern = _texture_pattern(cls.texture, u + phase_u, v + phase_v, period)
    colours = np.where(pattern[..., None], dark, light)
    # A gentle light gradient across the object, in a random direction.
    angle = rng.uniform(0, 2 * np.pi)
    shading = 1.0 + 0.12 * (np.cos(angle) * u + np.sin(angle) * v) / radius
    return np.where(mask[..., None], colours * shading[..., None], image)


def _paint_badged_object(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, cls: BadgeClass,
                         u: np.ndarray, v: np.ndarray, radius: float, side: float) -> np.ndarray:
    """The parts style: a class-agnostic checker body and a badge whose colour is the class's.

    The badge is a disc inside the object (centre within 0.3 radius of the object's centre)
    clipped to the object's visible mask, so it survives as the body does."""
    period = side * rng.uniform(0.06, 0.09)
    phase_u, phase_v = rng.uniform(0, period, size=2)
    checker = _texture_pattern("checked", u + phase_u, v + phase_v, period)
    white, black = rng.uniform(0.75, 0.85) * 255.0, rng.uniform(0.3, 0.4) * 255.0
    body = np.where(checker[..., None], np.float32(black), np.float32(white)) * np.ones(3, np.float32)
    distance, direction = rng.uniform(0, 0.3 * radius), rng.uniform(0, 2 * np.pi)
    offset = distance * np.array([np.cos(direction), np.sin(direction)])
    badge_radius = radius * rng.uniform(*BADGE_RADIUS_RANGE)
    badge = mask & (((u - offset[0]) ** 2 + (v - offset[1]) ** 2) <= badge_radius ** 2)
    colour = _hsv(BADGE_HUES[cls.colour] + rng.uniform(-0.03, 0.03), rng.uniform(0.75, 1.0),
                  rng.uniform(*BADGE_TONES[cls.tone]))
    painted = np.where(badge[..., None], colour, body)
    return np.where(mask[..., None], painted, image)


def _outline(owner: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another owner: a 2 px band on every object outline."""
    band = np.zeros(owner.shape, dtype=bool)
    vertical = owner[1:] != owner[:-1]
    horizontal = owner[:, 1:] != owner[:, :-1]
    band[1:] |= vertical
    band[:-1] |= vertical
    band[:, 1:] |= horizontal
    band[:, :-1] |= horizontal
    return band


# ---------------------------------------------------------------------------- writing
def sample_ids(num_train: int, num_val: int) -> dict[str, list[str]]:
    return {"train": [f"train_{index:05d}" for index in range(num_train)],
            "val": [f"val_{index:05d}" for index in range(num_val)]}


def generate_dataset(out: str, num_train: int = 160, num_val: int = 48, image_size: int = 112,
                     num_classes: int = 6, seed: int = 0, min_aspect: float = 0.75,
                     style: str = "attributes") -> dict[str, list[str]]:
    """Write the dataset under ``out`` (see the module docstring); returns the split ids.

    Image ``i`` of a split draws from ``default_rng((seed, split, i))``, so the bytes depend only
    on the arguments. Files of an earlier synthetic run in ``out`` that are not regenerated are
    removed; a non-empty ``out`` that is not a synthetic dataset is refused.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError("num_train and num_val must be at least 1")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    classes = _classes(num_classes, style)
    splits = sample_ids(num_train, num_val)
    folders = (layout.IMAGE_DIR, layout.LABEL_DIR, layout.AUG_LABEL_DIR)
    _clear_previous_run(out, folders, {image_id for ids in splits.values() for image_id in ids})

    for split_code, (split, ids) in enumerate(splits.items()):
        for index, image_id in enumerate(tqdm(ids, desc=f"synthetic {split}", unit="img", leave=False)):
            rng = np.random.default_rng((seed, split_code, index))
            image, label = generate_sample(rng, classes, image_size, min_aspect)
            save_rgb_image(layout.image_path(out, image_id), image, quality=95)
            for folder in (layout.LABEL_DIR, layout.AUG_LABEL_DIR):
                save_palette_png(os.path.join(out, folder, image_id + ".png"), label)
        atomic_write_text(layout.split_list_path(out, split), "".join(f"{image_id}\n" for image_id in ids))
    atomic_write_text(os.path.join(out, layout.CLASS_NAMES_FILE),
                      "".join(f"{name}\n" for name in ["background"] + [cls.name for cls in classes]))
    return splits


def _clear_previous_run(out: str, folders: tuple[str, ...], keep_ids: set[str]) -> None:
    if not os.path.isdir(out) or not os.listdir(out):
        return
    if not os.path.isfile(os.path.join(out, layout.CLASS_NAMES_FILE)):
        raise DataError(f"{out}: folder is not empty and holds no synthetic dataset "
                        f"({layout.CLASS_NAMES_FILE} is missing); refusing to write into it")
    # Stale labels would otherwise enter train_aug, which prepare builds from the label folder.
    for folder in folders:
        path = os.path.join(out, folder)
        if os.path.isdir(path):
            for name in os.listdir(path):
                if os.path.splitext(name)[0] not in keep_ids:
                    os.remove(os.path.join(path, name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="dataset root to write")
    parser.add_argument("--num_train", type=int, default=160)
    parser.add_argument("--num_val", type=int, default=48)
    parser.add_argument("--image_size", type=int, default=112, help="long side of every image")
    parser.add_argument("--num_classes", type=int, default=6, help=f"foreground classes, {MIN_CLASSES}..{MAX_CLASSES}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min_aspect", type=float, default=0.75, help="short / long side drawn in [min_aspect, 1]")
    parser.add_argument("--style", choices=STYLES, default="attributes",
                        help="attributes: classes combine shape, texture and colour; parts: a class-agnostic "
                             "body with a class-coloured badge (partial activation, the WSSS difficulty)")
    parser.add_argument("--prepare", action=argparse.BooleanOptionalAction, default=False,
                        help="also write lists and cls_labels.npy (python -m voc12.prepare)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not MIN_CLASSES <= args.num_classes <= MAX_CLASSES:
        parser.error(f"--num_classes must be in {MIN_CLASSES}..{MAX_CLASSES}")
    try:
        generate_dataset(args.out, args.num_train, args.num_val, args.image_size, args.num_classes,
                         args.seed, args.min_aspect, style=args.style)
    except ValueError as error:  # an out-of-range size or count
        parser.error(str(error))
    LOGGER.info("wrote %d + %d images of %d classes to %s", args.num_train, args.num_val,
                args.num_classes, args.out)
    if args.prepare:
        prepare_voc(layout.dataset_info("synthetic", args.out))
    else:
        LOGGER.info("next: python -m voc12.prepare --dataset synthetic --voc12_root %s", args.out)
    return 0


if __name__ == "__main__":
    run_cli(main)
