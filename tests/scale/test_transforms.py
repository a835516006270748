"""The augmentation recipe: crop-box statistics, the colour twist against its definition and against
DALI's fn.color_twist, Cutout, determinism, and the evaluation transform against DALI's."""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
from PIL import Image

from tests.scale.support import needs_dali
from train.scale import transforms as T


def test_crop_boxes_stay_inside_and_follow_the_area_and_aspect_ranges():
    rng = np.random.default_rng(0)
    boxes = [T.random_resized_crop_box(400, 300, rng) for _ in range(2000)]
    for left, top, w, h in boxes:
        assert 0 <= left and left + w <= 400 and 0 <= top and top + h <= 300
    area = np.array([w * h / (400 * 300) for _, _, w, h in boxes])
    aspect = np.array([w / h for _, _, w, h in boxes])
    # draws whose box does not fit are retried, which biases the accepted area below the uniform mean
    # 0.54 (0.43 for a 4:3 image; the same rule as torchvision's RandomResizedCrop)
    assert 0.079 < area.min() and area.max() <= 1.0 and 0.38 < area.mean() < 0.48
    assert 0.74 < aspect.min() and aspect.max() < 1.35


def test_crop_falls_back_to_a_centred_clamped_crop_for_extreme_images():
    left, top, w, h = T.random_resized_crop_box(1000, 10, np.random.default_rng(0))
    assert (h, w) == (10, round(10 * 4 / 3)) and left == (1000 - w) // 2 and top == 0


def test_color_twist_identity_and_hue_rotation():
    matrix, offset = T.color_twist_matrix(1.0, 1.0, 1.0, 0.0)
    assert np.allclose(matrix, np.eye(3), atol=1e-12) and np.allclose(offset, 0)
    matrix, offset = T.color_twist_matrix(1.0, 1.0, 0.0, 0.0)  # saturation 0 -> grey = luma
    rgb = np.array([200.0, 50.0, 10.0])
    luma = 0.299 * 200 + 0.587 * 50 + 0.114 * 10
    assert np.allclose(matrix @ rgb + offset, luma, atol=1e-6)
    matrix, offset = T.color_twist_matrix(1.0, 0.5, 1.0, 0.0)  # contrast halves the distance to 128
    assert np.allclose(matrix @ rgb + offset, 128 + (rgb - 128) * 0.5, atol=1e-6)
    red = np.array([200.0, 40.0, 40.0])
    hue = [colorsys.rgb_to_hsv(*(T.color_twist_matrix(1, 1, 1, d)[0] @ red / 255))[0] for d in (0, 60)]
    assert 0.05 < (hue[1] - hue[0]) % 1.0 < 0.25  # a positive rotation moves red towards yellow/green


def test_train_transform_is_a_function_of_its_generator():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    t = T.TrainTransform(crop=32, color_jitter=True, cutout=16)
    a, b = t(image, np.random.default_rng(5)), t(image, np.random.default_rng(5))
    c = t(image, np.random.default_rng(6))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_cutout_square_is_filled_with_the_mean_colour():
    image = Image.new("RGB", (40, 40), (255, 255, 255))
    out = T.TrainTransform(crop=32, cutout=16)(image, np.random.default_rng(3))
    filled = (out == T.mean_colour_uint8()).all(-1)
    top, left, bottom, right = T.cutout_box(32, 16, np.random.default_rng(99))
    assert 0 < filled.sum() <= 16 * 16 and 0 <= top < bottom <= 32 and 0 <= left < right <= 32


def test_eval_transform_resizes_the_shorter_side_then_centre_crops():
    image = Image.fromarray(np.tile(np.arange(100, dtype=np.uint8)[None, :, None], (50, 1, 3)))
    out = T.EvalTransform(crop=20, resize=25)(image)
    assert out.shape == (20, 20, 3)
    # 100x50 -> 50x25; the crop starts at column 15 of the resize = original column 30.5
    assert math.isclose(out[0, 0, 0], 30.5, abs_tol=1)


def _run_dali(graph, batch):
    from nvidia.dali import pipeline_def

    pipe = pipeline_def(graph, batch_size=batch, num_threads=1, device_id=None)()
    pipe.build()
    return [np.array(t) for t in pipe.run()[0]]


