"""The benchmark suite stays runnable, and its baselines compute the same loss as the oracle."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from naive_loss import naive_drainage_loss  # noqa: E402
from support import random_targets  # noqa: E402

from drainage_fast import drainage_loss_reference  # noqa: E402


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_naive_baseline_equals_oracle(reduction):
    x = torch.randn(40, 11, dtype=torch.float64, requires_grad=True)
    t = random_targets(40, 11, -1, device="cpu")
    naive = naive_drainage_loss(x, t, alpha=0.1, reduction=reduction)
    ref = drainage_loss_reference(x, t, alpha=0.1, reduction=reduction)
    # the naive loss runs in fp32 (as users' code does under .float()): one fp32 rounding budget
    torch.testing.assert_close(naive.double(), ref, rtol=1e-5, atol=1e-6)


def test_bench_and_report_run_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(ROOT / "benchmarks/bench_loss.py"),
            "--suite",
            "cpu",
            "-k",
            "fwd+bwd-float32-N512-K51 and (naive or reference])",
            f"--benchmark-json={out}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    benches = json.loads(out.read_text())["benchmarks"]
    assert {b["extra_info"]["provider"] for b in benches} == {"naive", "drainage_fast[reference]"}
    assert all(b["extra_info"]["bytes"] == 2 * 512 * 51 * 4 + 8 * 512 for b in benches)
    report = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/report.py"), str(out), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    md = next(tmp_path.glob("*.md")).read_text()
    assert "| 512 × 51 | drainage_fast[reference] |" in md and "× vs naive" in md
    assert next(tmp_path.glob("*.png")).stat().st_size > 10_000
