"""Training-loader throughput on the CPU: the DALI CPU pipeline vs the torch DataLoader path, same work.

    .venv/bin/python benchmarks/dali_vs_dataloader.py  # writes benchmarks/results/dali_vs_dataloader.*

Work per image, both loaders: JPEG decode, random-resized-crop to 224 x 224 (area 8-100%, aspect 3/4-4/3),
random horizontal flip, ImageNet normalisation, delivered as float32 (B, 3, 224, 224) batches of 64 the
way the training loop receives them on a CPU (train/scale/data.py to_model_input). DALI: num_threads=2,
device_id=None (CPU only), crop fused into decoding. DataLoader: num_workers=2, PIL (libjpeg-turbo) in
the workers, uint8 batches normalised in the main process. The images are generated (synthetic photos,
300-500 px a side, JPEG quality 90) so that decoding dominates as it does with real data.

Each loader runs whole epochs, alternating (DALI, torch, DALI, torch, ...) so that load from other
processes on the machine hits both alike; the first epoch of each is a warm-up. Reported: images/s per
timed epoch, their median, and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train.scale.data import Loaders, to_model_input
from train.scale.lists import ImageList
from train.scale.smoke import write_jpeg
from train.scale.torch_loader import TorchTrainLoader
from train.scale.transforms import TrainTransform

CROP, BATCH = 224, 64


def generate(folder: Path, count: int, size: tuple[int, int]) -> ImageList:
    """count synthetic JPEGs in folder (kept between runs), labelled with 10 classes."""
    rng = np.random.default_rng(0)
    paths = [f"{i:05d}.jpg" for i in range(count)]
    for i, name in enumerate(paths):
        if not (folder / name).exists():
            write_jpeg(folder / name, i % 10, 10, size, rng)
    return ImageList("bench", folder, paths, np.arange(count) % 10, 10)


def epoch_rate(loader, images: ImageList, epoch: int, loaders: Loaders) -> float:
    start, seen = time.perf_counter(), 0
    for x, _ in loader.epoch(epoch, np.arange(len(images))):
        seen += to_model_input(x, loaders).shape[0]
    return seen / (time.perf_counter() - start)


def build(kind: str, images: ImageList, workers: int):
    cpu = torch.device("cpu")
    if kind == "dali":
        from train.scale.dali_pipeline import DaliTrainLoader, PipelineSpec

        spec = PipelineSpec(crop=CROP, resize=256, decode_device="cpu", device_id=None, threads=workers)
        loader = DaliTrainLoader(images, BATCH, spec, seed=0, rank=0, world_size=1)
    else:
        loader = TorchTrainLoader(
            images,
            TrainTransform(CROP),
            BATCH,
            seed=0,
            rank=0,
            world_size=1,
            workers=workers,
            pin_memory=False,
        )
    return loader, Loaders(kind, loader, {}, torch.float32, False, cpu, normalise=kind == "torch")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--images", type=Path, default=Path("/tmp/drainage_fast_loader_bench"), help="JPEG folder (cached)"
    )
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per loader (after one warm-up)")
    p.add_argument("--workers", type=int, default=2, help="DALI threads / DataLoader workers")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args()

    images = generate(args.images, args.count, (300, 500))
    megabytes = sum(os.path.getsize(path) for path in images.absolute_paths()) / 2**20
    torch.set_num_threads(1)  # the main process only normalises; the workers / DALI threads use the cores
    loaders = {kind: build(kind, images, args.workers) for kind in ("dali", "torch")}
    rates = {kind: [] for kind in loaders}
    load = [os.getloadavg()[0]]
    for epoch in range(args.epochs + 1):
        for kind, (loader, spec) in loaders.items():
            rate = epoch_rate(loader, images, epoch, spec)
            if epoch:  # epoch 0 warms up page cache, pools and workers
                rates[kind].append(rate)
            print(f"epoch {epoch} {kind:5s} {rate:7.1f} img/s", flush=True)
    load.append(os.getloadavg()[0])
    median = {kind: statistics.median(r) for kind, r in rates.items()}
    result = {
        "work": "decode + random-resized-crop 224 + flip + normalise -> float32 NCHW batch",
        "images": args.count,
        "image_side_px": [300, 500],
        "dataset_mb": round(megabytes, 1),
        "batch": BATCH,
        "workers": args.workers,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "torch": torch.__version__,
        "loadavg_1min_start_end": load,
        "dali": __import__("nvidia.dali", fromlist=["__version__"]).__version__,
        "images_per_s": rates,
        "median_images_per_s": median,
        "dali_over_dataloader": median["dali"] / median["torch"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dali_vs_dataloader.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "dali_vs_dataloader.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    rows = "\n".join(
        f"| {name} | {r['median_images_per_s'][kind]:.0f} "
        f"| {', '.join(f'{v:.0f}' for v in r['images_per_s'][kind])} |"
        for kind, name in (
            ("dali", f"DALI {r['dali']} CPU pipeline, {r['workers']} threads"),
            ("torch", f"torch DataLoader + PIL, {r['workers']} workers"),
        )
    )
    return (
        f"# Training loader throughput on {r['cpu_count']} CPU cores\n\n"
        f"{r['work']}; {r['images']} generated JPEGs of {r['image_side_px'][0]}-{r['image_side_px'][1]} px "
        f"({r['dataset_mb']} MB), batch {r['batch']}. `benchmarks/dali_vs_dataloader.py`, "
        f"torch {r['torch']}, "
        f"{r['platform']}.\n\n"
        f"| loader | images/s (median) | per timed epoch |\n|---|---|---|\n{rows}\n\n"
        f"**DALI / DataLoader: {r['dali_over_dataloader']:.2f}x** (goal >= 2x). 1-minute load average "
        f"{r['loadavg_1min_start_end'][0]:.1f} at the start and "
        f"{r['loadavg_1min_start_end'][1]:.1f} at the end "
        f"(other processes shared the machine; the loaders alternate epochs so both saw it).\n"
    )


if __name__ == "__main__":
    sys.exit(main())
