"""The sanitizer part of benchmarks/gpu_check.py: benchmarks/sanitize_cases.py under compute-sanitizer,
one process per (tool, GPU backend), each within a time cap, its output read back into a record.

What each tool sees (https://docs.nvidia.com/compute-sanitizer/ComputeSanitizer/index.html):
  memcheck   out-of-bounds and misaligned accesses to global, local and shared memory. It runs with
             PYTORCH_NO_CUDA_MEMORY_CACHING=1: torch's caching allocator hands out pieces of larger
             segments, and the tool sees an access past a tensor's end that stays in its segment as fine.
  racecheck  hazards between the threads of a block on shared memory: the cross-warp reductions of
             both backends, the CUDA finalize. It does not see global memory, so the handing over of
             partials through global memory (Triton's last-program ticket) is checked by memcheck's
             bounds and the cases' comparison with the oracle, not by racecheck.
  synccheck  barriers that only part of a block reaches; runs on the time the first two leave.
Flags: --error-exitcode (a finding sets the exit status); --check-exit-code no (a case that failed is
read from the script's output, not counted as a tool error); --report-api-errors no (torch and Triton
probe the driver with calls that fail by design: API errors, not kernel errors);
--target-processes application-only (the children, ptxas and ninja, use no GPU).

A run's status: "ok" (the tool's summary says 0 errors and the script printed sanitize_cases.DONE),
"errors: N" (the tool's findings; `excerpt` holds their first lines), "failed: ..." (no summary: the
tool could not start, or a case failed; `excerpt` holds the output's last lines), "timeout: ...", or
"skipped: ..." (not run, and why). Each log is kept as <log_dir>/<tool>-<backend>.log.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest_run
import sanitize_cases

REPO = Path(__file__).resolve().parents[1]
TOOLS = ("memcheck", "racecheck", "synccheck")
REQUIRED = ("memcheck", "racecheck")  # each keeps RUN_MIN_S of the part's time until it has run
BACKENDS = sanitize_cases.BACKENDS
TOOL_ENV = {"memcheck": {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}}
ERROR_EXITCODE = 99
# A run is not started with less: the script's start under the tool (torch, the CUDA context, loading
# the kernels) takes seconds before the first case.
RUN_MIN_S = 15
EXCERPT_LINES = 12

ERROR_SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) errors?")
RACECHECK_SUMMARY = re.compile(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) errors?, (\d+) warnings?")
PREFIX = "========="


def find_tool(path: str | None = None, roots=None) -> str | None:
    """compute-sanitizer on `path` (default $PATH), else in <root>/bin for roots (default $CUDA_HOME,
    torch's CUDA_HOME, /usr/local/cuda); None when there is none."""
    found = shutil.which("compute-sanitizer", path=path)
    if found:
        return found
    if roots is None:
        from torch.utils.cpp_extension import CUDA_HOME

        roots = (os.environ.get("CUDA_HOME"), CUDA_HOME, "/usr/local/cuda")
    candidates = (Path(root) / "bin" / "compute-sanitizer" for root in roots if root)
    return next((str(c) for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


def command(tool_path: str | None, tool: str, backend: str) -> list[str]:
    return [
        tool_path or "compute-sanitizer",
        "--tool",
        tool,
        "--error-exitcode",
        str(ERROR_EXITCODE),
        "--check-exit-code",
        "no",
        "--report-api-errors",
        "no",
        "--target-processes",
        "application-only",
        sys.executable,
        "benchmarks/sanitize_cases.py",
        "--backend",
        backend,
    ]


def shell_line(tool_path: str | None, tool: str, backend: str) -> str:
    """The command as one shell line from the repository root, its environment variables first."""
    env = [f"{k}={v}" for k, v in TOOL_ENV.get(tool, {}).items()]
    return shlex.join([*env, *command(tool_path, tool, backend)])


def plan(tool_path: str | None) -> dict:
    """What the part would run, in order: tool-major, so that a short budget loses synccheck first."""
    return {
        "tool": tool_path,
        "tools": list(TOOLS),
        "backends": list(BACKENDS),
        "cases": [c.name for c in sanitize_cases.cases()],
        "runs": [
            {"tool": t, "backend": b, "command": shell_line(tool_path, t, b)} for t in TOOLS for b in BACKENDS
        ],
    }


def parse_report(text: str) -> dict:
    """errors (None without a summary line), warnings (racecheck's) and the first lines of the tool's
    findings, from compute-sanitizer's output (each of its lines starts with =========)."""
    counts = [int(n) for n in ERROR_SUMMARY.findall(text)]
    races = RACECHECK_SUMMARY.findall(text)
    counts += [int(errors) for errors, _ in races]  # racecheck may print both summaries: max, not sum
    findings = [
        line.removeprefix(PREFIX).removeprefix(" ").rstrip()
        for line in text.splitlines()
        if line.startswith(PREFIX) and "SUMMARY:" not in line and "COMPUTE-SANITIZER" not in line
    ]
    return {
        "errors": max(counts) if counts else None,
        "warnings": sum(int(warnings) for _, warnings in races),
        "findings": [line for line in findings if line.strip()][:EXCERPT_LINES],
    }


def verdict(text: str, timed_out: bool = False, cap_s: float = 0.0) -> dict:
    """A run's record (status, errors, warnings, excerpt) from its whole output."""
    report = parse_report(text)
    tail = [line.rstrip() for line in text.splitlines() if line.strip()][-EXCERPT_LINES:]
    if timed_out:  # what the tool found before the cap, else where the script was
        status, excerpt = f"timeout: over its {cap_s:.0f} s cap", report["findings"] or tail
    elif report["errors"] is None:
        status, excerpt = "failed: no sanitizer summary (the tool or the script stopped)", tail
    elif report["errors"]:
        status, excerpt = f"errors: {report['errors']}", report["findings"]
    elif sanitize_cases.DONE not in text:
        status, excerpt = "failed: a case failed or the script stopped", tail
    else:
        status, excerpt = "ok", []
    return {"status": status, "errors": report["errors"], "warnings": report["warnings"], "excerpt": excerpt}


def run_one(tool_path: str, tool: str, backend: str, env: dict, log: Path, cap_s: float) -> dict:
    """One tool on one backend's cases, killed (its whole process group) after cap_s seconds."""
    t0 = time.monotonic()
    with open(log, "w") as out:
        # its own session: the kill at the cap reaches the Python process under the tool as well
        proc = subprocess.Popen(
            command(tool_path, tool, backend),
            cwd=REPO,
            env={**env, **TOOL_ENV.get(tool, {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        timed_out = False
        try:
            proc.wait(timeout=cap_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # also when the caller stops (SIGTERM): nothing keeps running on the GPU
            if proc.poll() is None:
                pytest_run.signal_group(proc, signal.SIGKILL)
                proc.wait()
    seconds = round(time.monotonic() - t0, 1)
    record = verdict(log.read_text(errors="replace"), timed_out, cap_s)
    return {**record, "seconds": seconds, "exit_code": proc.returncode, "log": log.name}


def run_all(part: dict, unavailable: dict[str, str], env: dict, log_dir: Path, cap_s: float, save) -> dict:
    """Fills the records of part["runs"] ({tool, backend, status}) in place within cap_s seconds,
    save() after each run. unavailable: backend -> why it cannot run. Returns the part's status."""
    runs, tool_path = part["runs"], part["tool"]
    if tool_path is None:
        status = "skipped: compute-sanitizer not found (PATH, CUDA_HOME, /usr/local/cuda/bin)"
        for run in runs:
            run["status"] = status
        return {"status": status}
    for run in runs:
        if run["backend"] in unavailable:
            run["status"] = f"skipped: backend unavailable: {unavailable[run['backend']]}"
    log_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + cap_s
    todo = [run for run in runs if run["status"] == "pending"]
    for i, run in enumerate(todo):
        left = deadline - time.monotonic()
        if left < RUN_MIN_S:
            run["status"] = "skipped: time budget"
            continue
        # RUN_MIN_S kept for each later memcheck / racecheck run, as long as this one still gets it
        later = sum(r["tool"] in REQUIRED for r in todo[i + 1 :])
        cap = max(RUN_MIN_S, left - RUN_MIN_S * later)
        run["status"] = "running"
        save()
        log = log_dir / f"{run['tool']}-{run['backend']}.log"
        run.update(run_one(tool_path, run["tool"], run["backend"], env, log, cap))
        save()
    counts = Counter(run["status"].split(":")[0] for run in runs)
    return {"status": "done: " + ", ".join(f"{n} {status}" for status, n in counts.items())}
