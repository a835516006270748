"""benchmarks/gpu_check.py without a GPU: the dry-run plan through both entry points, and on CPU tensors
the pieces a GPU run goes through (timing cells, their errors and time budget, the pytest runner and its
junit parser, the markdown). No number measured here is a GPU number; none is written to the repo."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check
import gpu_markdown
import measure
import pytest_run
from cases import Case, RotatingInputs

CPU = torch.device("cpu")
ISSUE_CASES = [  # the shapes the check promises, in its order
    *[
        f"{N} × {K}"
        for N, K in [(32768, 1001), (8192, 32001), (4096, 128256), (65536, 11), (256, 51)]
        for _ in ("bf16", "fp32")
    ],
    "8 × 19 × 512 × 1024 NCHW",
    "8 × 19 × 512 × 1024 channels_last",
]


def run_check(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, *args, "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "results.json").read_text()), (tmp_path / "results.md").read_text()


def test_dry_run_writes_the_whole_plan(tmp_path):
    report, md = run_check(["-m", "benchmarks.gpu_check"], tmp_path)
    plan = report["plan"]
    assert report["dry_run"] and plan["parts"] == ["env", "tests", "timings"]
    assert [c["case"] for c in plan["cases"]] == ISSUE_CASES
    assert [c["dtype"] for c in plan["cases"]] == ["bfloat16", "float32"] * 5 + ["bfloat16"] * 2
    assert plan["cases"][0]["bytes"] == 2 * 32768 * 1001 * 2 + 8 * 32768  # 1 read + 1 write + targets
    assert plan["providers"] == gpu_check.PROVIDERS
    assert "tests/test_backends.py" in plan["test_files"] and "tests/test_gpu.py" in plan["test_files"]
    cells = report["timings"]["cells"]
    assert len(cells) == len(ISSUE_CASES) * len(gpu_check.PROVIDERS)
    assert {c["status"] for c in cells} == {"dry-run"} and report["env"]["status"] == "dry-run"
    assert set(report["env"]["values"]) == set(gpu_check.ENV_KEYS)
    assert md.startswith("# GPU check — dry-run (no GPU)")
    for section in ("## Environment", "## Correctness", "## Timings"):
        assert section in md
    assert "| 8 × 19 × 512 × 1024 channels_last | bfloat16 | drainage_fast[triton,recompute] |" in md
    assert not list(tmp_path.glob("*.tmp"))


def test_dry_run_as_a_script_with_some_parts(tmp_path):
    report, md = run_check(
        ["benchmarks/gpu_check.py", "--parts", "env,timings", "--quick", "--providers", "F.cross_entropy"],
        tmp_path,
    )
    assert report["quick"] and report["plan"]["reps"] == {"warmup": 1, "events": 5, "wall": 3, "graph": 2}
    assert report["tests"]["status"] == "not selected (--parts)"
    assert {c["provider"] for c in report["timings"]["cells"]} == {"F.cross_entropy"}
    assert "fewer repeats" in md


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--parts", "env,bogus"], "unknown part 'bogus'"),
        (["--providers", "F.cross_entropy,nope"], "unknown provider 'nope'"),
    ],
)
def test_a_bad_plan_is_refused(tmp_path, capsys, argv, message):
    assert gpu_check.main([*argv, "--dry-run", "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err and not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_real_run_needs_a_gpu(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path)]) == 2 and "no CUDA GPU" in capsys.readouterr().err


def fake_gpu(monkeypatch, environment):
    """main() as on a GPU machine, with every part replaced: only the orchestration runs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU 80GB")
    monkeypatch.setattr(gpu_check, "environment", environment)
    monkeypatch.setattr(gpu_check, "ready_backends", lambda device: {})
    monkeypatch.setattr(gpu_check, "copy_bandwidth", lambda device: 1000.0)

    def tests(files, out, cap_s):
        result = {"status": "passed", "seconds": 1.0, "passed": 3, "failed": 0, "errors": 0, "skipped": 0}
        totals = {"passed": 3 * len(files), "failed": 0, "errors": 0, "skipped": 0}
        return {"files": dict.fromkeys(files, result), "totals": totals, "status": "done"}

    def timings(cells, losses, device, reps, copy_gbps, seconds_left, save):
        for _, record in cells:
            record.update(status="ok", us=10.0, GBps=copy_gbps / 2, pct_copy=50.0)
        save()

    monkeypatch.setattr(gpu_check, "run_tests", tests)
    monkeypatch.setattr(gpu_check, "run_timings", timings)


