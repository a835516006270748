"""benchmarks/gpu_resnet50_step.py runs end to end with tiny settings (on the CPU, or on one GPU in a few
seconds) and writes its report; on a machine without DALI it records the DALI measurement as skipped
instead of failing. --short compares the fused Drainage loss with cross-entropy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.scale.support import REPO

TINY = ["--allow-cpu", "--batch", "2", "--size", "32", "--steps", "1", "--warmup", "1", "--workers", "0"]


def run_script(args, timeout=300, **env):
    command = [sys.executable, "benchmarks/gpu_resnet50_step.py", *args]
    return subprocess.run(
        command,
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_gpu_step_script_writes_json_and_markdown(tmp_path):
    proc = run_script([*TINY, "--images", "6", "--no-compile", "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_resnet50_step.json").read_text())
    results = report["results"]
    assert results["synthetic_eager"]["images_per_s"] > 0 and results["torch_loader"]["images_per_s"] > 0
    assert results["synthetic_compile"] == {"skipped": "--no-compile"} and "skipped" in results["dali_mixed"]
    assert "| synthetic_eager |" in (tmp_path / "gpu_resnet50_step.md").read_text()


def test_short_mode_compares_the_losses(tmp_path):
    proc = run_script([*TINY, "--short", "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_resnet50_short.json").read_text())["results"]
    assert set(results) == {"drainage", "ce"}
    for r in results.values():
        assert r["images_per_s"] > 0 and r["loss_us"] > 0 and 0 < r["loss_share"] < 1, r
    md = (tmp_path / "gpu_resnet50_short.md").read_text()
    assert "| drainage |" in md and "| ce |" in md and "K = 51" in md


def test_gpu_step_script_refuses_to_measure_without_a_gpu(tmp_path):
    # the GPU is hidden, so that a GPU machine checks the refusal too instead of running the benchmark
    proc = run_script(["--out", str(tmp_path)], timeout=120, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr and not list(tmp_path.iterdir())
