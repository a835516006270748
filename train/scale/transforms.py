"""The augmentation recipe, written once as constants and as PIL/numpy transforms for the torch
DataLoader path; train/scale/dali_pipeline.py builds the same recipe from DALI operators.

    training     random-resized-crop (area 8-100%, aspect 3/4-4/3, 10 tries, then a centre crop) to
                 crop x crop + horizontal flip; WebVision adds the authors' colour jitter
                 (ColorJitter(0.4, 0.4, 0.4, 0.2): brightness, contrast, saturation x U[0.6, 1.4],
                 hue +-0.2 turn = +-72 degrees)
    evaluation   resize the shorter side to `resize` (256), centre crop `crop` (224)

Clothing1M follows the official code instead (https://github.com/ZKI-PH-ImageAnalysis/Drainage, commit
3359c4b, dataset.py Clothing1MDatasetLoader.loadData): training Resize((256, 256)) (both sides, the aspect
ratio is not kept) + CenterCrop(224) + Cutout(112) (one crop/2 square, centre uniform over the image,
clipped to it; no random crop, no flip); evaluation (val and test) Resize((256, 256)) + CenterCrop(224).

The colour jitter follows DALI's fn.color_twist, which both paths use: one linear map in YIQ space
(hue = rotation of the I/Q plane, saturation = its scale, brightness and contrast = scale of all three
around mid-grey 128). torchvision's ColorJitter differs in two details: it applies the four jitters in
a random order and blends contrast towards the image's mean grey instead of 128.

Randomness comes from a numpy Generator seeded per (seed, epoch, sample) by the caller, so an image's
augmentation does not depend on the worker, the rank or the world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_AREA = (0.08, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
JITTER_SCALE = (0.6, 1.4)  # brightness, contrast and saturation factors (ColorJitter 0.4)
JITTER_HUE_DEGREES = (-72.0, 72.0)  # ColorJitter hue 0.2 of a full turn
MID_GREY = 128.0  # DALI's contrast centre for uint8 images

# NTSC RGB -> YIQ; the inverse is computed, not rounded by hand
RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
YIQ_TO_RGB = np.linalg.inv(RGB_TO_YIQ)


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a random crop with area in CROP_AREA of the image and aspect ratio
    log-uniform in CROP_ASPECT; after CROP_ATTEMPTS misses, the largest centred crop whose aspect is
    clamped into CROP_ASPECT."""
    area = width * height
    log_lo, log_hi = math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])
    for _ in range(CROP_ATTEMPTS):
        target = area * rng.uniform(*CROP_AREA)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    ratio = width / height
    if ratio < CROP_ASPECT[0]:
        w, h = width, round(width / CROP_ASPECT[0])
    elif ratio > CROP_ASPECT[1]:
        w, h = round(height * CROP_ASPECT[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def color_twist_matrix(
    brightness: float, contrast: float, saturation: float, hue_degrees: float
) -> tuple[np.ndarray, np.ndarray]:
    """(3x3 matrix M, offset (3,)) with out = M @ rgb + offset: the colour jitter as one linear map."""
    angle = math.radians(hue_degrees)
    rotate_scale_iq = np.array(
        [
            [1.0, 0.0, 0.0],
            [0.0, saturation * math.cos(angle), saturation * math.sin(angle)],
            [0.0, -saturation * math.sin(angle), saturation * math.cos(angle)],
        ]
    )
    matrix = brightness * contrast * YIQ_TO_RGB @ rotate_scale_iq @ RGB_TO_YIQ
    offset = np.full(3, (MID_GREY - MID_GREY * contrast) * brightness)
    return matrix, offset


def apply_color_twist(image: np.ndarray, matrix: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W, 3) uint8, rounded and saturated like DALI's uint8 output."""
    out = image.astype(np.float32) @ matrix.T.astype(np.float32) + offset.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def random_color_twist(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    b, c, s = rng.uniform(*JITTER_SCALE, size=3)
    return color_twist_matrix(b, c, s, rng.uniform(*JITTER_HUE_DEGREES))


def cutout_box(size: int, side: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of a side x side square centred uniformly in a size x size image,
    clipped to it (Cutout, DeVries & Taylor 2017)."""
    cy, cx = rng.integers(0, size, size=2)
    half = side // 2
    return max(cy - half, 0), max(cx - half, 0), min(cy - half + side, size), min(cx - half + side, size)


def mean_colour_uint8() -> np.ndarray:
    """The fill of a Cutout square in the uint8 image: normalises to ~0, as DALI's fill after
    normalisation."""
    return np.rint(np.asarray(IMAGENET_MEAN) * 255).astype(np.uint8)


def _cutout(out: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    top, left, bottom, right = cutout_box(out.shape[0], side, rng)
    out = out.copy()
    out[top:bottom, left:right] = mean_colour_uint8()
    return out


def square_resize_centre_crop(image: Image.Image, resize: int, crop: int) -> np.ndarray:
    """PIL image -> (crop, crop, 3) uint8: torchvision's Resize((resize, resize)) (bilinear, as PIL
    resamples) then CenterCrop(crop), whose top-left corner is int(round((resize - crop) / 2))."""
    resized = image.resize((resize, resize), Image.BILINEAR)
    corner = int(round((resize - crop) / 2))
    return np.asarray(resized.crop((corner, corner, corner + crop, corner + crop)))


@dataclass(frozen=True)
class CentreCropTrainTransform:
    """PIL image -> (crop, crop, 3) uint8: the official Clothing1M training transform (module docstring):
    resize x resize, centre crop, [cutout]; the generator draws only the cutout."""

    crop: int
    resize: int
    cutout: int = 0  # side of the Cutout square in pixels; 0 = off

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
        out = square_resize_centre_crop(image, self.resize, self.crop)
        return np.ascontiguousarray(_cutout(out, self.cutout, rng) if self.cutout else out)


@dataclass(frozen=True)
class TrainTransform:
    """PIL image -> (crop, crop, 3) uint8: random-resized-crop, [colour jitter], flip, [cutout]."""

    crop: int
    color_jitter: bool = False
    cutout: int = 0  # side of the Cutout square in pixels; 0 = off

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
        left, top, w, h = random_resized_crop_box(image.width, image.height, rng)
        out = np.asarray(
            image.resize((self.crop, self.crop), Image.BILINEAR, box=(left, top, left + w, top + h))
        )
        if self.color_jitter:
            out = apply_color_twist(out, *random_color_twist(rng))
        if rng.random() < 0.5:
            out = out[:, ::-1]
        if self.cutout:
            out = _cutout(out, self.cutout, rng)
        return np.ascontiguousarray(out)


@dataclass(frozen=True)
class EvalTransform:
    """PIL image -> (crop, crop, 3) uint8: shorter side resized to `resize` (square: both sides, the
    official Clothing1M evaluation), centre crop."""

    crop: int
    resize: int
    square: bool = False

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        if self.square:
            return square_resize_centre_crop(image, self.resize, self.crop)
        scale = self.resize / min(image.width, image.height)
        w, h = max(self.resize, round(image.width * scale)), max(self.resize, round(image.height * scale))
        resized = image.resize((w, h), Image.BILINEAR)
        left, top = round((w - self.crop) / 2), round((h - self.crop) / 2)
        return np.asarray(resized.crop((left, top, left + self.crop, top + self.crop)))