@needs_dali
@pytest.mark.parametrize("params", [(1.3, 0.7, 1.2, 40.0), (0.6, 1.4, 0.6, -72.0), (1.0, 1.0, 1.4, 10.0)])
def test_color_twist_matches_dali(params, tmp_path):
    from nvidia.dali import fn, types

    pixels = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    b, c, s, h = params

    def graph():
        data, _ = fn.readers.file(files=[str(tmp_path / "a.png")])
        image = fn.decoders.image(data, device="cpu", output_type=types.RGB)
        return fn.color_twist(image, brightness=b, contrast=c, saturation=s, hue=h)

    dali = _run_dali(graph, 1)[0].astype(int)
    ours = T.apply_color_twist(pixels, *T.color_twist_matrix(b, c, s, h)).astype(int)
    assert np.abs(dali - ours).max() <= 2  # DALI rounds its YIQ inverse to 3 decimals


@needs_dali
def test_eval_transform_matches_dali_eval_pipeline(webvision_tree):
    from train.scale.dali_pipeline import PipelineSpec, _eval_pipeline
    from train.scale.lists import webvision_val

    images = webvision_val(webvision_tree[0]).subset(np.arange(8))
    spec = PipelineSpec(crop=32, resize=36, decode_device="cpu", device_id=None, threads=1)
    pipe = _eval_pipeline(
        files=images.absolute_paths(),
        labels=images.labels.tolist(),
        shard_id=0,
        num_shards=1,
        spec=spec,
        batch_size=8,
        num_threads=1,
        device_id=None,
    )
    pipe.build()
    out, labels = pipe.run()
    mean, std = np.array(T.IMAGENET_MEAN) * 255, np.array(T.IMAGENET_STD) * 255
    for k, path in enumerate(images.absolute_paths()):
        ours = (T.EvalTransform(32, 36)(Image.open(path).convert("RGB")) - mean) / std
        assert int(np.array(labels[k])[0]) == images.labels[k]
        assert np.abs(np.array(out[k]) - ours).mean() < 0.1  # resampling filters differ slightly


# ---- Clothing1M as the official code (ZKI-PH-ImageAnalysis/Drainage, commit 3359c4b, dataset.py
# Clothing1MDatasetLoader.loadData): train Resize((256, 256)) + CenterCrop(224) + Cutout(112), no random crop
# or flip; val and test Resize((256, 256)) + CenterCrop(224). torchvision's CenterCrop starts at
# int(round((256 - 224) / 2)) = 16 on both axes.
OFFICIAL_RESIZE, OFFICIAL_CROP, OFFICIAL_CUTOUT, OFFICIAL_CORNER = 256, 224, 112, 16


