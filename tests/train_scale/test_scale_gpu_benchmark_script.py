"""benchmarks/gpu_resnet50_step.py runs end to end (on the CPU here, tiny settings) and writes its report;
on a machine without DALI it records the DALI measurement as skipped instead of failing."""

from __future__ import annotations

import json
import subprocess
import sys

from scale_support import REPO


def test_gpu_step_script_writes_json_and_markdown(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_resnet50_step.py", "--allow-cpu", "--batch", "2", "--size", "32", "--steps", "1",
         "--warmup", "1", "--images", "6", "--workers", "0", "--no-compile", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_resnet50_step.json").read_text())
    results = report["results"]
    assert results["synthetic_eager"]["images_per_s"] > 0 and results["torch_loader"]["images_per_s"] > 0
    assert results["synthetic_compile"] == {"skipped": "--no-compile"} and "skipped" in results["dali_mixed"]
    assert "| synthetic_eager |" in (tmp_path / "gpu_resnet50_step.md").read_text()


def test_gpu_step_script_refuses_to_measure_without_a_gpu(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_resnet50_step.py", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr and not list(tmp_path.iterdir())
