"""One GPU check on a 450 s budget (one command on a lent H200): the environment, the core tests on
CUDA tensors, compute-sanitizer on every kernel, fwd+bwd timings, the fused linear losses against
materialising the logits.

    PYTHONPATH=. python3 -m benchmarks.gpu_check --out /tmp/gpu      # on a GPU machine
    python benchmarks/gpu_check.py --dry-run --out /tmp/plan          # anywhere: the plan, no GPU

Parts (--parts env,tests,sanitize,timings,linear), run in that order, each within the time left to it; what
does not fit is recorded as "skipped: time budget" instead of overrunning:
  env      device, driver, CUDA, versions, SMs, L2, the backends (this builds the CUDA extension on
           first use), the device-to-device copy bandwidth
  tests    the core test files on CUDA tensors and every GPU backend (tests/support.py), one pytest
           process per file (benchmarks/pytest_run.py)
  sanitize compute-sanitizer's memcheck, racecheck, then synccheck on benchmarks/sanitize_cases.py (every
           kernel of a backend at every row layout, small shapes), once per GPU backend, one process
           per run (benchmarks/sanitize.py): ok, the tool's first error lines, or why it did not run
  timings  fwd+bwd (reduction mean, upstream gradient 1) per case x provider: CUDA-event median, GB/s
           on 1 read + 1 write of the logits, % of the copy bandwidth, CUDA-graph replay, wall time,
           kernels per step, peak memory. A provider failing on a case is that cell's error.
  linear   one training step of a language model's output layer, 8,192 tokens x H = 4,096 x V = 128,257
           in bf16 (benchmarks/linear_case.py): the materialised logits + the fused loss, the fused
           linear loss, materialised + F.cross_entropy, Liger's fused linear cross-entropy when
           installed; per provider the CUDA-event median, TFLOP/s, peak memory, and the fused linear
           loss's differences from the materialised one. A provider failing is that cell's error.
The budget: env takes what it takes (its build is needed by every later part); tests get at most
TESTS_CAP_S and leave SANITIZE_RESERVE_S + TIMINGS_RESERVE_S + LINEAR_RESERVE_S; sanitize gets at most
SANITIZE_CAP_S and leaves TIMINGS_RESERVE_S + LINEAR_RESERVE_S; the timings fill what is left, cell by
cell, up to LINEAR_RESERVE_S before the deadline; linear gets at most LINEAR_CAP_S, up to the deadline.
(A reserve is left only for a part that --parts selects.) So sanitize runs before the timings (after
them it would never get a second), and after the tests, which leave many of the same Triton kernels
compiled in Triton's cache: correctness first, then speed. A short budget loses the tests' tail, then
synccheck and racecheck, before the timings and linear lose their reserves.
results.json and results.md in --out are rewritten after each part, sanitizer run, timing case and
linear cell, so a run cut short loses only what was running. Exit status 1 when a test failed, a
sanitizer run found errors or failed, or a part raised (the files are complete either way), 2 when
nothing could run (a bad plan, no GPU without --dry-run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# The benchmark modules import each other by plain name (`from cases import ...`), as pytest and
# `python benchmarks/x.py` see them; `python -m benchmarks.gpu_check` must see them the same way.
sys.path[:0] = [str(HERE), str(REPO)]

import linear_case
import measure
import pytest_run
import sanitize
import torch
from cases import Case, RotatingInputs
from gpu_env import ENV_KEYS, copy_bandwidth, environment, ready_backends
from gpu_markdown import markdown
from linear_case import run_linear
from measure import describe, recover, time_cap
from providers import all_providers, make_step, unavailable
from report import slug

BUDGET_S = 450  # a command may take 10 minutes of the 15 lent; less start-up and the last write
# The core files took 91 s on 2 CPU cores (Triton's interpreter); on a GPU their time is mostly
# compiling Triton / Inductor kernels and the files run side by side.
TESTS_CAP_S = 210
TESTS_MIN_S = 30  # less left for the tests: skip them (each process first imports torch, starts CUDA)
TIMINGS_RESERVE_S = 150  # what the tests and sanitize parts leave to the timings part when it runs
# Under the tools a process starts in seconds and the cases' kernels run in milliseconds; the first
# Triton run also compiles the kernels the tests did not (each is cached for the runs after it).
SANITIZE_CAP_S = 120
SANITIZE_RESERVE_S = 60  # what the tests part leaves to the sanitize part: memcheck on both backends
# The linear part: 4 providers x (3 + 30 + 2) steps of ~26 TFLOP (~40 ms each on an H200) and their first
# calls (Triton compiling); it runs last, so it keeps what the earlier parts leave, up to its cap.
LINEAR_RESERVE_S = 40
LINEAR_CAP_S = 120
CELL_CAP_S = 60  # one provider on one case, its first call (Triton / Inductor compilation) included
CELL_MIN_S = 5  # a cell is not started with less time left

SHAPES = [(32768, 1001), (8192, 32001), (4096, 128256), (65536, 11), (256, 51)]
DTYPES = [torch.bfloat16, torch.float32]
PIXELS = (8, 19, (512, 1024))  # per-pixel (N, K, (H, W)) in bf16, in both layouts
PROVIDERS = [
    "drainage_fast[triton]",
    "drainage_fast[triton,recompute]",  # the backward reads the logits again: 2 reads + 1 write
    "drainage_fast[cuda]",
    "F.cross_entropy",
    "liger-cross_entropy",
    "reference-compiled",
]
# Inductor compiles one graph per case (seconds each): measured after every other provider, so a
# short budget loses only these cells.
BUILT_LATE = {"reference-compiled"}
NOT_PER_PIXEL = {"liger-cross_entropy": "Liger takes (N, V) logits only"}
TEST_FILES = [
    "tests/test_backends.py",
    "tests/test_api.py",
    "tests/test_reference.py",
    "tests/test_compile.py",
    "tests/test_triton.py",
    "tests/test_csrc.py",
    "tests/test_gpu.py",
]
PARTS = ("env", "tests", "sanitize", "timings", "linear")


@dataclass(frozen=True)
class Reps:
    warmup: int  # eager calls before timing: compilation, autotuning, allocator
    events: int  # CUDA-event timed calls (median)
    wall: int  # synchronised wall-clock calls (median)
    graph: int  # CUDA-graph replays (median)


FULL = Reps(warmup=3, events=30, wall=15, graph=10)
QUICK = Reps(warmup=1, events=5, wall=3, graph=2)


def timing_cases() -> list[Case]:
    cases = [Case(N, K, dtype, "fwd+bwd") for N, K in SHAPES for dtype in DTYPES]
    N, K, spatial = PIXELS
    return cases + [Case(N, K, torch.bfloat16, "fwd+bwd", spatial, layout) for layout in (False, True)]


def case_label(case: Case) -> str:
    dims = " × ".join(str(d) for d in case.shape)
    return dims + (" channels_last" if case.channels_last else " NCHW" if case.spatial else "")


def plan(args) -> dict:
    """What the run will do, as data; raises ValueError on anything that would fail later."""
    parts = [p for p in args.parts.split(",") if p]
    providers = [p for p in args.providers.split(",") if p] or PROVIDERS
    problems = [f"unknown part {p!r} (parts: {', '.join(PARTS)})" for p in parts if p not in PARTS]
    known = all_providers()
    problems += [f"unknown provider {p!r} (benchmarks/providers.py)" for p in providers if p not in known]
    tests = [f for f in TEST_FILES if (REPO / f).is_file()]
    if "tests" in parts and not tests:
        problems.append(f"none of the test files exists: {TEST_FILES}")
    if problems:
        raise ValueError("; ".join(problems))
    cases = [
        {
            "case": case_label(c),
            "shape": list(c.shape),
            "dtype": str(c.dtype).removeprefix("torch."),
            "layout": "channels_last" if c.channels_last else "contiguous",
            "bytes": c.bytes(),
        }
        for c in timing_cases()
    ]
    return {
        "parts": parts,
        "budget_s": args.budget,
        "reps": asdict(QUICK if args.quick else FULL),
        "caps_s": {
            "tests": TESTS_CAP_S,
            "sanitize": SANITIZE_CAP_S,
            "sanitize_reserve": SANITIZE_RESERVE_S,
            "sanitize_run_min": sanitize.RUN_MIN_S,
            "timings_reserve": TIMINGS_RESERVE_S,
            "linear": LINEAR_CAP_S,
            "linear_reserve": LINEAR_RESERVE_S,
            "cell": CELL_CAP_S,
        },
        "test_files": tests,
        "sanitize": sanitize.plan(sanitize.find_tool()),
        "cases": cases,
        "providers": providers,
        "mode": "fwd+bwd, mean, upstream 1",
        "linear": linear_case.plan(),
    }


def child_env() -> dict:
    """The environment of the processes a part starts: this tree's drainage_fast, the real kernels."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    env.pop("TRITON_INTERPRET", None)  # real kernels on the GPU, never the CPU interpreter
    return env


