"""Runs test files in pytest subprocesses under a deadline and reads their junit xml.

Each file gets its own process and all of them run at once: on a GPU machine the tests mostly wait on
the CPU compiling Triton and Inductor kernels, which several processes do side by side. At the deadline
the processes still running get SIGINT, on which pytest stops and still writes its junit xml (the tests
done so far), then SIGKILL after GRACE_S. Never -x: every failure is wanted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

GRACE_S = 20  # pytest's KeyboardInterrupt path finishes the current test's teardown and writes the xml
MESSAGE_CHARS = 300


def parse_junit(path: Path) -> dict:
    """Counts (passed, failed, errors, skipped) and the failures [{test, kind, message}] of a junit xml."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in ET.parse(path).getroot().iter("testcase"):
        if case.get("name") is None:
            continue  # the test that a SIGINT interrupted: pytest writes it empty
        name = f"{case.get('classname', '')}::{case.get('name')}"
        for tag, kind in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            element = case.find(tag)
            if element is not None:
                counts[kind] += 1
                if kind != "skipped":
                    message = element.get("message") or (element.text or "").strip()
                    failures.append({"test": name, "kind": tag, "message": message[:MESSAGE_CHARS]})
                break
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures}


def run_files(files: list[str], log_dir: Path, timeout_s: float, cwd: Path, env: dict) -> dict[str, dict]:
    """file -> {status, seconds, passed, failed, errors, skipped, failures}; junit xml and the pytest
    output of each file go to log_dir/<stem>.xml and .log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    procs = {}
    for name in files:
        xml, log = log_dir / f"{Path(name).stem}.xml", log_dir / f"{Path(name).stem}.log"
        xml.unlink(missing_ok=True)
        with open(log, "w") as out:
            # its own session: SIGINT reaches pytest and the subprocesses its tests start, nothing else
            procs[name] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-q",
                    "-rfE",
                    "-p",
                    "no:cacheprovider",
                    f"--junitxml={xml}",
                    name,
                ],
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_sigint_by_default,
            )
    seconds: dict[str, float] = {}
    try:
        while len(seconds) < len(procs) and time.monotonic() < start + timeout_s:
            for name, proc in procs.items():
                if name not in seconds and proc.poll() is not None:
                    seconds[name] = time.monotonic() - start
            time.sleep(0.2)
        late = [name for name in procs if name not in seconds]
        for name in late:
            signal_group(procs[name], signal.SIGINT)
        for name in late:
            try:
                procs[name].wait(GRACE_S)
            except subprocess.TimeoutExpired:
                signal_group(procs[name], signal.SIGKILL)
                procs[name].wait()
            seconds[name] = time.monotonic() - start
    finally:
        # the caller stopped (Ctrl-C, SIGTERM): their own sessions would keep them running on the GPU
        for proc in procs.values():
            if proc.poll() is None:
                signal_group(proc, signal.SIGKILL)
    return {
        name: _result(procs[name].returncode, name in late, seconds[name], log_dir / f"{Path(name).stem}.xml")
        for name in files
    }


def _sigint_by_default() -> None:
    """In the child before exec: SIGINT's default action, so that its Python raises KeyboardInterrupt
    (and pytest writes its junit xml) even when this process was started ignoring SIGINT (a background
    job of a non-interactive shell is): an ignored signal stays ignored across exec."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """sig to the process group of proc, started with start_new_session=True; nothing once it is gone."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _result(returncode: int, interrupted: bool, seconds: float, xml: Path) -> dict:
    if interrupted:
        status = "interrupted: time budget"
    else:
        status = {0: "passed", 1: "failed", 5: "no tests collected"}.get(
            returncode, f"exit code {returncode}"
        )
    try:
        counts = parse_junit(xml)
    except (OSError, ET.ParseError) as err:
        counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
        status += f" (no junit xml: {type(err).__name__})"
    return {"status": status, "seconds": round(seconds, 1), **counts}
