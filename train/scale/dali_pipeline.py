"""NVIDIA DALI pipelines for the large runs: file reader -> decode -> augment -> normalise, sharded by
global rank. Imported only when the DALI loader is chosen (train/scale/data.py).

Decoding runs on device "mixed" (nvJPEG: Huffman on CPU threads, IDCT on the GPU / the hardware JPEG
engine) when a GPU is used, and on "cpu" without one: a CPU-only pipeline (device_id=None) is how CI
exercises this module. The recipe is train/scale/transforms.py's; the random-resized-crop is fused
into decoding (fn.decoders.image_random_crop decodes only the crop window: ROI decoding).

Training: fn.readers.file over the epoch's file list, shard_id = global rank, num_shards = world size,
shuffle_after_epoch with one seed on all ranks (the lists are sorted by class, and random_shuffle would
only shuffle inside a 1024-sample buffer), pad_last_batch + LastBatchPolicy.DROP so every rank runs the
same number of iterations. The pipeline is rebuilt at every epoch with shuffle seed f(seed, epoch):
the order of epoch e is then a function of (seed, e) alone, the same after a resume and on any world
size (the reader shards the shuffled list into contiguous blocks), and Clothing1M's per-epoch
class-balanced subset is just that epoch's file list. Rebuilding costs 4 ms for 23 files and 1.8 s
for 1,000,000 (2 CPU cores, DALI 2.4), against minutes per Clothing1M epoch.

Evaluation: one pipeline per list, built once, no shuffle, stick_to_shard, pad_last_batch +
LastBatchPolicy.PARTIAL: the padding is cut off, so every image is counted once over all ranks.

DALI has no bfloat16 type (2.4): the pipeline emits float16 (or float32) and the loop casts on device.

Corrupt JPEGs abort a DALI pipeline, and DALI cannot skip a sample ("no feedback channel that would ask
the reader operator to provide one more sample", https://github.com/NVIDIA/DALI/issues/3913), nor does
its error name the file. So lists are validated before training (train/scale/validate.py; a file
changed since the last check is decoded again), and a file that goes bad during the run stops it with a
DataFileError at the last checkpoint: --resume checks the changed file again and drops it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from .lists import ImageList
from .transforms import (
    CROP_AREA,
    CROP_ASPECT,
    CROP_ATTEMPTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    JITTER_HUE_DEGREES,
    JITTER_SCALE,
)
from .validate import DataFileError

READER = "Reader"
OUTPUTS = ["images", "labels"]


@dataclass(frozen=True)
class PipelineSpec:
    """What every pipeline of a run shares. decode_device: "cpu" or "mixed"; device_id: the local
    CUDA device, or None for a CPU-only pipeline. square_resize: the official Clothing1M recipe
    (train/scale/transforms.py): every image resized to resize x resize then centre-cropped, in training
    too (no random crop, no flip)."""

    crop: int
    resize: int
    decode_device: str
    device_id: int | None
    threads: int
    fp16: bool = False
    color_jitter: bool = False
    cutout: int = 0
    square_resize: bool = False

    def __post_init__(self):
        if self.decode_device not in ("cpu", "mixed"):
            raise ValueError(f"decode_device must be 'cpu' or 'mixed', got {self.decode_device!r}")
        if self.decode_device == "mixed" and self.device_id is None:
            raise ValueError("decode_device 'mixed' needs a GPU (device_id), got device_id=None")


def _normalise(images, spec: PipelineSpec, **crop_mirror):
    """uint8 HWC -> normalised HWC float16 / float32 (HWC, so a permuted view is channels_last)."""
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT16 if spec.fp16 else types.FLOAT,
        output_layout="HWC",
        mean=[m * 255 for m in IMAGENET_MEAN],
        std=[s * 255 for s in IMAGENET_STD],
        **crop_mirror,
    )


def _square_resize(images, spec: PipelineSpec):
    """Both sides to spec.resize (aspect not kept), as torchvision's Resize((resize, resize))."""
    return fn.resize(
        images, resize_x=spec.resize, resize_y=spec.resize, interp_type=types.INTERP_LINEAR, antialias=True
    )


@pipeline_def
def _train_pipeline(
    files: list[str], labels: list[int], shard_id: int, num_shards: int, shuffle_seed: int, spec: PipelineSpec
):
    jpegs, label = fn.readers.file(
        files=files,
        labels=labels,
        shard_id=shard_id,
        num_shards=num_shards,
        shuffle_after_epoch=True,
        shuffle_after_epoch_seed=shuffle_seed,
        pad_last_batch=True,
        name=READER,
    )
    if spec.square_resize:
        images = fn.decoders.image(jpegs, device=spec.decode_device, output_type=types.RGB)
        images = _square_resize(images, spec)
        images = _normalise(images, spec, crop=(spec.crop, spec.crop))  # centred crop, no mirror
    else:
        images = fn.decoders.image_random_crop(
            jpegs,
            device=spec.decode_device,
            output_type=types.RGB,
            random_area=list(CROP_AREA),
            random_aspect_ratio=list(CROP_ASPECT),
            num_attempts=CROP_ATTEMPTS,
        )
        images = fn.resize(
            images, resize_x=spec.crop, resize_y=spec.crop, interp_type=types.INTERP_LINEAR, antialias=True
        )
        if spec.color_jitter:
            images = fn.color_twist(
                images,
                brightness=fn.random.uniform(range=JITTER_SCALE),
                contrast=fn.random.uniform(range=JITTER_SCALE),
                saturation=fn.random.uniform(range=JITTER_SCALE),
                hue=fn.random.uniform(range=JITTER_HUE_DEGREES),
            )
        images = _normalise(images, spec, mirror=fn.random.coin_flip(probability=0.5))
    if spec.cutout:
        half = spec.cutout / 2  # anchor = centre - half, centre uniform over the crop
        anchor = fn.random.uniform(range=[-half, spec.crop - half], shape=2)
        images = fn.erase(
            images, anchor=anchor, shape=[float(spec.cutout)] * 2, axis_names="HW", fill_value=0.0
        )
    return images, label.gpu() if spec.decode_device == "mixed" else label