# -- tests -----------------------------------------------------------------------------------------


def run_tests(files: list[str], out: Path, cap_s: float) -> dict:
    results = pytest_run.run_files(files, out / "pytest", cap_s, REPO, child_env())
    totals = {k: sum(r[k] for r in results.values()) for k in ("passed", "failed", "errors", "skipped")}
    status = "done: " + ", ".join(f"{v} {k}" for k, v in totals.items())
    if any(r["status"].startswith("interrupted") for r in results.values()):
        status += " (interrupted: time budget)"
    return {"files": results, "totals": totals, "status": status}


# -- timings ---------------------------------------------------------------------------------------


def measure_cell(loss, case: Case, inputs: RotatingInputs, device: torch.device, reps: Reps) -> dict:
    """Every figure of one provider on one case; the CUDA-graph figure is an error string when the
    provider cannot be captured (e.g. it synchronises with the host)."""
    step = make_step(loss, case.mode)
    for _ in range(reps.warmup):
        step(*inputs.next())
    measure.sync(device)
    us = measure.device_us(step, inputs, device, reps.events)
    cell = {
        "us": us,
        "GBps": case.bytes() / us / 1e3,
        "wall_us": measure.wall_us(step, inputs, device, reps.wall),
        "kernels": measure.kernel_count(step, inputs, device),
        "peak_MB": measure.peak_memory_mb(step, inputs, device),
    }
    try:
        cell["graph_us"] = measure.graph_us(step, inputs, device, reps.graph)
    except Exception as err:  # noqa: BLE001 -- recorded beside the eager figures
        cell["graph_error"] = describe(err)
        recover(device)
    return cell


