"""Backend "cpp" against F.cross_entropy (and the pure-PyTorch reference) on the CPU, fp32, 2 threads.

    PYTHONPATH=. .venv/bin/python benchmarks/cpu_vs_cross_entropy.py \
        [--repeats 15] [--before-rev REV] [--out DIR] [--members]

One training step of the loss on (N, K) fp32 logits that require grad, reduction "mean", forward +
backward, at the shapes of the CPU table of issue 11. Providers, measured in turns (one sample of
each per round, so load from other processes falls on all of them alike):

  * F.cross_entropy: F.cross_entropy(x, t).backward(), the price users already pay;
  * reference: fused_drainage_loss(..., backend="reference").backward();
  * cpp: fused_drainage_loss(..., backend="cpp").backward(), the whole eager path (argument
    checks, then one op, reduced_loss, whose C++ autograd node hands out the gradient);
  * cpp op: the kernels of that op without autograd (forward_reduced: the target check and count,
    the forward with the gradient, the reduction; the backward's scale by 1 is skipped): the
    kernel's share of the step;
  * cpp (before): the kernels of --before-rev (default: the commit before the vectorised kernel),
    built from git under the op namespace drainage_fast_before, behind the Python path of that
    time (host target check, the count and the reduction in torch ops, the Python autograd
    Function DrainageFunction); cpp op (before): its ops
    alone (forward_with_grad, scale_ by 1). Old and new are timed in the same process and rounds.

Then the per-pixel shapes of issue 19 (item 12), (N, K, H, W) logits in NCHW and in channels_last,
with F.cross_entropy, cpp and cpp op on the same logits (--pixel-shapes "" skips them).

Writes cpu_vs_cross_entropy.json (every sample, the machine) and cpu_vs_cross_entropy.md
(--report-only rewrites the .md from the .json). --kernels-only --before-rev REV times the
forward_with_grad op of this tree against REV's alone, in turns, at both kinds of shape
(cpu_kernels_vs_REV.{json,md}).

--members times the whole eager step of every member of the abstention family on "cpp" (Drainage,
Deep Gamblers, DAC, cross-entropy over all K outputs and over the C classes) in turns with
F.cross_entropy, at the (N, K) shapes, fp32, mean, 2 threads (cpu_members_vs_cross_entropy.{json,md}):
the goal of issue 21 is every member within 1.1x of Drainage's time and faster than F.cross_entropy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import measure  # benchmarks/measure.py: this script's folder is on sys.path
import torch
import torch.nn.functional as F

import drainage_fast.backends.cpp as cpp_backend
from drainage_fast import (
    _ext,
    _inputs,
    fused_cross_entropy_loss,
    fused_dac_loss,
    fused_drainage_loss,
    fused_gamblers_loss,
)
from drainage_fast._function import DrainageFunction

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(8192, 11), (512, 51), (4096, 101), (4096, 1001), (512, 32001)]
# Per-pixel (N, K, H, W), issue 19: ADE20K-like class counts + 1 at 64 x 64, a 128 x 128 image, long rows.
PIXEL_SHAPES = [(2, 51, 64, 64), (2, 33, 64, 64), (2, 151, 64, 64), (2, 21, 128, 128), (1, 1001, 16, 16)]
LAYOUTS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}
BEFORE_REV = "ef588fc"  # the kernels before the rows-in-lanes CPU kernel (issue 11, item 6)
ALPHA = 0.1
PROVIDERS = ["F.cross_entropy", "reference", "cpp", "cpp op", "cpp (before)", "cpp op (before)"]
PIXEL_PROVIDERS = ["F.cross_entropy", "cpp", "cpp op"]
# --members: each member's eager step (hyper-parameters as the papers' CIFAR-10 runs: Deep Gamblers'
# reward 2.2, a DAC alpha inside its ramp to 1).
MEMBERS = {
    "Drainage": lambda x, t: fused_drainage_loss(x, t, alpha=ALPHA, backend="cpp"),
    "Deep Gamblers": lambda x, t: fused_gamblers_loss(x, t, reward=2.2, backend="cpp"),
    "DAC": lambda x, t: fused_dac_loss(x, t, alpha=0.5, backend="cpp"),
    "CE over K": lambda x, t: fused_cross_entropy_loss(x, t, over="all", backend="cpp"),
    "CE over C": lambda x, t: fused_cross_entropy_loss(x, t, over="classes", backend="cpp"),
}
MEMBER_GOAL = 1.1  # every member within 1.1x of Drainage's time
MEMBERS_STEM = "cpu_members_vs_cross_entropy"


def build_before(rev: str) -> None:
    """Builds csrc/ of `rev` (schemas + CPU kernels) with its op namespace renamed."""
    sources = {}
    for name in ("drainage.cpp", "cpu/drainage_cpu.cpp", "row_math.h", "drainage_common.h", "cpu/fast_exp.h"):
        text = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{rev}:csrc/{name}"], check=True, capture_output=True, text=True
        ).stdout
        text = text.replace("TORCH_LIBRARY(drainage_fast,", "TORCH_LIBRARY(drainage_fast_before,")
        text = text.replace("TORCH_LIBRARY_IMPL(drainage_fast,", "TORCH_LIBRARY_IMPL(drainage_fast_before,")
        text = text.replace('m.set_python_module("drainage_fast.backends.native");', "")
        text = text.replace("PyInit__C", "PyInit__C_before")
        sources[name] = text
    key = hashlib.sha256(json.dumps(sources, sort_keys=True).encode() + " ".join(_ext.cxx_flags()).encode())
    build_dir = _ext.cache_root() / f"drainage_fast_before_{key.hexdigest()[:16]}"
    library = build_dir / "drainage_fast_before.so"
    if not library.is_file():
        src = Path(tempfile.mkdtemp(prefix="drainage_before_"))
        for name, text in sources.items():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_text(text)
        from torch.utils import cpp_extension

        _ext._put_ninja_on_path()
        build_dir.mkdir(parents=True, exist_ok=True)
        print(f"compiling the kernels of {rev} into {build_dir}", file=sys.stderr)
        cpp_extension.load(
            name="drainage_fast_before",
            sources=[str(src / "drainage.cpp"), str(src / "cpu/drainage_cpu.cpp")],
            extra_cflags=_ext.cxx_flags(),
            extra_ldflags=_ext.openmp_flags(),
            build_directory=str(build_dir),
            is_python_module=False,
        )
    else:
        torch.ops.load_library(str(library))


def before_functions() -> dict:
    """The cpp backend's functions (backends/native.py) on the old ops (their schemas take
    Drainage's h1, h2, d, ignore_index: no member, no weights)."""
    ops = torch.ops.drainage_fast_before

    def forward(x3, target, hp):
        return ops.forward.default(x3, target, *hp[:4])

    def backward(x3, target, stats, grad_rows, hp):
        return ops.backward.default(x3, target, stats, grad_rows, hp.drainage_idx, hp.ignore_index)

    def forward_with_grad(x3, target, hp, scale):
        return ops.forward_with_grad.default(x3, target, scale, *hp[:4])

    def scale_(grad, scale):
        ops.scale_.default(grad, scale)
        return grad

    return {
        "forward": forward,
        "backward": backward,
        "forward_with_grad": forward_with_grad,
        "scale_": scale_,
    }