@pipeline_def
def _eval_pipeline(files: list[str], labels: list[int], shard_id: int, num_shards: int, spec: PipelineSpec):
    jpegs, label = fn.readers.file(
        files=files,
        labels=labels,
        shard_id=shard_id,
        num_shards=num_shards,
        stick_to_shard=True,
        pad_last_batch=True,
        name=READER,
    )
    images = fn.decoders.image(jpegs, device=spec.decode_device, output_type=types.RGB)
    if spec.square_resize:
        images = _square_resize(images, spec)
    else:
        images = fn.resize(
            images, resize_shorter=spec.resize, interp_type=types.INTERP_LINEAR, antialias=True
        )
    images = _normalise(images, spec, crop=(spec.crop, spec.crop))
    return images, label.gpu() if spec.decode_device == "mixed" else label


def derived_seed(*parts: int) -> int:
    """A 31-bit seed from integers (DALI seeds are int64; numpy's SeedSequence mixes the parts)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


@contextmanager
def _bad_files_as_data_errors():
    """A decoding failure (at the iterator's first prefetch or later) as a one-line DataFileError."""
    try:
        yield
    except RuntimeError as exc:
        if "Critical error in pipeline" not in str(exc):
            raise
        # the last line before DALI's "Current pipeline object is no longer valid." is the cause
        lines = [
            line.strip() for line in str(exc).splitlines() if line.strip() and "no longer valid" not in line
        ]
        cause = lines[-1] if lines else "no detail"
        raise DataFileError(
            f"DALI could not decode a file of the list ({cause}; DALI does not say which): "
            f"it changed since the list check or the storage failed"
        ) from exc


class _Batches:
    """A DALI iterator as a sized iterable of (images (B, H, W, 3), labels (B,) int64). bad_files is
    always empty: DALI stops at a bad file instead (DataFileError)."""

    bad_files: tuple = ()

    def __init__(self, pipe, last_batch_policy, auto_reset: bool = False):
        with _bad_files_as_data_errors():
            self.iterator = DALIGenericIterator(
                [pipe],
                OUTPUTS,
                reader_name=READER,
                auto_reset=auto_reset,
                last_batch_policy=last_batch_policy,
            )

    def __len__(self) -> int:
        return len(self.iterator)

    def __iter__(self):
        with _bad_files_as_data_errors():
            for batch in self.iterator:
                out = batch[0]
                yield out["images"], out["labels"].squeeze(-1).long()


class DaliTrainLoader:
    """Per-epoch DALI training batches of `batch` images for this rank."""

    def __init__(
        self, images: ImageList, batch: int, spec: PipelineSpec, seed: int, rank: int, world_size: int
    ):
        self.files = np.asarray(images.absolute_paths(), dtype=object)
        self.labels = images.labels
        self.batch, self.spec, self.seed, self.rank, self.world_size = batch, spec, seed, rank, world_size
        self._current = None

    def epoch(self, epoch: int, indices: np.ndarray) -> _Batches:
        """The batches of `epoch` over the entries `indices` of the list (the whole list, or a subset)."""
        self._current = None  # release the previous epoch's pipeline (threads, buffers) first
        pipe = _train_pipeline(
            files=self.files[indices].tolist(),
            labels=self.labels[indices].tolist(),
            shard_id=self.rank,
            num_shards=self.world_size,
            shuffle_seed=derived_seed(self.seed, epoch),
            spec=self.spec,
            batch_size=self.batch,
            num_threads=self.spec.threads,
            device_id=self.spec.device_id,
            seed=derived_seed(self.seed, epoch, self.rank),
        )
        pipe.build()
        self._current = _Batches(pipe, LastBatchPolicy.DROP)
        return self._current


class DaliEvalLoader:
    """Evaluation batches of one list: this rank's shard, every image once (the last batch may be short)."""

    def __init__(self, images: ImageList, batch: int, spec: PipelineSpec, rank: int, world_size: int):
        pipe = _eval_pipeline(
            files=images.absolute_paths(),
            labels=images.labels.tolist(),
            shard_id=rank,
            num_shards=world_size,
            spec=spec,
            batch_size=batch,
            num_threads=spec.threads,
            device_id=spec.device_id,
            seed=0,
        )
        pipe.build()
        self.batches = _Batches(pipe, LastBatchPolicy.PARTIAL, auto_reset=True)
        self.bad_files = self.batches.bad_files

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)