def run_timings(
    cells: list[tuple[Case, dict]],
    losses: dict,
    device: torch.device,
    reps: Reps,
    copy_gbps: float,
    seconds_left,
    save,
) -> None:
    """Fills each cell's record (provider name -> losses[name]) in place, skipping what cannot run or
    no longer fits in seconds_left(); save() after each case. Providers in BUILT_LATE go last."""
    for case, record in cells:
        reason = unavailable(record["provider"], device)
        if reason is None and case.spatial:
            reason = NOT_PER_PIXEL.get(record["provider"])
        if reason is not None:
            record["status"] = f"skipped: {reason}"
    for late in (False, True):
        for case in dict.fromkeys(c for c, _ in cells):
            todo = [r for c, r in cells if c == case and r["status"] == "pending"]
            todo = [r for r in todo if (r["provider"] in BUILT_LATE) == late]
            if todo:
                _time_case(case, todo, losses, device, reps, copy_gbps, seconds_left)
                save()


def _time_case(
    case: Case, records: list[dict], losses: dict, device, reps: Reps, copy_gbps: float, seconds_left
):
    """The providers of `records` on one case, sharing its inputs; each within its time cap."""
    try:
        inputs = RotatingInputs(case, device, requires_grad=True) if seconds_left() >= CELL_MIN_S else None
    except Exception as err:  # noqa: BLE001 -- e.g. out of memory: this case only
        for record in records:
            record["status"] = f"error: inputs: {describe(err)}"
        return
    for record in records:
        left = seconds_left()
        if left < CELL_MIN_S:
            record["status"] = "skipped: time budget"
            continue
        try:
            with time_cap(min(CELL_CAP_S, left)):
                record.update(measure_cell(losses[record["provider"]], case, inputs, device, reps))
            record["status"] = "ok"
            record["pct_copy"] = 100 * record["GBps"] / copy_gbps
        except Exception as err:  # noqa: BLE001 -- one cell's error, never the run's
            record["status"] = f"error: {describe(err)}"
            recover(device)
    del inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the next case's inputs and graph pools start from a clean allocator