def logits_and_target(shape, layout="NCHW"):
    """fp32 logits of `shape` ((N, K) or (N, K, H, W), in `layout`) and targets that are never the
    drainage output (the last one)."""
    N, K = shape[:2]
    x = (torch.randn(shape) * 3).contiguous(memory_format=LAYOUTS[layout])
    return x, torch.randint(0, K - 1, (N, *shape[2:]))


def make_steps(shape, layout="NCHW", providers=PROVIDERS):
    N, K = shape[:2]
    x, target = logits_and_target(shape, layout)
    x.requires_grad_()
    x3, t = _inputs.as_rows(x.detach()), target.reshape(-1)
    inv_count = torch.tensor([1.0 / t.numel()])
    one = torch.ones(())
    hp = _inputs.Hyper(float(torch.log(torch.tensor(ALPHA))), 0.0, K - 1, -100)  # beta = 1
    new_forward_reduced, new_reduced_loss = cpp_backend.forward_reduced, cpp_backend.reduced_loss
    old = before_functions() if "cpp (before)" in providers else None

    def old_forward_reduced(x3, target, hp, mean, with_grad, weight=None):
        # The path as it was before the one-op forward_reduced: the host target check, the count
        # and the reduction in torch ops, around the old kernels.
        _inputs.check_target_values(target, x3.shape[-1], hp.drainage_idx, hp.ignore_index)
        count = (target != hp.ignore_index).sum()
        inv_count = torch.reciprocal(count.to(torch.float32)).reshape(1) if mean else None
        loss, _, grad = old["forward_with_grad"](x3, target, hp, inv_count)
        total = loss.sum()
        return (total / count if mean else total), inv_count, grad, None

    def fused(backend):
        def step():
            fused_drainage_loss(x, target, alpha=ALPHA, backend=backend).backward()
            x.grad = None

        return step

    def old_reduced_loss(logits, target, hp, mean, weight=None):
        # The Python autograd Function the step went through before the C++ node.
        reduction = "mean" if mean else "sum"
        return DrainageFunction.apply(logits, target, weight, hp, reduction, "cpp", True, True)

    def fused_before():
        cpp_backend.forward_reduced, cpp_backend.reduced_loss = old_forward_reduced, old_reduced_loss
        try:
            fused("cpp")()
        finally:
            cpp_backend.forward_reduced, cpp_backend.reduced_loss = new_forward_reduced, new_reduced_loss

    def op():
        # the op the eager path calls (its backward scale is skipped for an upstream gradient of 1)
        torch.ops.drainage_fast.forward_reduced.default(x3, t, True, True, *hp, None)

    def op_before():
        grad = torch.ops.drainage_fast_before.forward_with_grad.default(x3, t, inv_count, *hp[:4])[2]
        torch.ops.drainage_fast_before.scale_.default(grad, one)

    steps = {
        "F.cross_entropy": ce_step(x, target),
        "reference": fused("reference"),
        "cpp": fused("cpp"),
        "cpp op": op,
        "cpp (before)": fused_before,
        "cpp op (before)": op_before,
    }
    return {name: steps[name] for name in providers}


