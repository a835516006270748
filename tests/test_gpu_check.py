"""benchmarks/gpu_check.py without a GPU: the dry-run plan through both entry points, and on CPU tensors
the pieces a GPU run goes through (timing cells, their errors and time budget, the pytest runner and its
junit parser, the sanitizer runner with a stand-in compute-sanitizer and its report parser, the
sanitizer cases in Triton's interpreter, the fused linear cells on a tiny shape, the markdown). No number
measured here is a GPU number; none is written to the repo."""

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
import linear_case
import measure
import pytest_run
import sanitize
import sanitize_cases
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
    assert report["dry_run"] and plan["parts"] == ["env", "tests", "sanitize", "timings", "linear"]
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
    assert {r["status"] for r in report["sanitize"]["runs"]} == {"dry-run"}
    for section in ("## Environment", "## Correctness", "## Sanitizers", "## Timings", "## Fused linear"):
        assert section in md
    linear = plan["linear"]
    assert linear["shape"] == {"N": 8192, "H": 4096, "V": 128257} and linear["dtype"] == "bfloat16"
    assert (
        linear["flop_per_step"] == 6 * 8192 * 4096 * 128257 and linear["reference"] == linear_case.REFERENCE
    )
    assert plan["caps_s"]["linear_reserve"] == gpu_check.LINEAR_RESERVE_S
    assert [c["provider"] for c in report["linear"]["cells"]] == [
        "materialised + fused loss",
        "fused linear",
        "materialised + F.cross_entropy",
        "liger fused linear CE",
    ]
    assert report["linear"]["status"] == "dry-run" and {c["status"] for c in report["linear"]["cells"]} == {
        "dry-run"
    }
    assert "| fused linear | – | – | – | – | – | – | dry-run |" in md
    assert "27.6 GB" in md and "1,164 MB / 134.8 ms" in md  # the published figures, quoted
    assert "| 8 × 19 × 512 × 1024 channels_last | bfloat16 | drainage_fast[triton,recompute] |" in md
    assert not list(tmp_path.glob("*.tmp"))


def test_dry_run_as_a_script_with_some_parts(tmp_path):
    report, md = run_check(
        ["benchmarks/gpu_check.py", "--parts", "env,timings", "--quick", "--providers", "F.cross_entropy"],
        tmp_path,
    )
    assert report["quick"] and report["plan"]["reps"] == {"warmup": 1, "events": 5, "wall": 3, "graph": 2}
    assert report["tests"]["status"] == report["linear"]["status"] == "not selected (--parts)"
    assert {c["provider"] for c in report["timings"]["cells"]} == {"F.cross_entropy"}
    assert "fewer repeats" in md