# -- output ----------------------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def new_report(args, the_plan: dict, gpu: str, command: str) -> tuple[dict, list[tuple[Case, dict]]]:
    """The report before anything ran, and the timing cells: (case, its record in the report)."""
    initial = "dry-run" if args.dry_run else "pending"
    cells = [
        (case, {"case": info["case"], "dtype": info["dtype"], "provider": provider, "status": initial})
        for case, info in zip(timing_cases(), the_plan["cases"])
        for provider in the_plan["providers"]
    ]
    report = {
        "tool": "benchmarks/gpu_check.py",
        "command": command,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": gpu,
        "slug": slug(gpu),
        "dry_run": args.dry_run,
        "quick": args.quick,
        "plan": the_plan,
        "env": {"status": initial, "values": dict.fromkeys(ENV_KEYS, "dry-run") if args.dry_run else {}},
        "tests": {"status": initial, "files": {f: {"status": initial} for f in the_plan["test_files"]}},
        "sanitize": {
            "status": initial,
            "tool": the_plan["sanitize"]["tool"],
            "runs": [
                {"tool": r["tool"], "backend": r["backend"], "status": initial}
                for r in the_plan["sanitize"]["runs"]
            ],
        },
        "timings": {"status": initial, "cells": [record for _, record in cells]},
        "linear": {
            "status": initial,
            "cells": [{"provider": p, "status": initial} for p in the_plan["linear"]["providers"]],
        },
    }
    for part in PARTS:
        if part not in the_plan["parts"]:
            mark(report, part, "not selected (--parts)")
    return report, cells


def mark(report: dict, part: str, status: str) -> None:
    """Sets a part's status and that of each of its items (test files, sanitizer runs, timing and linear
    cells)."""
    report[part]["status"] = status
    items = {
        "tests": report["tests"]["files"].values(),
        "sanitize": report["sanitize"]["runs"],
        "timings": report["timings"]["cells"],
        "linear": report["linear"]["cells"],
    }.get(part, [])
    for item in items:
        item["status"] = status