def ce_step(x, target):
    """F.cross_entropy's training step on logits x that require grad: the price users already pay."""

    def step():
        F.cross_entropy(x, target).backward()
        x.grad = None

    return step


def member_steps(N, K):
    """F.cross_entropy's step and every member's eager "cpp" step on the same fp32 (N, K) logits."""
    x, target = logits_and_target((N, K))
    x.requires_grad_()

    def member(loss):
        def step():
            loss(x, target).backward()
            x.grad = None

        return step

    return {"F.cross_entropy": ce_step(x, target), **{name: member(loss) for name, loss in MEMBERS.items()}}


def check_same_values(shape, layout="NCHW"):
    """The new and the old kernel agree (the float64 test matrix checks the numbers themselves)."""
    x, target = logits_and_target(shape, layout)
    x3, t = _inputs.as_rows(x), target.reshape(-1)
    args = (x3, t, torch.tensor([1.0 / t.numel()]), -2.3, 0.0, shape[1] - 1, -100)
    new = torch.ops.drainage_fast.forward_with_grad.default(*args, 0, None)  # Drainage, no weights
    old = torch.ops.drainage_fast_before.forward_with_grad.default(*args)
    for a, b in zip(new, old):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def cases(shapes, pixel_shapes) -> list[tuple[tuple, str]]:
    """(shape, layout) of the (N, K) table, then of the per-pixel one in both layouts."""
    return [(shape, "NCHW") for shape in shapes] + [(s, layout) for s in pixel_shapes for layout in LAYOUTS]