def test_dry_run_of_the_linear_part_alone(tmp_path):
    assert gpu_check.main(["--parts", "linear", "--dry-run", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    md = (tmp_path / "results.md").read_text()
    assert report["plan"]["parts"] == ["linear"] and report["linear"]["status"] == "dry-run"
    assert report["timings"]["status"] == "not selected (--parts)"
    assert "## Fused linear losses: 8,192 tokens × H = 4,096 × V = 128,257, bfloat16" in md


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


def fake_gpu(monkeypatch, environment, tool=None):
    """main() as on a GPU machine, with every part replaced: only the orchestration runs. The sanitizer
    part runs `tool` (a stand-in compute-sanitizer) when given, else finds none."""
    monkeypatch.setattr(sanitize, "find_tool", lambda: tool)
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

    def linear(records, losses, shape, dtype, device, reps, seconds_left, *rest):
        for record in records:
            record.update(status="ok", ms=40.0, TFLOPs=640.0, peak_MB=2048.0)

    monkeypatch.setattr(gpu_check, "run_tests", tests)
    monkeypatch.setattr(gpu_check, "run_timings", timings)
    monkeypatch.setattr(gpu_check, "run_linear", linear)


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
    assert report["linear"]["status"] == "done: 4 ok"
    md = (tmp_path / "results.md").read_text()
    assert (
        md.startswith("# GPU check — Fake GPU 80GB\n")
        and "| 256 × 51 | float32 | F.cross_entropy | 10.0 |" in md
    )
    assert "| fused linear | 40.0 | 640 | 2.00 | – | – | – |  |" in md


def test_the_tests_part_gives_way_to_the_timings_on_a_short_budget(monkeypatch, tmp_path):
    fake_gpu(monkeypatch, lambda device: {"copy_GBps": 2000.0})
    assert gpu_check.main(["--out", str(tmp_path), "--budget", "100", "--providers", "F.cross_entropy"]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["tests"]["status"] == "skipped: time budget"
    assert {f["status"] for f in report["tests"]["files"].values()} == {"skipped: time budget"}
    assert report["timings"]["status"] == "done: 12 ok" and report["timings"]["copy_GBps"] == 2000.0


@pytest.mark.parametrize(
    "budget, tests_cap, sanitize_cap",
    [
        (450, 450 - 60 - 150 - 40, gpu_check.SANITIZE_CAP_S),  # the default: the sanitizers' cap in full
        # the tests leave the sanitizers' 60 s, the timings' 150 s and linear's 40 s; the sanitizers
        # the timings' and linear's
        (290, 290 - 60 - 150 - 40, 290 - 150 - 40),
        (240, None, 240 - 150 - 40),  # under TESTS_MIN_S left: no tests
    ],
)
def test_each_part_leaves_the_later_parts_their_reserve(
    monkeypatch, tmp_path, budget, tests_cap, sanitize_cap
):
    fake_gpu(monkeypatch, lambda device: {"copy_GBps": 2000.0})
    caps = {}

    def timings(cells, losses, device, reps, copy_gbps, seconds_left, save):
        caps["timings"] = seconds_left()

    def linear(records, losses, shape, dtype, device, reps, seconds_left, *rest):
        caps["linear"] = seconds_left()

    def tests(files, out, cap_s):  # takes no time: the caps below are the budget's arithmetic alone
        caps["tests"] = cap_s
        return {"files": {}, "totals": {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}}

    def sanitizers(part, cannot_run, env, log_dir, cap_s, save):
        caps["sanitize"] = cap_s
        return {"status": "done"}

    monkeypatch.setattr(gpu_check, "run_tests", tests)
    monkeypatch.setattr(sanitize, "run_all", sanitizers)
    monkeypatch.setattr(gpu_check, "run_timings", timings)
    monkeypatch.setattr(gpu_check, "run_linear", linear)
    assert (
        gpu_check.main(["--out", str(tmp_path), "--budget", str(budget), "--providers", "F.cross_entropy"])
        == 0
    )
    assert caps.get("tests") == (None if tests_cap is None else pytest.approx(tests_cap, abs=3))
    assert caps["sanitize"] == pytest.approx(sanitize_cap, abs=3)
    # the timings stop linear's reserve before the deadline; linear has that reserve (the parts take no time)
    assert caps["timings"] == pytest.approx(budget - gpu_check.LINEAR_RESERVE_S, abs=3)
    assert caps["linear"] == pytest.approx(min(gpu_check.LINEAR_CAP_S, budget), abs=3)


def test_without_the_linear_part_the_timings_keep_its_reserve(monkeypatch, tmp_path):
    fake_gpu(monkeypatch, lambda device: {})
    left = {}

    def timings(cells, losses, device, reps, copy_gbps, seconds_left, save):
        left["timings"] = seconds_left()

    monkeypatch.setattr(gpu_check, "run_timings", timings)
    assert gpu_check.main(["--out", str(tmp_path), "--budget", "100", "--parts", "timings"]) == 0
    assert left["timings"] == pytest.approx(100, abs=3)


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
        "plan": {"budget_s": 450, "caps_s": {"sanitize": 120}, "sanitize": sanitize.plan("/cuda/bin/cs")},
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
        "sanitize": {"status": "done", "tool": "/cuda/bin/cs", "runs": sanitizer_runs()},
        "timings": {"status": "done", "copy_GBps": 10.0, "cells": [r for _, r in cells]},
    }
    md = gpu_markdown.markdown(report)
    assert "| tool | triton | cuda |" in md and "Tool: `/cuda/bin/cs`" in md
    assert "| memcheck | errors: 1 (3.5 s) | ok (2.0 s) |" in md
    assert "| racecheck | ok, 2 warnings (4.0 s) | skipped: time budget |" in md
    assert "memcheck × triton (errors: 1; log: sanitize/memcheck-triton.log):" in md
    assert "    Invalid __global__ read of size 4 bytes" in md
    assert "    /cuda/bin/cs --tool racecheck --error-exitcode 99" in md
    assert "# GPU check — CPU" in md and "| tests/test_x.py | failed | 1 | 1 |" in md
    assert "`tests.test_x::test_y` (failure): a \\| b" in md
    assert f"| 64 × 11 | float32 | F.cross_entropy | {by[('64 × 11', 'F.cross_entropy')]['us']:.1f} |" in md


# -- the linear part ---------------------------------------------------------------------------------

TINY = (64, 16, 33)  # N, H, V: 32 classes + [IDK]; rows 0, 17, 34, 51 ignored


def no_save():
    pass


def linear_records(*providers):
    return [{"provider": p, "status": "pending"} for p in providers]


def test_linear_cells_on_a_tiny_shape_on_the_cpu():
    records = linear_records(*linear_case.PROVIDERS, "boom")
    losses = {**linear_case.loss_functions("reference"), "boom": boom}
    saves = []
    gpu_check.run_linear(
        records,
        losses,
        TINY,
        torch.float32,
        CPU,
        gpu_check.QUICK,
        lambda: 100.0,
        lambda: saves.append(1),
        60,
        5,
    )
    by = {r["provider"]: r for r in records}
    for name in (linear_case.REFERENCE, linear_case.COMPARED, "materialised + F.cross_entropy"):
        cell = by[name]
        assert cell["status"] == "ok" and cell["ms"] > 0 and cell["TFLOPs"] > 0 and cell["peak_MB"] is None
    # the same loss and gradients, in fp32 to rounding
    assert set(by[linear_case.COMPARED]["vs_reference"]) == {"loss", "grad_hidden", "grad_weight"}
    assert max(by[linear_case.COMPARED]["vs_reference"].values()) < 1e-5
    assert by[linear_case.LIGER]["status"].startswith("skipped: ")  # not installed, or no CUDA
    assert by["boom"]["status"] == "error: RuntimeError: this provider is broken"
    assert len(saves) == 4  # after each cell that ran

    md = "\n".join(gpu_markdown._linear({"status": "done", "cells": records}, linear_case.plan()))
    ms = by[linear_case.COMPARED]["ms"]
    assert f"| fused linear | {ms:.1f} |" in md and "| boom | – |" in md and "Published, not measured" in md


def test_linear_cells_see_a_wrong_loss_or_gradient():
    """The comparison is against the materialised loss's own figures: a 1% steeper loss shows as 1e-2."""
    losses = linear_case.loss_functions("reference")
    right = losses[linear_case.COMPARED]
    losses[linear_case.COMPARED] = lambda h, w, t: 1.01 * right(h, w, t)
    records = linear_records(linear_case.REFERENCE, linear_case.COMPARED)
    gpu_check.run_linear(
        records, losses, TINY, torch.float32, CPU, gpu_check.QUICK, lambda: 100.0, no_save, 60, 5
    )
    for value in records[1]["vs_reference"].values():
        assert value == pytest.approx(0.01, rel=1e-3)


def test_linear_cells_past_the_budget_or_without_inputs():
    losses = linear_case.loss_functions("reference")
    late = linear_records(linear_case.REFERENCE, linear_case.COMPARED)
    gpu_check.run_linear(late, losses, TINY, torch.float32, CPU, gpu_check.QUICK, lambda: 1.0, no_save, 60, 5)
    assert [r["status"] for r in late] == ["skipped: time budget"] * 2
    no_inputs = linear_records(linear_case.REFERENCE)
    # integer hidden states cannot be drawn: every cell says why
    gpu_check.run_linear(
        no_inputs, losses, TINY, torch.int64, CPU, gpu_check.QUICK, lambda: 100.0, no_save, 60, 5
    )
    assert no_inputs[0]["status"].startswith("error: inputs: ")
    # the reference cell failing leaves the compared cell its figures, and says why it has no differences
    broken = {**losses, linear_case.REFERENCE: boom}
    alone = linear_records(linear_case.REFERENCE, linear_case.COMPARED)
    gpu_check.run_linear(
        alone, broken, TINY, torch.float32, CPU, gpu_check.QUICK, lambda: 100.0, no_save, 60, 5
    )
    assert alone[0]["status"].startswith("error: ") and alone[1]["status"] == "ok"
    assert alone[1]["vs_reference_error"].startswith("no reference")


def test_linear_inputs_and_differences():
    hidden, weight, target = linear_case.make_inputs(*TINY, torch.bfloat16, CPU)
    assert (
        hidden.shape == (64, 16)
        and weight.shape == (33, 16)
        and hidden.dtype == weight.dtype == torch.bfloat16
    )
    assert hidden.requires_grad and weight.requires_grad
    assert (target[::17] == -100).all() and target[1:17].min() >= 0 and target.max() < 32  # never [IDK]
    inputs = linear_case.FreshGrads(hidden, weight, target)
    hidden.grad = torch.ones_like(hidden)
    assert inputs.next()[0] is hidden and hidden.grad is None and weight.grad is None
    assert linear_case.relative_difference(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0])) == 0.5
    a, b = torch.arange(10.0), torch.arange(10.0)
    b[7] += 0.9  # in the last of 4 chunks of 3
    assert linear_case.relative_difference(a, b, chunk=3) == pytest.approx(0.9 / 9.0)


