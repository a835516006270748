"""ResNet-50 training throughput on one GPU: the model step alone (synthetic data) and fed by the loaders.

    python benchmarks/gpu_resnet50_step.py   # on a GPU; writes benchmarks/results/gpu_resnet50_step.{json,md}

Step: train/models/resnet.py ResNet-50, 1001 outputs (1000 classes + the drainage node), the fused Drainage
loss (alpha 0.1), SGD nesterov, gradient-norm clip 5.0, bf16 autocast, channels_last, batch 256, 224 px:
the WebVision recipe's step at ImageNet scale. Anchor: about 2,470 img/s on one A100 (NVIDIA's PyTorch
RN50 v1.5, AMP, real data; the performance tables of github.com/NVIDIA/DeepLearningExamples,
PyTorch/Classification/ConvNets/resnet50v1.5/README.md); goal >= 3,000 img/s on one H100.

Measurements, each independent (one failing is recorded, the others still run):
  synthetic_eager     a fixed random batch on the GPU, eager
  synthetic_compile   the same under torch.compile (skipped with --no-compile)
  torch_loader        generated JPEGs (300-500 px) through the torch DataLoader path (PIL workers, uint8
                      batches normalised on the GPU): images/s and the fraction of time waiting for data
  dali_mixed          the same JPEGs through the DALI pipeline decoding on "mixed" (skipped without DALI)
Needs only torch and numpy (+ Pillow for the loader paths); no network.

    python benchmarks/gpu_resnet50_step.py --short    # writes gpu_resnet50_short.{json,md}

--short measures only the synthetic eager step with K = 51 outputs (mini-WebVision: 50 classes + the
drainage node), once with the fused Drainage loss and once with cross-entropy (train/losses.py "ce"),
and for each the loss's forward + backward alone on (batch, 51) logits: images/s and the loss's share.
2 x (15 + 50) steps, no compile, no loaders: sized for about 2 minutes on an H100 (not yet timed there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO)]

import measure
from cases import Case, RotatingInputs
from providers import make_step

from train.losses import build_loss
from train.models.resnet import resnet50

CLASSES = 1000
SHORT_OUTPUTS = 51  # mini-WebVision: 50 classes + the drainage node
LOSS_PARAMS = {"drainage": {"alpha": 0.1}, "ce": {}}


class Step:
    """One optimisation step of the recipe on `device`; call(x, y) runs it, x (B, 3, H, W) in bf16.
    `outputs` K: the drainage loss reads the last one as its drainage node; cross-entropy takes all K."""

    def __init__(self, device: torch.device, compile_model: bool, outputs=CLASSES + 1, loss="drainage"):
        self.model = resnet50(outputs).to(device, memory_format=torch.channels_last)
        self.outputs = outputs
        self.forward = torch.compile(self.model) if compile_model else self.model
        self.loss_fn = build_loss(loss, outputs - 1, **LOSS_PARAMS[loss])
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        self.device = device

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.forward(x)
        loss = self.loss_fn(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
        self.optimizer.step()


def input_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32  # no autocast on the CPU check


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic(step: Step, args) -> dict:
    """images/s of `step` on one random batch of args.batch images of args.size px, kept on the device."""
    device, batch, size, steps = step.device, args.batch, args.size, args.steps
    x = torch.randn(batch, 3, size, size, device=device).to(input_dtype(device))
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, step.outputs - 1, (batch,), device=device)  # never the drainage node
    for _ in range(args.warmup):
        step(x, y)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    sync(device)
    seconds = time.perf_counter() - start
    return {"images_per_s": batch * steps / seconds, "step_ms": 1e3 * seconds / steps}


def fed(kind, device, images, batch, size, steps, warmup, workers) -> dict:
    """The step fed by a real loader over generated JPEGs (epochs repeat until warmup + steps batches)."""
    from train.scale.data import Loaders, to_model_input

    if kind == "dali":
        from train.scale.dali_pipeline import DaliTrainLoader, PipelineSpec

        spec = PipelineSpec(
            crop=size,
            resize=round(size * 256 / 224),
            decode_device="mixed",
            device_id=device.index or 0,
            threads=workers,
            fp16=True,
        )
        loader = DaliTrainLoader(images, batch, spec, seed=0, rank=0, world_size=1)
    else:
        from train.scale.torch_loader import TorchTrainLoader
        from train.scale.transforms import TrainTransform

        loader = TorchTrainLoader(
            images,
            TrainTransform(size),
            batch,
            seed=0,
            rank=0,
            world_size=1,
            workers=workers,
            pin_memory=True,
        )
    feed = Loaders(kind, loader, {}, input_dtype(device), True, device, normalise=kind == "torch")
    step = Step(device, compile_model=False)
    done, wait, start, epoch = 0, 0.0, None, 0
    while done < warmup + steps:
        fetch = time.perf_counter()
        for images_, labels in loader.epoch(epoch, np.arange(len(images))):
            if done == warmup:  # the timed part starts with this batch (its fetch is not counted)
                sync(device)
                start, wait = time.perf_counter(), 0.0
            elif done > warmup:
                wait += time.perf_counter() - fetch
            step(to_model_input(images_, feed), labels.to(device, non_blocking=True))
            done += 1
            if done == warmup + steps:
                break
            fetch = time.perf_counter()
        epoch += 1
    sync(device)
    seconds = time.perf_counter() - start
    return {"images_per_s": batch * steps / seconds, "data_wait_frac": wait / seconds, "workers": workers}


def jpeg_set(count: int, folder: Path):
    from train.scale.lists import ImageList
    from train.scale.smoke import write_jpeg

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [f"{i:05d}.jpg" for i in range(count)]
    for i, name in enumerate(paths):
        write_jpeg(folder / name, i % 10, 10, (300, 500), rng)
    return ImageList("bench", folder, paths, np.arange(count) % 10, 10)


def attempt(results: dict, name: str, fn) -> None:
    """results[name] = fn(), or the error: one broken path must not hide the others."""
    print(f"-- {name}", flush=True)
    try:
        results[name] = fn()
    except Exception as exc:  # noqa: BLE001 -- recorded in the report
        results[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
    print(f"   {results[name]}", flush=True)


def loss_alone_us(loss: str, device, batch: int, outputs: int, reps: int) -> float:
    """Median time of the loss's forward + backward alone on (batch, outputs) logits of the step's dtype."""
    loss_fn = build_loss(loss, outputs - 1, **LOSS_PARAMS[loss])
    case = Case(batch, outputs, input_dtype(device), "fwd+bwd")
    inputs = RotatingInputs(case, device, requires_grad=True)
    step = make_step(lambda x, t, reduction: loss_fn(x, t), case.mode)
    for _ in range(3):
        step(*inputs.next())
    return measure.device_us(step, inputs, device, reps)


def run_short(args, device) -> dict:
    results = {}
    for loss in LOSS_PARAMS:

        def one(loss=loss):
            step = synthetic(Step(device, False, SHORT_OUTPUTS, loss), args)
            us = loss_alone_us(loss, device, args.batch, SHORT_OUTPUTS, reps=max(args.steps, 5))
            return {**step, "loss_us": us, "loss_share": us / (1e3 * step["step_ms"])}

        attempt(results, loss, one)
    return results


def run_all(args, device) -> dict:
    results = {}
    attempt(results, "synthetic_eager", lambda: synthetic(Step(device, False), args))
    if args.compile:
        attempt(results, "synthetic_compile", lambda: synthetic(Step(device, True), args))
    else:
        results["synthetic_compile"] = {"skipped": "--no-compile"}
    try:
        import PIL  # noqa: F401
    except ImportError:
        results["torch_loader"] = results["dali_mixed"] = {"skipped": "Pillow is not installed"}
        return results
    with tempfile.TemporaryDirectory() as tmp:
        images = jpeg_set(args.images, Path(tmp))
        attempt(
            results,
            "torch_loader",
            lambda: fed(
                "torch", device, images, args.batch, args.size, args.steps, args.warmup, args.workers
            ),
        )
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            results["dali_mixed"] = {"skipped": "NVIDIA DALI is not installed"}
        else:
            if device.type == "cuda":
                attempt(
                    results,
                    "dali_mixed",
                    lambda: fed(
                        "dali", device, images, args.batch, args.size, args.steps, args.warmup, args.workers
                    ),
                )
            else:
                results["dali_mixed"] = {"skipped": "no GPU"}
    return results


def markdown(r: dict) -> str:
    lines = [
        f"# ResNet-50 training step on {r['device_name']}",
        "",
        (
            f"bf16 autocast, channels_last, batch {r['batch']}, {r['size']} px, "
            f"fused Drainage loss (1000 + 1 "
            f"outputs), SGD nesterov, clip 5.0; torch {r['torch']}, "
            f"{r['steps']} timed steps after {r['warmup']}. "
            f"`benchmarks/gpu_resnet50_step.py`."
        ),
        "",
        "| measurement | images/s | notes |",
        "|---|---|---|",
    ]
    for name, v in r["results"].items():
        if "images_per_s" in v:
            notes = (
                f"step {v['step_ms']:.1f} ms"
                if "step_ms" in v
                else f"data wait {v['data_wait_frac']:.0%}, {v['workers']} workers"
            )
            lines.append(f"| {name} | {v['images_per_s']:.0f} | {notes} |")
        else:
            lines.append(f"| {name} | - | {v.get('skipped') or v.get('error')} |")
    lines += [
        "",
        "Anchors: A100 about 2,470 img/s (NVIDIA RN50, AMP, real data); goal >= 3,000 img/s on one H100.",
    ]
    return "\n".join(lines) + "\n"


def markdown_short(r: dict) -> str:
    lines = [
        f"# ResNet-50 step, fused Drainage loss vs cross-entropy, on {r['device_name']}",
        "",
        (
            f"bf16 autocast, channels_last, batch {r['batch']}, {r['size']} px, K = {SHORT_OUTPUTS} "
            f"outputs, eager, SGD nesterov, clip 5.0; torch {r['torch']}, {r['steps']} timed steps after "
            f"{r['warmup']}. "
            "Loss alone: its forward + backward on the step's (batch, K) logits, median of CUDA events. "
            "`benchmarks/gpu_resnet50_step.py --short`."
        ),
        "",
        "| loss | images/s | step ms | loss fwd+bwd µs | loss share of the step |",
        "|---|---|---|---|---|",
    ]
    for name, v in r["results"].items():
        if "error" in v:
            lines.append(f"| {name} | - | - | - | {v['error']} |")
        else:
            lines.append(
                f"| {name} | {v['images_per_s']:.0f} | {v['step_ms']:.1f} | {v['loss_us']:.0f} | "
                f"{v['loss_share']:.2%} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--images", type=int, default=2048, help="generated JPEGs for the loader measurements")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument(
        "--allow-cpu", action="store_true", help="run on the CPU (a functional check, not a measurement)"
    )
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument(
        "--short",
        action="store_true",
        help=f"only the eager synthetic step, K = {SHORT_OUTPUTS}, Drainage vs cross-entropy",
    )
    args = p.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("no CUDA GPU: nothing to measure (pass --allow-cpu for a functional check)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    report = {
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "CPU",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "batch": args.batch,
        "size": args.size,
        "steps": args.steps,
        "warmup": args.warmup,
        "results": run_short(args, device) if args.short else run_all(args, device),
    }
    stem = "gpu_resnet50_short" if args.short else "gpu_resnet50_step"
    md = markdown_short(report) if args.short else markdown(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