def test_a_failing_part_is_recorded_and_the_others_still_run(monkeypatch, tmp_path):
    def broken_environment(device):
        raise RuntimeError("nvidia-smi hung")

    fake_gpu(monkeypatch, broken_environment)
    assert gpu_check.main(["--out", str(tmp_path), "--providers", "F.cross_entropy"]) == 1
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["gpu"] == "Fake GPU 80GB" and report["slug"] == "fake-gpu-80gb"
    assert report["env"]["status"] == "error: RuntimeError: nvidia-smi hung"
    assert report["tests"]["status"] == "done" and report["tests"]["totals"]["passed"] == 3 * len(
        report["tests"]["files"]
    )
    assert report["timings"]["status"] == "done: 12 ok" and report["timings"]["copy_GBps"] == 1000.0
    md = (tmp_path / "results.md").read_text()
    assert (
        md.startswith("# GPU check — Fake GPU 80GB\n")
        and "| 256 × 51 | float32 | F.cross_entropy | 10.0 |" in md
    )


def test_the_tests_part_gives_way_to_the_timings_on_a_short_budget(monkeypatch, tmp_path):
    fake_gpu(monkeypatch, lambda device: {"copy_GBps": 2000.0})
    assert gpu_check.main(["--out", str(tmp_path), "--budget", "100", "--providers", "F.cross_entropy"]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["tests"]["status"] == "skipped: time budget"
    assert {f["status"] for f in report["tests"]["files"].values()} == {"skipped: time budget"}
    assert report["timings"]["status"] == "done: 12 ok" and report["timings"]["copy_GBps"] == 2000.0


def test_measure_helpers_on_the_cpu():
    inputs = RotatingInputs(Case(64, 11, torch.float32, "fwd+bwd"), CPU, requires_grad=True)

    def step(x, t, up):
        return torch.autograd.grad(F.cross_entropy(x, t), x)

    assert measure.device_us(step, inputs, CPU, 3) > 0 and measure.wall_us(step, inputs, CPU, 3) > 0
    assert (
        measure.kernel_count(step, inputs, CPU) is None and measure.peak_memory_mb(step, inputs, CPU) is None
    )
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        measure.graph_us(step, inputs, CPU, 1)
    assert measure.copy_bandwidth_gbps(CPU, 2**20, reps=3) > 0


def test_rotating_inputs_keep_the_per_pixel_layout():
    case = Case(2, 5, torch.bfloat16, "fwd+bwd", (3, 4), channels_last=True)
    logits, target, up = RotatingInputs(case, CPU, requires_grad=True).next()
    assert logits.shape == (2, 5, 3, 4) and logits.is_contiguous(memory_format=torch.channels_last)
    assert target.shape == up.shape == (2, 3, 4) and target.max() < 4 and logits.requires_grad
    assert case.rows == 24 and case.bytes() == 2 * 2 * 5 * 12 * 2 + 8 * 24


def boom(x, t, reduction):
    raise RuntimeError("this provider is broken")


def test_timing_cells_record_numbers_errors_and_skips():
    cases = [Case(64, 11, torch.float32, "fwd+bwd"), Case(2, 5, torch.float32, "fwd+bwd", (3, 4), True)]
    names = [
        "F.cross_entropy",
        "drainage_fast[reference]",
        "drainage_fast[triton]",
        "liger-cross_entropy",
        "boom",
    ]
    cells = [
        (c, {"case": gpu_check.case_label(c), "dtype": "float32", "provider": p, "status": "pending"})
        for c in cases
        for p in names
    ]
    losses = {**gpu_check.all_providers(), "boom": boom}
    saves = []
    gpu_check.run_timings(cells, losses, CPU, gpu_check.QUICK, 10.0, lambda: 100.0, lambda: saves.append(1))
    by = {(gpu_check.case_label(c), r["provider"]): r for c, r in cells}
    for case in ("64 × 11", "2 × 5 × 3 × 4 channels_last"):
        ok = by[(case, "F.cross_entropy")]
        assert ok["status"] == "ok" and ok["us"] > 0 and ok["GBps"] > 0 and ok["pct_copy"] > 0
        assert ok["kernels"] is None and "CUDA graphs need a CUDA device" in ok["graph_error"]
        assert by[(case, "drainage_fast[reference]")]["status"] == "ok"
        # on the CPU only in its interpreter (a test tool), or not at all: never timed there
        assert by[(case, "drainage_fast[triton]")]["status"].startswith("skipped: ")
        assert by[(case, "boom")]["status"] == "error: RuntimeError: this provider is broken"
    assert by[("64 × 11", "liger-cross_entropy")]["status"] == "skipped: Liger's kernels need CUDA"
    assert len(saves) == 2

    report = {
        "dry_run": False,
        "quick": True,
        "gpu": "CPU",
        "slug": "cpu",
        "command": "gpu_check",
        "started": "now",
        "elapsed_s": 1.0,
        "plan": {"budget_s": 450},
        "env": {"status": "done", "values": {"device": "CPU"}},
        "tests": {
            "status": "done",
            "files": {
                "tests/test_x.py": {
                    "status": "failed",
                    "passed": 1,
                    "failed": 1,
                    "errors": 0,
                    "skipped": 0,
                    "seconds": 1.0,
                    "failures": [{"test": "tests.test_x::test_y", "kind": "failure", "message": "a | b"}],
                }
            },
        },
        "timings": {"status": "done", "copy_GBps": 10.0, "cells": [r for _, r in cells]},
    }
    md = gpu_markdown.markdown(report)
    assert "# GPU check — CPU" in md and "| tests/test_x.py | failed | 1 | 1 |" in md
    assert "`tests.test_x::test_y` (failure): a \\| b" in md
    assert f"| 64 × 11 | float32 | F.cross_entropy | {by[('64 × 11', 'F.cross_entropy')]['us']:.1f} |" in md


def test_cells_past_the_budget_are_skipped_not_run():
    case = Case(64, 11, torch.float32, "fwd+bwd")
    cells = [
        (case, {"case": "64 × 11", "dtype": "float32", "provider": p, "status": "pending"})
        for p in ("F.cross_entropy", "reference-compiled")
    ]
    gpu_check.run_timings(
        cells, gpu_check.all_providers(), CPU, gpu_check.QUICK, 10.0, lambda: 1.0, lambda: None
    )
    assert [r["status"] for _, r in cells] == ["skipped: time budget"] * 2


def test_time_cap_interrupts_a_cell():
    t0 = time.monotonic()
    with pytest.raises(gpu_check.CellTimeout), gpu_check.time_cap(0.2):
        while True:
            time.sleep(0.01)
    assert time.monotonic() - t0 < 2


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="5">
<testcase classname="tests.test_a" name="test_ok" time="0.1" />
<testcase classname="tests.test_a" name="test_bad[x]" time="0.1">
  <failure message="assert 1 == 2">tb</failure></testcase>
<testcase classname="tests.test_a" name="test_setup" time="0">
  <error message="fixture broke">tb</error></testcase>
<testcase classname="tests.test_a" name="test_skip" time="0"><skipped message="needs a GPU" /></testcase>
<testcase time="0.000" /></testsuite></testsuites>"""


def test_junit_parser_counts_and_names_failures(tmp_path):
    (tmp_path / "r.xml").write_text(JUNIT)
    r = pytest_run.parse_junit(tmp_path / "r.xml")
    assert (r["passed"], r["failed"], r["errors"], r["skipped"]) == (1, 1, 1, 1)
    assert r["failures"] == [
        {"test": "tests.test_a::test_bad[x]", "kind": "failure", "message": "assert 1 == 2"},
        {"test": "tests.test_a::test_setup", "kind": "error", "message": "fixture broke"},
    ]


def test_pytest_runner_keeps_what_ran_before_the_deadline(tmp_path):
    (tmp_path / "test_done.py").write_text(
        "def test_a():\n    pass\n\ndef test_b():\n    assert 0, 'b is wrong'\n"
    )
    (tmp_path / "test_hangs.py").write_text(
        "import time\n\ndef test_a():\n    pass\n\ndef test_b():\n    time.sleep(60)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    results = pytest_run.run_files(["test_done.py", "test_hangs.py"], tmp_path / "logs", 4, tmp_path, env)
    done, hangs = results["test_done.py"], results["test_hangs.py"]
    assert done["status"] == "failed" and (done["passed"], done["failed"]) == (1, 1)
    assert (
        done["failures"][0]["test"] == "test_done::test_b" and "b is wrong" in done["failures"][0]["message"]
    )
    assert hangs["status"] == "interrupted: time budget" and hangs["passed"] == 1 and hangs["seconds"] < 30
    assert (tmp_path / "logs" / "test_hangs.log").read_text()