def sanitizer_runs():
    excerpt = ["Invalid __global__ read of size 4 bytes"]
    return [
        {
            "tool": "memcheck",
            "backend": "triton",
            "status": "errors: 1",
            "seconds": 3.5,
            "excerpt": excerpt,
            "log": "memcheck-triton.log",
        },
        {"tool": "memcheck", "backend": "cuda", "status": "ok", "seconds": 2.0, "excerpt": []},
        {"tool": "racecheck", "backend": "triton", "status": "ok", "seconds": 4.0, "warnings": 2},
        {"tool": "racecheck", "backend": "cuda", "status": "skipped: time budget"},
        {"tool": "synccheck", "backend": "triton", "status": "skipped: time budget"},
        {"tool": "synccheck", "backend": "cuda", "status": "skipped: time budget"},
    ]


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
    with pytest.raises(measure.CellTimeout), measure.time_cap(0.2):
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


# -- the sanitizer part ------------------------------------------------------------------------------

# compute-sanitizer's own output, as it prints it (every line of its own starts with =========)
MEMCHECK_CLEAN = f"""========= COMPUTE-SANITIZER
ok      300 × 11 fp32 none  812 ms
{sanitize_cases.DONE} (25 cases, backend triton, cuda)
========= ERROR SUMMARY: 0 errors
"""
MEMCHECK_ERROR = """========= COMPUTE-SANITIZER
========= Invalid __global__ read of size 4 bytes
=========     at _drainage_fwd_kernel+0x1d30 in /repo/drainage_fast/backends/triton_kernels.py:181
=========     by thread (31,0,0) in block (2,0,0)
=========     Address 0x7f0e5a000b2c is out of bounds
=========     and is 4 bytes after the nearest allocation at 0x7f0e5a000000 of size 2860 bytes
=========     Saved host backtrace up to driver entry point at kernel launch time
=========         Host Frame: [0x2f3b7b] in libcuda.so.1
=========
FAILED  300 × 11 fp32 none: RuntimeError: CUDA error: unspecified launch failure
sanitize_cases: 1 of 25 cases failed
========= ERROR SUMMARY: 1 error
"""
RACECHECK_ERROR = """========= COMPUTE-SANITIZER
========= Error: Race reported between Write access at drainage_fwd_kernel+0x4a0 in drainage_cuda.cu:251
=========     and Read access at drainage_fwd_kernel+0x5c0 in drainage_cuda.cu:262 [128 hazards]
=========
sanitize_cases: every case passed (25 cases, backend cuda, cuda)
========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)
"""


