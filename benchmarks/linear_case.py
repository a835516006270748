"""gpu_check's "linear" part: the fused linear losses against materialising the logits (issue 23).

One training step of a language model's output layer: logits = hidden @ weight.T, the loss, backward
to hidden and weight. The GPU case is 8,192 tokens x H = 4,096 x V = 128,257 (Llama-3's 128,256 tokens
+ [IDK]) in bf16: the logits alone are 2.1 GB, and their gradient as much again. Providers:

- "materialised + fused loss": F.linear, then fused_drainage_loss on the (N, V) logits (the reference
  the others are compared with);
- "fused linear": fused_linear_drainage_loss, the logits never held whole (drainage_fast/linear.py);
- "materialised + F.cross_entropy": what a plain language-model head costs, for scale;
- "liger fused linear CE": Liger-Kernel's LigerFusedLinearCrossEntropyLoss, when liger_kernel is installed.

Per provider: the median of CUDA events around one step after warm-up (the wall clock on the CPU),
TFLOP/s on the three GEMMs' 6 N H V, the peak memory of one step above what was allocated before it
(the .grad tensors set to None before every step, so each provider allocates and counts them alike),
and for "fused linear" the largest absolute difference of the loss and of each gradient from the
reference's, relative to the reference's largest absolute value.

The same code runs on a tiny shape on the CPU in the tests (device, shape, dtype and backend are
arguments); every cell's error (out of memory, a time cap) is its own, never the part's.
"""

from __future__ import annotations

import importlib.util

import measure
import torch
import torch.nn.functional as F

from drainage_fast import fused_drainage_loss, fused_linear_drainage_loss

SHAPE = (8192, 4096, 128257)  # tokens N, hidden H, outputs V = 128,256 words + [IDK] (the last)
DTYPE = torch.bfloat16
ALPHA = 0.5
IGNORED_EVERY = 17  # every 17th target is ignore_index (-100), as the padding of a causal LM's batch
REFERENCE = "materialised + fused loss"
COMPARED = "fused linear"
LIGER = "liger fused linear CE"
PROVIDERS = [REFERENCE, COMPARED, "materialised + F.cross_entropy", LIGER]
DIFFERENCES = ("loss", "grad_hidden", "grad_weight")
# Published figures for the same kind of step, on other GPUs and shapes: quoted, not measured here.
PUBLISHED = [
    (
        "Liger-Kernel FusedLinearCrossEntropy: peak memory 27.6 GB (Hugging Face, logits materialised) "
        "-> 5.79 GB at 32k tokens, V = 128,256, H = 4,096, bf16, fwd+bwd, A100 80GB (v0.4.2; "
        "https://github.com/linkedin/Liger-Kernel/blob/main/benchmark/data/all_benchmark_data.csv)"
    ),
    (
        "Apple Cut Cross-Entropy: loss + gradient 28,000 MB / 208.8 ms (logits materialised) -> "
        "1,164 MB / 134.8 ms at 8,192 tokens x V = 256,000, H = 2,304 (Gemma-2 2B), A100-SXM4-80GB "
        "(https://github.com/apple/ml-cross-entropy README; https://arxiv.org/abs/2411.09009 Table 1)"
    ),
]


def flop(N: int, H: int, V: int) -> int:
    """The three GEMMs of a step: the logits, grad_hidden and grad_weight, 2 N H V each (ignored rows
    counted: the materialised providers multiply them too)."""
    return 6 * N * H * V


def plan() -> dict:
    N, H, V = SHAPE
    return {
        "shape": {"N": N, "H": H, "V": V},
        "dtype": str(DTYPE).removeprefix("torch."),
        "alpha": ALPHA,
        "ignored_every": IGNORED_EVERY,
        "flop_per_step": flop(N, H, V),
        "providers": PROVIDERS,
        "reference": REFERENCE,
        "published": PUBLISHED,
    }