class Check:
    """One run on the GPU: the parts in order against one deadline, the report saved after each step."""

    def __init__(self, args, report: dict, cells: list[tuple[Case, dict]], started: float):
        self.args, self.report, self.cells, self.started = args, report, cells, started
        self.deadline = started + args.budget
        self.device = torch.device("cuda")
        self.reps = QUICK if args.quick else FULL

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        self.report["elapsed_s"] = round(time.monotonic() - self.started, 1)
        write_atomic(self.args.out / "results.json", json.dumps(self.report, indent=1) + "\n")
        write_atomic(self.args.out / "results.md", markdown(self.report))

    def run_part(self, part: str, fn) -> None:
        t0 = time.monotonic()
        self.report[part]["status"] = "running"
        self.save()
        try:
            result = fn()
            self.report[part].update(result, status=result.get("status", "done"))
        except Exception as err:  # noqa: BLE001 -- one part failing must not lose the others
            self.report[part]["status"] = f"error: {describe(err)}"
            recover(self.device)
        self.report[part]["seconds"] = round(time.monotonic() - t0, 1)
        self.save()

    def env(self) -> dict:
        return {"values": environment(self.device)}

    def tests(self) -> dict:
        ready_backends(self.device)  # the CUDA extension built once, here, not by every test process at once
        cap = min(TESTS_CAP_S, self.seconds_left() - self.reserve("sanitize", "timings", "linear"))
        if cap < TESTS_MIN_S:
            mark(self.report, "tests", "skipped: time budget")
            return {"status": "skipped: time budget"}
        return run_tests(self.report["plan"]["test_files"], self.args.out, cap)

    def sanitize(self) -> dict:
        ready = ready_backends(self.device)  # the CUDA extension's build, outside every tool's cap
        cannot_run = {
            b: ready[f"backend_{b}"].removeprefix("unavailable: ")
            for b in sanitize.BACKENDS
            if ready.get(f"backend_{b}", "").startswith("unavailable")
        }
        cap = min(SANITIZE_CAP_S, self.seconds_left() - self.reserve("timings", "linear"))
        out = self.args.out / "sanitize"
        return sanitize.run_all(self.report["sanitize"], cannot_run, child_env(), out, cap, self.save)

    def reserve(self, *parts: str) -> float:
        """The seconds kept for those of `parts` that this run will run later."""
        reserves = {"sanitize": SANITIZE_RESERVE_S, "timings": TIMINGS_RESERVE_S, "linear": LINEAR_RESERVE_S}
        return sum(reserves[p] for p in parts if p in self.report["plan"]["parts"])

    def timings(self) -> dict:
        ready_backends(self.device)  # the CUDA extension build, outside every cell's time cap
        copy = self.report["env"].get("values", {}).get("copy_GBps") or copy_bandwidth(self.device)
        self.report["timings"]["copy_GBps"] = copy
        run_timings(self.cells, all_providers(), self.device, self.reps, copy, self.timings_left, self.save)
        return {"status": done([record for _, record in self.cells])}

    def timings_left(self) -> float:
        """The timings' seconds: they stop LINEAR_RESERVE_S before the deadline when linear runs after."""
        return self.seconds_left() - self.reserve("linear")

    def linear(self) -> dict:
        deadline = time.monotonic() + min(LINEAR_CAP_S, self.seconds_left())
        records = self.report["linear"]["cells"]
        run_linear(
            records,
            linear_case.loss_functions("triton"),
            linear_case.SHAPE,
            linear_case.DTYPE,
            self.device,
            self.reps,
            lambda: deadline - time.monotonic(),
            self.save,
            CELL_CAP_S,
            CELL_MIN_S,
        )
        return {"status": done(records)}


def done(records: list[dict]) -> str:
    """A part's status from its cells': "done: 10 ok, 2 skipped"."""
    counts = Counter(record["status"].split(":")[0] for record in records)
    return "done: " + ", ".join(f"{n} {status}" for status, n in counts.items())


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for results.json, results.md, pytest/")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument(
        "--providers", default="", help="comma-separated provider names (default: all of PROVIDERS)"
    )
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run")
    p.add_argument("--quick", action="store_true", help="fewer repeats: a rehearsal, not a measurement")
    p.add_argument("--dry-run", action="store_true", help="no GPU: write the plan with dry-run markers")
    return p.parse_args(argv)


def main(argv=None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    # `timeout` and job runners stop with SIGTERM: as SystemExit it unwinds through the finally blocks
    # that stop the test processes; results.json and results.md keep what was saved last.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return run(args, " ".join(["gpu_check", *(sys.argv[1:] if argv is None else argv)]), started)
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args, command: str, started: float) -> int:
    try:
        the_plan = plan(args)
    except ValueError as err:
        print(f"gpu_check: {err}", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU (use --dry-run to check the plan)", file=sys.stderr)
        return 2
    gpu = "dry-run (no GPU)" if args.dry_run else torch.cuda.get_device_name(torch.device("cuda"))
    report, cells = new_report(args, the_plan, gpu, command)
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args, report, cells, started)
    check.save()
    if args.dry_run:
        print(f"gpu_check: dry-run plan written to {args.out}/results.json and results.md")
        return 0
    for part in (p for p in PARTS if p in the_plan["parts"]):  # PARTS' order: see the module docstring
        check.run_part(part, getattr(check, part))
    print(
        f"gpu_check: {gpu}: wrote {args.out}/results.json and results.md "
        f"(commit them as benchmarks/results/{report['slug']}/)"
    )
    totals = report["tests"].get("totals", {})
    broken = any(report[p]["status"].startswith("error") for p in PARTS)
    found = any(r["status"].startswith(("errors", "failed")) for r in report["sanitize"]["runs"])
    return 1 if broken or found or totals.get("failed") or totals.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