def ramp_image(width=512, height=128) -> Image.Image:
    """Red encodes the column (x / 2), green the row (2 y): after the 256 x 256 resize (x halved, y doubled)
    both read as the resized image's column / row, so a crop's position can be read off its pixels."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    pixels = np.stack([x / 2, 2 * y, np.full_like(x, 100)], -1)
    return Image.fromarray(np.rint(pixels).astype(np.uint8))


def test_clothing1m_train_transform_is_the_official_square_resize_and_centre_crop():
    t = T.CentreCropTrainTransform(crop=OFFICIAL_CROP, resize=OFFICIAL_RESIZE)
    out = t(ramp_image(), np.random.default_rng(0))
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    # resized column c holds red ~ c (a 2:1 box: mean of x/2 at x = 2c, 2c + 1 -> c + 0.25); row r holds green
    # ~ r - 0.5 (bilinear 1:2 upsampling of 2y at y = (r + 0.5) / 2 - 0.5); +-1 for uint8 rounding and edges
    columns, rows = np.arange(224) + OFFICIAL_CORNER, np.arange(224) + OFFICIAL_CORNER
    assert np.abs(out[112, :, 0].astype(float) - (columns + 0.25)).max() <= 1
    assert np.abs(out[1:-1, 112, 1].astype(float) - (rows[1:-1] - 0.5)).max() <= 1
    # no random crop or flip: any generator gives the same image
    assert np.array_equal(out, t(ramp_image(), np.random.default_rng(1)))


def test_clothing1m_cutout_is_the_official_clipped_square_and_the_only_randomness():
    plain = T.CentreCropTrainTransform(OFFICIAL_CROP, OFFICIAL_RESIZE)(ramp_image(), np.random.default_rng(0))
    for seed in range(20):
        out = T.CentreCropTrainTransform(OFFICIAL_CROP, OFFICIAL_RESIZE, OFFICIAL_CUTOUT)(
            ramp_image(), np.random.default_rng(seed)
        )
        # the official Cutout: centre (y, x) uniform over the 224 x 224 image, rows clip(y - 56, 0, 224) to
        # clip(y + 56, 0, 224), the same for columns
        y, x = np.random.default_rng(seed).integers(0, OFFICIAL_CROP, size=2)
        mask = np.zeros((224, 224), bool)
        mask[max(y - 56, 0) : min(y + 56, 224), max(x - 56, 0) : min(x + 56, 224)] = True
        assert (out[mask] == T.mean_colour_uint8()).all() and np.array_equal(out[~mask], plain[~mask])


def test_clothing1m_eval_transform_is_the_official_square_resize_and_centre_crop():
    image = ramp_image()
    out = T.EvalTransform(OFFICIAL_CROP, OFFICIAL_RESIZE, square=True)(image)
    assert out.shape == (224, 224, 3)
    assert np.array_equal(out, T.CentreCropTrainTransform(OFFICIAL_CROP, OFFICIAL_RESIZE)(image, None))
    # not the shorter-side resize (WebVision's): that keeps the 4:1 aspect and crops the middle columns
    assert not np.array_equal(out, T.EvalTransform(OFFICIAL_CROP, OFFICIAL_RESIZE)(image))


def test_clothing1m_runs_get_the_official_transforms(clothing_tree):
    import torch

    from train.config import load_config
    from train.scale.data import build_loaders
    from train.scale.distributed import DistContext
    from train.scale.lists import build_dataset
    from train.scale.options import ScaleOptions

    spec = build_dataset("clothing1m", clothing_tree[0])
    ctx = DistContext(0, 1, 0, 1, torch.device("cpu"))
    options = ScaleOptions(loader="torch", workers=0, crop=OFFICIAL_CROP, resize=OFFICIAL_RESIZE)
    loaders = build_loaders(spec, load_config("clothing1m_drainage"), options, ctx)
    assert loaders.train.dataset.transform == T.CentreCropTrainTransform(224, 256, cutout=112)
    assert {name: loader.dataset.transform for name, loader in loaders.evals.items()} == {
        "clothing1m_val": T.EvalTransform(224, 256, square=True),
        "clothing1m_test": T.EvalTransform(224, 256, square=True),
    }
    assert spec.select == "clothing1m_val" and spec.report == "clothing1m_test"


@needs_dali
def test_clothing1m_dali_pipelines_match_the_torch_transforms(clothing_tree):
    from train.scale.dali_pipeline import PipelineSpec, _eval_pipeline, _train_pipeline
    from train.scale.lists import clothing1m

    images = clothing1m(clothing_tree[0], "test").subset(np.arange(8))
    spec = PipelineSpec(
        crop=32, resize=36, decode_device="cpu", device_id=None, threads=1, square_resize=True
    )
    mean, std = np.array(T.IMAGENET_MEAN) * 255, np.array(T.IMAGENET_STD) * 255
    files, labels = images.absolute_paths(), list(range(8))  # label k: file k
    for graph, kw in ((_eval_pipeline, {}), (_train_pipeline, {"shuffle_seed": 3})):
        pipe = graph(
            files=files,
            labels=labels,
            shard_id=0,
            num_shards=1,
            spec=spec,
            batch_size=8,
            num_threads=1,
            device_id=None,
            seed=0,
            **kw,
        )
        pipe.build()
        out, ids = pipe.run()
        for k in range(8):
            path = files[int(np.array(ids[k])[0])]
            ours = (T.EvalTransform(32, 36, square=True)(Image.open(path).convert("RGB")) - mean) / std
            assert np.array(out[k]).shape == (32, 32, 3)
            assert np.abs(np.array(out[k]) - ours).mean() < 0.1, graph.__name__  # resampling filters differ