def make_inputs(N: int, H: int, V: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """hidden (N, H) and weight (V, H) / sqrt(H), both requiring grad, and targets in [0, V - 1) (never
    the [IDK] output), every IGNORED_EVERY-th one ignore_index. Drawn on the device in `dtype` (a
    2 GB fp32 draw on the host would take seconds of the budget)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen, device=device, dtype=dtype).requires_grad_()
    weight = torch.randn(V, H, generator=gen, device=device, dtype=dtype).div_(H**0.5).requires_grad_()
    target = torch.randint(0, V - 1, (N,), generator=gen, device=device)
    target[::IGNORED_EVERY] = -100
    return hidden, weight, target


def loss_functions(backend: str) -> dict:
    """Provider name -> loss(hidden, weight, target), our losses on `backend`."""

    def liger(hidden, weight, target):
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        out = LigerFusedLinearCrossEntropyLoss()(weight, hidden, target)
        return out if isinstance(out, torch.Tensor) else out[0]  # (loss, z_loss) when z_loss is asked for

    return {
        REFERENCE: lambda h, w, t: fused_drainage_loss(F.linear(h, w), t, alpha=ALPHA, backend=backend),
        COMPARED: lambda h, w, t: fused_linear_drainage_loss(h, w, t, alpha=ALPHA, backend=backend),
        "materialised + F.cross_entropy": lambda h, w, t: F.cross_entropy(F.linear(h, w), t),
        LIGER: liger,
    }


def unavailable(provider: str, device: torch.device) -> str | None:
    if provider == LIGER:
        if importlib.util.find_spec("liger_kernel") is None:
            return "not installed (liger_kernel)"
        if device.type != "cuda":
            return "Liger's kernels need CUDA"
    return None


class FreshGrads:
    """measure's inputs: the same (hidden, weight, target) every call, the .grad of hidden and weight set
    to None first, outside the timed call, so every step allocates its gradients anew."""

    def __init__(self, hidden, weight, target):
        self.items = [(hidden, weight, target)]

    def next(self):
        hidden, weight, _ = self.items[0]
        hidden.grad = weight.grad = None
        return self.items[0]


def make_step(loss):
    def step(hidden, weight, target):
        value = loss(hidden, weight, target)
        value.backward()
        return value.detach()

    return step


def measure_cell(step, inputs: FreshGrads, device: torch.device, reps, flop_per_step: int) -> dict:
    for _ in range(reps.warmup):
        step(*inputs.next())
    measure.sync(device)
    us = measure.device_us(step, inputs, device, reps.events)
    return {
        "ms": us / 1e3,
        "TFLOPs": flop_per_step / us / 1e6,
        "peak_MB": measure.peak_memory_mb(step, inputs, device),
    }


def outputs(step, inputs: FreshGrads) -> dict:
    """One more step: its loss and the gradients it left in .grad."""
    hidden, weight, target = inputs.next()
    loss = step(hidden, weight, target)
    return {"loss": loss, "grad_hidden": hidden.grad, "grad_weight": weight.grad}


def relative_difference(a: torch.Tensor, b: torch.Tensor, chunk: int = 2**24) -> float:
    """max |a - b| / max |b|, in fp32 a chunk of elements at a time (no fp32 copy of a whole gradient)."""
    a, b = a.detach().reshape(-1), b.detach().reshape(-1)
    diff = torch.zeros((), device=b.device)
    scale = torch.zeros((), device=b.device)
    for i in range(0, b.numel(), chunk):
        x, y = a[i : i + chunk].float(), b[i : i + chunk].float()
        diff = torch.maximum(diff, (x - y).abs().max())
        scale = torch.maximum(scale, y.abs().max())
    return (diff / scale.clamp_min(1e-30)).item()


def run_linear(
    records: list[dict],
    losses: dict,
    shape: tuple[int, int, int],
    dtype: torch.dtype,
    device: torch.device,
    reps,
    seconds_left,
    save,
    cell_cap_s: float,
    cell_min_s: float,
) -> None:
    """Fills each record ({"provider", "status"}, in order, REFERENCE first) in place: the figures and
    "ok", "skipped: why" (unavailable, or under cell_min_s of seconds_left() left) or "error: what";
    each cell within min(cell_cap_s, seconds_left()); save() after each. `reps` has .warmup and .events."""
    for record in records:
        reason = unavailable(record["provider"], device)
        if reason is not None:
            record["status"] = f"skipped: {reason}"
    todo = [r for r in records if r["status"] == "pending"]
    if not todo:
        return
    try:
        inputs = FreshGrads(*make_inputs(*shape, dtype, device)) if seconds_left() >= cell_min_s else None
    except Exception as err:  # noqa: BLE001 -- e.g. out of memory: every cell says so
        for record in todo:
            record["status"] = f"error: inputs: {measure.describe(err)}"
        save()
        return
    reference = {}
    for record in todo:
        left = seconds_left()
        if inputs is None or left < cell_min_s:
            record["status"] = "skipped: time budget"
            continue
        name = record["provider"]
        try:
            with measure.time_cap(min(cell_cap_s, left)):
                step = make_step(losses[name])
                record.update(measure_cell(step, inputs, device, reps, flop(*shape)))
                if name in (REFERENCE, COMPARED):
                    got = outputs(step, inputs)
                    if name == REFERENCE:
                        reference = got
                    elif reference:
                        record["vs_reference"] = {
                            k: relative_difference(got[k], reference[k]) for k in DIFFERENCES
                        }
                    else:
                        record["vs_reference_error"] = f"no reference: {REFERENCE} did not run"
                    del got
            record["status"] = "ok"
        except Exception as err:  # noqa: BLE001 -- one cell's error, never the part's
            record["status"] = f"error: {measure.describe(err)}"
            measure.recover(device)
        if name == COMPARED:
            reference = {}  # the reference's gradients (1.1 GB on the GPU) are needed no longer
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    del inputs, reference
    if device.type == "cuda":
        torch.cuda.empty_cache()