def case_name(shape, layout) -> str:
    return str(tuple(shape)) + ("" if len(shape) == 2 else f" {layout}")


def kernels_only(all_cases, repeats: int, rev: str, out: Path) -> None:
    """forward_with_grad of this tree against that of `rev`, alone, in turns: the kernels' A/B
    without the step around them (at long rows the step's time follows the allocator)."""
    rows = []
    for shape, layout in all_cases:
        x, target = logits_and_target(shape, layout)
        x3, t = _inputs.as_rows(x), target.reshape(-1)
        args = (x3, t, torch.tensor([1.0 / t.numel()]), -2.3, 0.0, shape[1] - 1, -100)
        steps = {
            "this tree": lambda: torch.ops.drainage_fast.forward_with_grad.default(*args, 0, None),
            rev: lambda: torch.ops.drainage_fast_before.forward_with_grad.default(*args),
        }
        samples = measure.cpu_samples(steps, repeats)
        stats = {name: (min(v) * 1e3, statistics.median(v) * 1e3) for name, v in samples.items()}
        rows.append(
            {
                "shape": list(shape),
                "layout": layout,
                "ms": stats,
                "samples_ms": {n: [v * 1e3 for v in s] for n, s in samples.items()},
            }
        )
        print(case_name(shape, layout), stats, flush=True)
    info = {**machine(), "repeats": repeats, "before_rev": rev, "loadavg_1min_at_end": os.getloadavg()[0]}
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"cpu_kernels_vs_{rev}"
    stem.with_suffix(".json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    lines = [
        f"# The CPU kernels against those of {rev}: forward_with_grad alone, fp32, 2 threads",
        "",
        f"Machine: {info['cpu']}, torch {info['torch']}, 1-minute load average "
        f"{info['loadavg_1min_at_start']:.2f} at the start, {info['loadavg_1min_at_end']:.2f} at the end. "
        f"{repeats} rounds, the two in turns. Generated by `benchmarks/cpu_vs_cross_entropy.py "
        f"--kernels-only --before-rev {rev}`; every sample is in the .json beside this file.",
        "",
        f"| shape | this tree min / median ms | {rev} min / median ms | speed-up (min / median) |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        (a_min, a_med), (b_min, b_med) = r["ms"]["this tree"], r["ms"][rev]
        lines.append(
            f"| {case_name(r['shape'], r['layout'])} | {a_min:.3f} / {a_med:.3f} | {b_min:.3f} / {b_med:.3f} "
            f"| {b_min / a_min:.2f}x / {b_med / a_med:.2f}x |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def members(shapes, repeats: int, out: Path) -> None:
    """--members: every member's step in turns with F.cross_entropy (cpu_members_vs_cross_entropy)."""
    info = {**machine(), "repeats": repeats}
    rows = []
    for N, K in shapes:
        rows += sample_rows({"N": N, "K": K}, measure.cpu_samples(member_steps(N, K), repeats))
        print(members_table(rows, "min_ms").splitlines()[-1], flush=True)
    info["loadavg_1min_at_end"] = os.getloadavg()[0]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{MEMBERS_STEM}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    write_members_report(out)


def members_table(rows, stat: str) -> str:
    """Each member's time (µs), its ratio to Drainage's (goal <= 1.1) and F.cross_entropy's time over
    it (> 1: faster), in the order the shapes were measured."""
    by = {(r["N"], r["K"], r["provider"]): r[stat] for r in rows}
    lines = [
        "| shape (N, K) | F.cross_entropy µs | "
        + " | ".join(f"{m} µs (vs Drainage, F.ce / it)" for m in MEMBERS)
        + " |",
        "|---|" + "---:|" * (len(MEMBERS) + 1),
    ]
    for N, K in dict.fromkeys((r["N"], r["K"]) for r in rows):
        ce, drainage = by[(N, K, "F.cross_entropy")], by[(N, K, "Drainage")]
        cells = [
            f"{fmt_us(by[(N, K, m)])} ({by[(N, K, m)] / drainage:.2f}x, {ce / by[(N, K, m)]:.2f}x)"
            for m in MEMBERS
        ]
        lines.append(f"| ({N}, {K}) | {fmt_us(ce)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def members_summary(rows) -> str:
    by = {(r["N"], r["K"], r["provider"]): r["min_ms"] for r in rows}
    shapes = list(dict.fromkeys((r["N"], r["K"]) for r in rows))
    slow = [(m, s) for s in shapes for m in MEMBERS if by[(*s, m)] > MEMBER_GOAL * by[(*s, "Drainage")]]
    behind = [(m, s) for s in shapes for m in MEMBERS if by[(*s, m)] >= by[(*s, "F.cross_entropy")]]
    worst = max(by[(*s, m)] / by[(*s, "Drainage")] for s in shapes for m in MEMBERS)
    return "\n".join(
        [
            f"- Every member within {MEMBER_GOAL}x of Drainage's time at every shape (min): "
            + ("**met**" if not slow else f"**NOT met** ({', '.join(f'{m} at {s}' for m, s in slow)})")
            + f"; the largest ratio is {worst:.2f}x.",
            "- Every member faster than F.cross_entropy at every shape (min): "
            + ("**met**." if not behind else f"**NOT met** ({', '.join(f'{m} at {s}' for m, s in behind)})."),
        ]
    )


def write_members_report(out: Path) -> None:
    data = json.loads((out / f"{MEMBERS_STEM}.json").read_text())
    info, rows = data["machine"], data["rows"]
    header = (
        "# The abstention family on the CPU (`cpp`): every member against Drainage and F.cross_entropy\n\n"
        "fp32, forward + backward, reduction mean, 2 threads: the whole eager step "
        '(`fused_*_loss(x, t, backend="cpp").backward()`, one op with a C++ autograd node), and '
        "`F.cross_entropy(x, t).backward()`, on the same logits (N(0, 9); targets never the last, "
        "drainage output). Drainage alpha 0.1, Deep Gamblers reward 2.2, DAC alpha 0.5.\n\n"
        f"Machine: {info['cpu']} (`lscpu`), {info['logical_cpus']} logical CPUs, "
        f"torch.set_num_threads({info['threads']}), torch {info['torch']}, Python {info['python']}. "
        f"1-minute load average {info['loadavg_1min_at_start']:.2f} at the start, "
        f"{info['loadavg_1min_at_end']:.2f} at the end (the machine is shared). {info['repeats']} rounds, "
        "providers in turns; each sample averages enough calls to last >= 20 ms; the first table gives "
        "the min over the rounds, the second the median. Generated by "
        "`benchmarks/cpu_vs_cross_entropy.py --members`; every sample is in the .json beside this file.\n\n"
        "Each cell: the member's time, its ratio to Drainage's (goal: <= 1.1x) and F.cross_entropy's "
        "time over it (> 1: the member is faster).\n\n"
    )
    body = (
        members_table(rows, "min_ms")
        + "\n\n"
        + members_summary(rows)
        + "\n\nMedians:\n\n"
        + members_table(rows, "median_ms")
        + "\n"
    )
    (out / f"{MEMBERS_STEM}.md").write_text(header + body)


def sample_rows(where: dict, samples: dict) -> list[dict]:
    """The result rows of one case (`where`: its shape): each provider's samples (seconds) as min,
    median and all, in ms."""
    return [
        {
            **where,
            "dtype": "float32",
            "reduction": "mean",
            "provider": name,
            "min_ms": min(s) * 1e3,
            "median_ms": statistics.median(s) * 1e3,
            "samples_ms": [v * 1e3 for v in s],
        }
        for name, s in samples.items()
    ]


def machine() -> dict:
    return {
        "cpu": measure.cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_1min_at_start": os.getloadavg()[0],
    }


def fmt_us(ms: float) -> str:
    return f"{ms * 1e3:.0f}"


def plain(rows) -> list[dict]:
    """The rows of the (N, K) table (per-pixel rows have a layout)."""
    return [r for r in rows if "layout" not in r]


def table(rows) -> str:
    rows = plain(rows)
    by = {(r["N"], r["K"], r["provider"]): r for r in rows}
    shapes = sorted({(r["N"], r["K"]) for r in rows}, key=lambda s: SHAPES.index(s) if s in SHAPES else 99)
    lines = [
        "| shape (N, K) | F.cross_entropy µs | reference µs | cpp µs | cpp op µs | cpp (before) µs "
        "| cpp op (before) µs | cpp vs F.ce before → after | cpp op vs F.ce before → after "
        "| cpp vs reference before → after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for N, K in shapes:
        t = {p: by[(N, K, p)]["min_ms"] for p in PROVIDERS}
        ce, ref = t["F.cross_entropy"], t["reference"]
        lines.append(
            f"| ({N}, {K}) | {fmt_us(ce)} | {fmt_us(ref)} | {fmt_us(t['cpp'])} | {fmt_us(t['cpp op'])} "
            f"| {fmt_us(t['cpp (before)'])} | {fmt_us(t['cpp op (before)'])} "
            f"| {ce / t['cpp (before)']:.2f}x → **{ce / t['cpp']:.2f}x** "
            f"| {ce / t['cpp op (before)']:.2f}x → **{ce / t['cpp op']:.2f}x** "
            f"| {ref / t['cpp (before)']:.1f}x → **{ref / t['cpp']:.1f}x** |"
        )
    return "\n".join(lines)


def median_table(rows) -> str:
    rows = plain(rows)
    by = {(r["N"], r["K"], r["provider"]): r for r in rows}
    shapes = sorted({(r["N"], r["K"]) for r in rows}, key=lambda s: SHAPES.index(s) if s in SHAPES else 99)
    lines = [
        "| shape (N, K) | " + " | ".join(f"{p} µs" for p in PROVIDERS) + " | cpp vs F.ce (median) |",
        "|---|" + "---:|" * (len(PROVIDERS) + 1),
    ]
    for N, K in shapes:
        t = {p: by[(N, K, p)]["median_ms"] for p in PROVIDERS}
        lines.append(
            f"| ({N}, {K}) | "
            + " | ".join(fmt_us(t[p]) for p in PROVIDERS)
            + f" | {t['F.cross_entropy'] / t['cpp']:.2f}x |"
        )
    return "\n".join(lines)


def summary(rows) -> str:
    rows = plain(rows)
    by = {(r["N"], r["K"], r["provider"]): r["min_ms"] for r in rows}
    shapes = sorted({(r["N"], r["K"]) for r in rows}, key=lambda s: SHAPES.index(s) if s in SHAPES else 99)
    lines = []
    behind = [s for s in shapes if by[(*s, "cpp")] >= by[(*s, "F.cross_entropy")]]
    behind_op = [s for s in shapes if by[(*s, "cpp op")] >= by[(*s, "F.cross_entropy")]]
    lines.append(
        "- `cpp` faster than F.cross_entropy at every shape (whole eager step): "
        + ("**met**." if not behind else f"**NOT met** at {', '.join(map(str, behind))}.")
    )
    lines.append(
        "- The kernels alone (`cpp op`) faster than F.cross_entropy's whole step at every shape: "
        + ("**met**." if not behind_op else f"**NOT met** at {', '.join(map(str, behind_op))}.")
    )
    if (4096, 1001) in shapes:
        ref = by[(4096, 1001, "reference")] / by[(4096, 1001, "cpp")]
        lines.append(
            f"- (4096, 1001): `cpp` is {ref:.1f}x the reference "
            f"(goal >= 8x: **{'met' if ref >= 8 else 'NOT met'}**); "
            f"against F.cross_entropy {by[(4096, 1001, 'F.cross_entropy')] / by[(4096, 1001, 'cpp')]:.2f}x, "
            f"before {by[(4096, 1001, 'F.cross_entropy')] / by[(4096, 1001, 'cpp (before)')]:.2f}x."
        )
    lines.append(
        "- `cpp` − `cpp op` is what the step costs beyond the kernels (the argument checks in Python, "
        "the autograd node, backward() and the gradient's hand-out; for large outputs, the allocator "
        "and first touch of the gradient kept for the backward): "
        + ", ".join(f"{s}: {fmt_us(by[(*s, 'cpp')] - by[(*s, 'cpp op')])} µs" for s in shapes)
        + "."
    )
    return "\n".join(lines)


def pixel_table(rows) -> str:
    """The per-pixel rows: min and median over the rounds, and the ratios of both."""
    by = {(tuple(r["shape"]), r["layout"], r["provider"]): r for r in rows if "layout" in r}
    lines = [
        "| shape (N, K, H, W) | layout | F.cross_entropy min / median µs | cpp min / median µs "
        "| cpp op min / median µs | cpp GB/s (min) | cpp vs F.ce (min / median) | cpp op vs F.ce (min) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for shape, layout in dict.fromkeys((s, lay) for s, lay, _ in by):
        t = {
            p: (by[(shape, layout, p)]["min_ms"], by[(shape, layout, p)]["median_ms"])
            for p in PIXEL_PROVIDERS
        }
        (ce, ce_med), (ours, ours_med), (op, op_med) = t["F.cross_entropy"], t["cpp"], t["cpp op"]
        n_logits = math.prod(shape)
        moved = 2 * 4 * n_logits + 8 * n_logits // shape[1]  # 1 read + 1 write of fp32 logits, the targets
        lines.append(
            f"| {shape} | {layout} | {fmt_us(ce)} / {fmt_us(ce_med)} | {fmt_us(ours)} / {fmt_us(ours_med)} "
            f"| {fmt_us(op)} / {fmt_us(op_med)} | {moved / ours / 1e6:.1f} "
            f"| **{ce / ours:.2f}x** / {ce_med / ours_med:.2f}x | {ce / op:.2f}x |"
        )
    return "\n".join(lines)


def pixel_summary(rows) -> str:
    by = {(tuple(r["shape"]), r["layout"], r["provider"]): r for r in rows if "layout" in r}
    cases = list(dict.fromkeys((s, lay) for s, lay, _ in by))
    lines = []
    for stat in ("min_ms", "median_ms"):
        behind = [c for c in cases if by[(*c, "cpp")][stat] >= by[(*c, "F.cross_entropy")][stat]]
        lines.append(
            f"- `cpp` faster than F.cross_entropy at every per-pixel shape and layout ({stat[:-3]} over the "
            "rounds, whole eager step): "
            + (
                "**met**."
                if not behind
                else f"**NOT met** at {', '.join(f'{s} {lay}' for s, lay in behind)}."
            )
        )
    return "\n".join(lines)


def write_report(out: Path) -> None:
    data = json.loads((out / "cpu_vs_cross_entropy.json").read_text())
    info, rows = data["machine"], data["rows"]
    header = (
        "# cpp vs F.cross_entropy on the CPU: fp32, forward + backward, reduction mean, 2 threads\n\n"
        f"Machine: {info['cpu']} (`lscpu`), {info['logical_cpus']} logical CPUs, "
        f"torch.set_num_threads({info['threads']}), torch {info['torch']}, Python {info['python']}. "
        f"1-minute load average {info['loadavg_1min_at_start']:.2f} at the start, "
        f"{info['loadavg_1min_at_end']:.2f} at the end (the machine is shared). {info['repeats']} rounds, "
        "providers in turns; each sample averages enough calls to last >= 20 ms; the tables give the "
        "min over the rounds (the median table below). `before` = the kernels of "
        f"`{info['before_rev']}`, built and timed in the same process. Generated by "
        "`benchmarks/cpu_vs_cross_entropy.py`; every sample is in the .json beside this file.\n\n"
        "Ratios are F.cross_entropy's (or the reference's) time over ours: > 1 means `cpp` is faster. "
        "`cpp` is the whole eager step `fused_drainage_loss(x, t).backward()` (one op with a C++ "
        "autograd node, `csrc/reduced_loss.cpp`); `cpp op` the kernels alone, without autograd "
        "(`torch.ops.drainage_fast.forward_reduced`; before: `forward_with_grad` + `scale_`).\n\n"
    )
    body = ""
    if plain(rows):
        body += table(rows) + "\n\n" + summary(rows) + "\n\nMedians:\n\n" + median_table(rows) + "\n"
    if len(plain(rows)) < len(rows):
        body += (
            "\n## Per pixel\n\n(N, K, H, W) logits, NCHW (`contiguous`) and channels_last, and "
            "F.cross_entropy on the same tensor; the gradient keeps the logits' layout. GB/s: one read and "
            "one write of the logits and the targets over `cpp`'s time.\n\n"
            + pixel_table(rows)
            + "\n\n"
            + pixel_summary(rows)
            + "\n"
        )
    (out / "cpu_vs_cross_entropy.md").write_text(header + body)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--before-rev", default=BEFORE_REV)
    parser.add_argument("--shapes", default=None, help="e.g. 8192x11,512x51 (default: the CPU table)")
    parser.add_argument(
        "--pixel-shapes", default=None, help='e.g. 2x51x64x64 (default: the per-pixel table; "" for none)'
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json")
    parser.add_argument(
        "--kernels-only",
        action="store_true",
        help="time forward_with_grad of this tree against --before-rev's alone (cpu_kernels_vs_REV.md)",
    )
    parser.add_argument(
        "--members",
        action="store_true",
        help="every member against Drainage and F.cross_entropy (cpu_members_vs_cross_entropy.md)",
    )
    args = parser.parse_args()
    if args.report_only:
        (write_members_report if args.members else write_report)(args.out)
        return
    shapes = parse_shapes(args.shapes, SHAPES)
    pixel_shapes = parse_shapes(args.pixel_shapes, PIXEL_SHAPES)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    assert _ext.load_cpu() is None, _ext.load_cpu()
    if args.members:
        members(shapes, args.repeats, args.out)
        return
    build_before(args.before_rev)
    if args.kernels_only:
        kernels_only(cases(shapes, pixel_shapes), args.repeats, args.before_rev, args.out)
        return
    info = {**machine(), "repeats": args.repeats, "before_rev": args.before_rev}
    rows = []
    for shape, layout in cases(shapes, pixel_shapes):
        check_same_values(shape, layout)
        per_pixel = len(shape) > 2
        samples = measure.cpu_samples(
            make_steps(shape, layout, PIXEL_PROVIDERS if per_pixel else PROVIDERS), args.repeats
        )
        where = {"shape": list(shape), "layout": layout} if per_pixel else {"N": shape[0], "K": shape[1]}
        rows += sample_rows(where, samples)
        print((pixel_table(rows) if per_pixel else table(rows)).splitlines()[-1], flush=True)
    info["loadavg_1min_at_end"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_vs_cross_entropy.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    write_report(args.out)


def parse_shapes(arg: str | None, default: list[tuple]) -> list[tuple]:
    """ "AxB,CxDxExF" -> [(A, B), (C, D, E, F)]; None: `default`; "": none."""
    if arg is None:
        return default
    return [tuple(map(int, s.split("x"))) for s in arg.split(",") if s]


if __name__ == "__main__":
    main()