@pytest.mark.parametrize(
    "text, status, errors, first",
    [
        (MEMCHECK_CLEAN, "ok", 0, None),
        (MEMCHECK_ERROR, "errors: 1", 1, "Invalid __global__ read of size 4 bytes"),
        (RACECHECK_ERROR, "errors: 1", 1, "Error: Race reported between Write access at drainage_fwd_kernel"),
        (
            RACECHECK_ERROR.replace("1 hazard displayed (1 error, 0", "2 hazards displayed (0 errors, 2"),
            "ok",
            0,
            None,
        ),
        # a case failed with no tool finding: the script's own output says which
        (
            MEMCHECK_CLEAN.replace(sanitize_cases.DONE, "FAILED  9 × 1001 fp32 none: AssertionError"),
            "failed",
            0,
            "FAILED",
        ),
        (
            "========= COMPUTE-SANITIZER\n========= Error: Device not supported\n",
            "failed",
            None,
            "========= Error",
        ),
    ],
)
def test_sanitizer_reports_are_read_into_a_status(text, status, errors, first):
    record = sanitize.verdict(text)
    assert record["status"].startswith(status) and record["errors"] == errors
    if first is None:
        assert record["excerpt"] == []
    else:
        assert any(line.startswith(first) for line in record["excerpt"][:3]), record["excerpt"]
    assert record["warnings"] == (2 if "2 warnings" in text else 0)


def stand_in_tool(folder: Path, report: str, exit_code: int = 0, sleep: int = 0) -> str:
    """An executable compute-sanitizer that prints its arguments, the variables the real runs set,
    and `report`; then exits with exit_code (after `sleep` seconds)."""
    folder.mkdir(parents=True, exist_ok=True)
    tool = folder / "compute-sanitizer"
    tool.write_text(
        "#!/bin/sh\n"
        f"sleep {sleep}\n"
        'echo "args: $*"\n'
        'echo "caching: ${PYTORCH_NO_CUDA_MEMORY_CACHING:-on} interpret: ${TRITON_INTERPRET:-unset}"\n'
        f"cat <<'EOF'\n{report}EOF\n"
        f"exit {exit_code}\n"
    )
    tool.chmod(0o755)
    return str(tool)


def test_the_tool_is_found_on_the_path_or_under_a_cuda_root(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sanitize.find_tool(path=str(empty), roots=[tmp_path / "cuda", None]) is None
    in_root = stand_in_tool(tmp_path / "cuda" / "bin", MEMCHECK_CLEAN)
    assert sanitize.find_tool(path=str(empty), roots=[None, tmp_path / "cuda"]) == in_root
    on_path = stand_in_tool(tmp_path / "bin", MEMCHECK_CLEAN)
    assert (
        sanitize.find_tool(path=f"{empty}{os.pathsep}{tmp_path / 'bin'}", roots=[tmp_path / "cuda"])
        == on_path
    )


def sanitizer_part(tool):
    plan = sanitize.plan(tool)
    return {"status": "pending", "tool": tool, "runs": [{**r, "status": "pending"} for r in plan["runs"]]}


def test_without_the_tool_every_run_says_why(tmp_path):
    part = sanitizer_part(None)
    result = sanitize.run_all(part, {}, dict(os.environ), tmp_path, 100.0, lambda: None)
    assert result["status"].startswith("skipped: compute-sanitizer not found")
    assert {r["status"] for r in part["runs"]} == {result["status"]}


def test_the_runs_share_the_cap_in_order_and_skip_what_cannot_run(tmp_path):
    part = sanitizer_part(stand_in_tool(tmp_path / "bin", MEMCHECK_CLEAN))
    saves = []
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    # 20 s: the first run may not take the 15 s that each later memcheck / racecheck run keeps, but
    # it still starts; each stand-in run takes milliseconds, so every later one starts as well
    result = sanitize.run_all(
        part, {"cuda": "no nvcc"}, env, tmp_path / "logs", 20.0, lambda: saves.append(1)
    )
    by = {(r["tool"], r["backend"]): r for r in part["runs"]}
    assert result["status"] == "done: 3 ok, 3 skipped"
    for tool in sanitize.TOOLS:
        assert by[(tool, "triton")]["status"] == "ok" and by[(tool, "triton")]["seconds"] < 10
        assert by[(tool, "cuda")]["status"] == "skipped: backend unavailable: no nvcc"
    log = (tmp_path / "logs" / "memcheck-triton.log").read_text()
    assert "--tool memcheck --error-exitcode 99" in log and "sanitize_cases.py --backend triton" in log
    # the caller's environment, with the caching allocator off for memcheck alone
    assert "caching: 1 interpret: 1" in log
    assert "caching: on interpret: 1" in (tmp_path / "logs" / "racecheck-triton.log").read_text()
    assert len(saves) == 6  # running, then done: each run
    short = sanitizer_part(part["tool"])
    assert sanitize.run_all(short, {}, env, tmp_path / "logs", 10.0, lambda: None)["status"] == (
        "done: 6 skipped"
    )
    assert {r["status"] for r in short["runs"]} == {"skipped: time budget"}


def test_a_run_over_its_cap_is_stopped(tmp_path):
    tool = stand_in_tool(tmp_path / "bin", MEMCHECK_CLEAN, sleep=60)
    t0 = time.monotonic()
    record = sanitize.run_one(tool, "memcheck", "triton", dict(os.environ), tmp_path / "m.log", 1.0)
    assert record["status"] == "timeout: over its 1 s cap" and time.monotonic() - t0 < 10
    assert record["exit_code"] < 0  # killed, with the sleep it was waiting on


def test_the_sanitize_part_alone_on_a_fake_gpu(monkeypatch, tmp_path):
    found = stand_in_tool(tmp_path / "bin", MEMCHECK_ERROR, exit_code=sanitize.ERROR_EXITCODE)
    fake_gpu(monkeypatch, lambda device: {}, tool=found)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # as under pytest here: the runs must not inherit it
    out = tmp_path / "out"
    assert gpu_check.main(["--out", str(out), "--parts", "sanitize"]) == 1  # the tool found errors
    report = json.loads((out / "results.json").read_text())
    assert report["plan"]["parts"] == ["sanitize"] and report["sanitize"]["tool"] == found
    assert report["tests"]["status"] == report["timings"]["status"] == "not selected (--parts)"
    assert report["sanitize"]["status"] == "done: 6 errors"
    first = report["sanitize"]["runs"][0]
    assert first["excerpt"][0] == "Invalid __global__ read of size 4 bytes" and first["exit_code"] == 99
    log = (out / "sanitize" / "memcheck-triton.log").read_text()
    assert "caching: 1 interpret: unset" in log
    md = (out / "results.md").read_text()
    assert "| memcheck | errors: 1 (" in md and "    Invalid __global__ read of size 4 bytes" in md


def test_dry_run_of_the_sanitize_part_alone(tmp_path):
    report, md = run_check(["benchmarks/gpu_check.py", "--parts", "sanitize"], tmp_path)
    plan = report["plan"]
    assert plan["parts"] == ["sanitize"] and plan["caps_s"]["sanitize"] == gpu_check.SANITIZE_CAP_S
    runs = plan["sanitize"]["runs"]
    assert [(r["tool"], r["backend"]) for r in runs] == [
        (t, b) for t in ("memcheck", "racecheck", "synccheck") for b in ("triton", "cuda")
    ]
    for run in runs:
        assert f"--tool {run['tool']} --error-exitcode 99" in run["command"]
        assert run["command"].endswith(f"benchmarks/sanitize_cases.py --backend {run['backend']}")
        assert run["command"].startswith("PYTORCH_NO_CUDA_MEMORY_CACHING=1 ") == (run["tool"] == "memcheck")
    cases = plan["sanitize"]["cases"]
    assert cases == [c.name for c in sanitize_cases.cases()]
    for K in (11, 101, 1001, 5000, 40001):
        assert any(f" × {K} fp32" in c for c in cases) and any(f" × {K} bf16" in c for c in cases)
    for feature in ("NCHW", "channels_last", "some ignored", "all ignored", "no grad", "upstream 0.5"):
        assert any(feature in c for c in cases), feature
    assert report["tests"]["status"] == "not selected (--parts)"
    assert [r["status"] for r in report["sanitize"]["runs"]] == ["dry-run"] * 6
    assert "## Sanitizers" in md and "| memcheck | dry-run | dry-run |" in md
    assert "--tool synccheck --error-exitcode 99" in md and "3 × 40001 bf16 none" in md


def run_cases(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "benchmarks/sanitize_cases.py", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_sanitizer_cases_run_in_the_interpreter():
    pytest.importorskip("triton")
    proc = run_cases("--backend", "triton", "--smoke")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[-1].startswith(sanitize_cases.DONE) and "backend triton, cpu" in lines[-1]
    assert sum(line.startswith("ok ") for line in lines) == len(sanitize_cases.cases())
    refused = run_cases("--backend", "cuda", "--device", "cpu")
    assert refused.returncode == 2 and "backend cuda cannot run on cpu" in refused.stderr


def test_sanitizer_cases_fail_on_a_wrong_loss_or_gradient(monkeypatch):
    case = sanitize_cases.Case((5, 11), torch.float32, "mean", 2.0)
    gen = torch.Generator().manual_seed(0)
    sanitize_cases.run_case(case, "reference", CPU, gen)  # the oracle against itself
    loss = sanitize_cases.fused_drainage_loss

    monkeypatch.setattr(sanitize_cases, "fused_drainage_loss", lambda *a, **k: loss(*a, **k) * 1.01)
    with pytest.raises(AssertionError):
        sanitize_cases.run_case(case, "reference", CPU, gen)

    def steeper(*args, **kwargs):  # the same loss, 1.5 times its gradient
        value = loss(*args, **kwargs)
        return value.detach() + 1.5 * (value - value.detach())

    monkeypatch.setattr(sanitize_cases, "fused_drainage_loss", steeper)
    with pytest.raises(AssertionError, match="gradient off the oracle"):
        sanitize_cases.run_case(case, "reference", CPU, gen)


def test_sanitizer_cases_reach_every_triton_forward_layout():
    tl = pytest.importorskip("drainage_fast.backends.triton_launch")
    configs = {tl._forward_config(c.shape[1], c.dtype) for c in sanitize_cases.cases()}
    assert {c.layout for c in configs} == {tl.COLUMNS, tl.TILE, tl.STREAM}
    tiles = {(c.block_rows, c.num_warps) for c in configs if c.layout == tl.TILE}
    assert {(8, 1), (1, 1), (1, 4)} <= tiles  # several rows a warp, a row a warp, a row on 4 warps
