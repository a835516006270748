"""Compile every GPU kernel variant ahead of time, without a GPU, and read its registers and spills.

Triton's interpreter (TRITON_INTERPRET=1, what the CPU test suite runs) never runs Triton's
compiler, so code it accepts can still fail to compile for a GPU. This module compiles what a GPU
would compile:

  * Triton: the launchers of drainage_fast/backends/triton_launch.py are called on CPU tensors with
    a stand-in driver that only names the target (sm_90 or sm_80); Triton's own JIT path then
    specializes and compiles each launch exactly as on that GPU (warmup: nothing runs). The (N, K)
    shapes cover the GPU shapes of the benchmarks plus one K for every distinct config the
    launchers' config functions can return, so a new config cannot escape.
  * CUDA C++: nvcc compiles csrc/cuda/drainage_cuda.cu with ptxas -v.

Registers and stack bytes (spills) are read from each cubin with the cuobjdump Triton ships, and
from ptxas's report for CUDA C++.

    python tests/kernel_resources.py [rows.json]   # the register table, sm_90 and sm_80 (markdown)

tests/test_kernel_resources.py fails on any compile error and any spill.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (90, 80)
# The GPU shapes of the benchmarks and the readiness check, and the boundaries of the launchers'
# configs (2: J empty; 32769: one past a power of two; 262147: many loop tiles).
K_VALUES = (2, 11, 19, 51, 101, 1001, 4097, 32001, 32769, 128256, 262147)
DTYPES = ("bfloat16", "float16", "float32", "float64")


# --- Triton -------------------------------------------------------------------------------------


def _config_ks(launch) -> list[int]:
    """One K per distinct (forward or backward) config of the launchers, for K up to 2^19."""
    import torch

    seen, ks = set(), []
    candidates = sorted({k for p in range(1, 20) for k in (2**p - 1, 2**p, 2**p + 1) if k >= 2})
    for dtype in (torch.float32, torch.float64):
        for K in candidates:
            key = (launch._forward_config(K, dtype), launch._backward_config(K, dtype))
            if key not in seen:
                seen.add(key)
                ks.append(K)
    return ks


def _triton_variants(launch):
    """(label, issue) pairs: issue() calls a launcher, which launches one or more kernels."""
    import torch

    from drainage_fast._inputs import Hyper

    hp = Hyper(-2.3, 2.3, 1, -100)
    variants = []
    for dtype_name in DTYPES:
        dtype = getattr(torch, dtype_name)
        stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        # The configs depend on K and on whether the dtype is fp64, not on fp16 against bf16.
        extra = set() if dtype_name == "float16" else set(_config_ks(launch))
        for K in sorted(set(K_VALUES) | extra):
            x3 = torch.zeros(2, 1, K, dtype=dtype)
            t = torch.zeros(2, dtype=torch.int64)
            stats = torch.zeros(4, 2, dtype=stats_dtype)
            one = torch.ones(1, dtype=stats_dtype)
            modes = {
                "forward rows": lambda x3=x3, t=t: launch.forward(x3, t, hp),
                "sum+grad": lambda x3=x3, t=t: launch.forward_reduced(x3, t, hp, False, True),
                "mean+grad": lambda x3=x3, t=t: launch.forward_reduced(x3, t, hp, True, True),
                "mean": lambda x3=x3, t=t: launch.forward_reduced(x3, t, hp, True, False),
                "backward": lambda x3=x3, t=t, s=stats, one=one: launch._launch_backward(
                    x3, t, s, one.expand(2), hp
                ),
            }
            variants += [(f"{dtype_name} K={K} {mode}", issue) for mode, issue in modes.items()]
        # Per-pixel rows (N, K, H, W): NCHW rows are strided (stride_k = H*W), NHWC rows are not.
        for layout in ("NCHW", "NHWC"):
            x = torch.zeros(2, 19, 4, 8, dtype=dtype)
            if layout == "NHWC":
                x = x.contiguous(memory_format=torch.channels_last)
            x3 = x.movedim(1, -1).reshape(2, 32, 19)
            t = torch.zeros(64, dtype=torch.int64)
            variants.append(
                (
                    f"{dtype_name} K=19 {layout} mean+grad",
                    lambda x3=x3, t=t: launch.forward_reduced(x3, t, hp, True, True),
                )
            )
        grad = torch.zeros(3, 5000, dtype=dtype)
        variants.append(
            (
                f"{dtype_name} scale_",
                lambda g=grad, d=stats_dtype: launch.scale_(g, torch.ones(1, dtype=d), None),
            )
        )
    for index_dtype in ("int32", "int64"):
        t = torch.zeros(10, dtype=getattr(torch, index_dtype))
        for count in (False, True):
            variants.append(
                (
                    f"{index_dtype} targets{' count' if count else ''}",
                    lambda t=t, c=count: launch._launch_targets(
                        t, 5, hp, torch.zeros(2, dtype=torch.int32) if c else None, c
                    ),
                )
            )
    return variants


def _resource_usage(cubin: bytes, cuobjdump: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True, check=False
        )
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out.stdout)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource usage: {out.stdout}{out.stderr}")
    regs, stack, shared, local = (int(v) for v in m.groups())
    return {"registers": regs, "spill_bytes": stack + local, "shared_bytes": shared}


def _sass(cubin: bytes, cuobjdump: str) -> list[tuple[int, str]]:
    """(address, instruction) of each SASS instruction (cuobjdump -sass)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=False)
    return [
        (int(m.group(1), 16), m.group(2))
        for m in re.finditer(r"^\s+/\*([0-9a-f]{4,})\*/\s+([^;]+);", out.stdout, flags=re.M)
    ]


def loop_structure(sass: list[tuple[int, str]]) -> dict | None:
    """The outermost loop of a kernel (the grid-stride loop over row blocks) and the loops inside it,
    found from backward branches: {"outer": instructions, "inner": [[instructions, u], ...]}.

    The compiler unrolls a column loop u times (u = its global loads or stores, at least 1) and adds
    a remainder loop (one load or store) for K % u columns.
    """
    loops = []
    for address, text in sass:
        m = re.search(r"BRA (0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < address:
            start = int(m.group(1), 16)
            body = [t for a, t in sass if start <= a <= address]
            u = max(sum("LDG" in t for t in body), sum("STG" in t for t in body), 1)
            loops.append((start, address, len(body), u))
    if not loops:
        return None
    outer = max(loops, key=lambda loop: loop[1] - loop[0])
    inner = sorted(
        loop for loop in loops if loop is not outer and outer[0] <= loop[0] and loop[1] <= outer[1]
    )
    return {"outer": outer[2], "inner": [[body, u] for _, _, body, u in inner]}


def per_iteration_instructions(loops: dict, K: int) -> int:
    """Instructions one thread executes per outer iteration, each column loop run over K columns."""
    inner = loops["inner"]
    executed = loops["outer"] - sum(body for body, _ in inner)
    i = 0
    while i < len(inner):
        body, u = inner[i]
        if u > 1 and i + 1 < len(inner) and inner[i + 1][1] == 1:  # unrolled loop + its remainder
            executed += body * (K // u) + inner[i + 1][0] * (K % u)
            i += 2
        else:
            executed += body * -(-K // u)
            i += 1
    return executed


def instructions_per_element(row: dict, K: int) -> float | None:
    """Warp instructions per logit element of a forward (tile or columns layout) or backward kernel
    at row length K: instructions per iteration x warps / elements per iteration."""
    config = row.get("config", {})
    if row.get("kernel") not in ("_drainage_fwd_kernel", "_drainage_bwd_kernel") or "BLOCK_K" not in config:
        return None
    rows, block_k, warps = int(config["BLOCK_ROWS"]), int(config["BLOCK_K"]), row["num_warps"]
    if row["kernel"] == "_drainage_bwd_kernel":  # one tile per program, no loop
        return row["sass_instructions"] * warps / (rows * min(K, block_k))
    if config.get("LAYOUT") == "2" or not row.get("loops"):  # streamed rows: no per-row iteration
        return None
    return per_iteration_instructions(row["loops"], K) * warps / (rows * K)


def largest_k(row: dict) -> int | None:
    ks = [int(m.group(1)) for v in row.get("variants", []) if (m := re.search(r"K=(\d+)", v))]
    return max(ks) if ks else None


def _instruction_counts(sass: list[tuple[int, str]]) -> dict:
    return {"sass_instructions": len(sass), "loops": loop_structure(sass)}


def use_target_only_driver(arch: int = 90) -> None:
    """Makes Triton's active driver a stand-in that only names the target sm_<arch>: the JIT then
    specialises and compiles launches as for that GPU, without one, as long as nothing is launched
    (warmup=True). Used here and by benchmarks/host_overhead.py."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class TargetOnlyDriver:
        def __init__(self, target):
            self.target = target

        def get_current_device(self):
            return arch  # the JIT keeps one cache per device: one per target here

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return self.target

        def get_active_torch_device(self):
            import torch

            return torch.device("cpu")

    driver.set_active(TargetOnlyDriver(GPUTarget("cuda", arch, 32)))


def compile_triton(arch: int) -> list[dict]:
    """Compile every Triton variant for sm_<arch>; one row per distinct compiled kernel.

    Must run in a process where Triton was imported without TRITON_INTERPRET=1.
    """
    import triton
    from triton.runtime.jit import JITFunction

    use_target_only_driver(arch)
    from drainage_fast.backends import triton_launch as launch

    launched = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        start = time.perf_counter()
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        launched.append((self.fn.__name__, kwargs, kernel, time.perf_counter() - start))
        return kernel

    JITFunction.run = compile_only
    cuobjdump = str(Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump")
    rows, seen = [], {}
    try:
        only = os.environ.get("KERNEL_VARIANTS")  # a substring: compile only those (development)
        for label, issue in _triton_variants(launch):
            if only and only not in label:
                continue
            del launched[:]
            try:
                issue()
            except Exception as err:  # noqa: BLE001 - a compile error is a result, reported per variant
                rows.append(
                    {"arch": f"sm_{arch}", "variant": label, "error": f"{type(err).__name__}: {err}"[:2000]}
                )
                continue
            for name, kwargs, kernel, seconds in launched:
                key = id(kernel)
                if key in seen:  # the same specialization: Triton's cache returned the same kernel
                    seen[key]["variants"].append(label)
                    continue
                row = {
                    "arch": f"sm_{arch}",
                    "kernel": name,
                    "variants": [label],
                    "config": {k: str(v) for k, v in kwargs.items() if k.isupper()},
                    "num_warps": kwargs.get("num_warps", 4),
                    "compile_s": round(seconds, 2),
                    **_resource_usage(kernel.asm["cubin"], cuobjdump),
                    **_instruction_counts(_sass(kernel.asm["cubin"], cuobjdump)),
                    "asserts": "__assertfail" in kernel.asm["ptx"],
                }
                seen[key] = row
                rows.append(row)
    finally:
        JITFunction.run = run
    return rows


# --- CUDA C++ -------------------------------------------------------------------------------------


def nvcc_path() -> str | None:
    import shutil

    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").is_file():
        return str(Path(CUDA_HOME) / "bin" / "nvcc")
    return shutil.which("nvcc")


def compile_cuda(archs=ARCHS, out_dir: Path | None = None) -> tuple[list[dict], str]:
    """nvcc csrc/cuda/drainage_cuda.cu for every arch with ptxas -v: (one row per kernel, stderr).

    A CPU build of torch ships the c10/cuda and ATen/cuda headers but not the generated
    c10/cuda/impl/cuda_cmake_macros.h (it only holds a Windows export macro); it is skipped. Nothing
    is linked (libc10_cuda is absent) or run.
    """
    from torch.utils import cpp_extension

    from drainage_fast import _ext

    torch_include = Path(cpp_extension.include_paths()[0])
    defines = []
    if not (torch_include / "c10/cuda/impl/cuda_cmake_macros.h").is_file():
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            nvcc_path(),
            "-std=c++20",
            *(f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs),
            "-Xptxas",
            "-v",
            "-c",
            str(ROOT / "csrc/cuda/drainage_cuda.cu"),
            "-o",
            str(Path(out_dir or tmp) / "drainage_cuda.o"),
            *(f"-I{p}" for p in cpp_extension.include_paths()),
            *defines,
            *cpp_extension.COMMON_NVCC_FLAGS,
            *_ext.NVCC_FLAGS,
            "-Xcompiler",
            "-fPIC",
        ]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=False)
    rows, current, arch, spill = [], None, None, None
    for line in run.stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line):
            current, arch = m.groups()
        elif m := re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
        ):
            spill = sum(int(v) for v in m.groups())
        elif (m := re.search(r"Used (\d+) registers", line)) and current:
            rows.append(
                {
                    "arch": arch,
                    "kernel": _demangle(current),
                    "registers": int(m.group(1)),
                    "spill_bytes": spill,
                }
            )
            current = None
    if run.returncode != 0:
        rows.append(
            {"arch": ",".join(f"sm_{a}" for a in archs), "kernel": "nvcc", "error": run.stderr[-5000:]}
        )
    return rows, run.stderr


def _demangle(name: str) -> str:
    out = (
        subprocess.run(["c++filt", name], capture_output=True, text=True, check=False).stdout.strip() or name
    )
    out = out.replace("drainage::cuda::(anonymous namespace)::", "").replace("c10::", "")
    return out.split("(")[0]


# --- running and reporting ----------------------------------------------------------------------


def run_triton_subprocess(arch: int, timeout: float = 1500) -> list[dict]:
    """compile_triton(arch) in a fresh process (the caller may have Triton in interpreter mode)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    code = (
        f"import json, sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import kernel_resources as k; "
        f"print('ROWS' + json.dumps(k.compile_triton({arch})))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("ROWS"):
            return json.loads(line[4:])
    return [{"arch": f"sm_{arch}", "variant": "all", "error": (proc.stderr or proc.stdout)[-5000:]}]


def all_triton_rows(archs=ARCHS) -> list[dict]:
    """Every arch at once: one process per arch (the compiles are single-threaded)."""
    with ThreadPoolExecutor(len(archs)) as pool:
        return [row for rows in pool.map(run_triton_subprocess, archs) for row in rows]


def problems(rows: list[dict]) -> list[str]:
    """Compile errors and spills, one line each."""
    out = []
    for row in rows:
        where = row.get("variant") or row.get("kernel")
        if "error" in row:
            out.append(f"{row['arch']} {where}: compile error: {row['error']}")
        elif row["spill_bytes"]:
            label = ", ".join(row.get("variants", [])[:3]) or where
            out.append(
                f"{row['arch']} {row['kernel']} [{label}]: {row['spill_bytes']} bytes of stack (spills) "
                f"at {row['registers']} registers"
            )
    return out


LAYOUT_NAMES = {"0": "columns", "1": "tile", "2": "stream"}


def table(rows: list[dict]) -> str:
    """Markdown: one line per compiled kernel."""
    lines = [
        "| arch | kernel | config | warps | registers | spill bytes | SASS | instr/elem at max K "
        "| variants |",
        "|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(
                f"| {row['arch']} | {row.get('kernel', '')} | compile error | | | | | "
                f"| {row.get('variant', '')} |"
            )
            continue
        config = row.get("config", {})
        shape = f"{config.get('BLOCK_ROWS', '')}x{config.get('BLOCK_K', '')}" if "BLOCK_K" in config else ""
        flags = [LAYOUT_NAMES[config["LAYOUT"]]] if "LAYOUT" in config else []
        flags += [k.lower() for k in ("WRITE_ROWS", "WRITE_GRAD", "COUNT") if config.get(k) == "True"]
        flags += [{"1": "sum", "2": "mean"}[config["REDUCE"]]] if config.get("REDUCE", "0") != "0" else []
        variants = row.get("variants", [])
        shown = "; ".join(variants[:2]) + (f" (+{len(variants) - 2})" if len(variants) > 2 else "")
        K = largest_k(row)
        per_element = instructions_per_element(row, K) if K else None
        lines.append(
            f"| {row['arch']} | {row['kernel']} | {(shape + ' ' + ' '.join(flags)).strip()} "
            f"| {row.get('num_warps', '')} "
            f"| {row['registers']} | {row['spill_bytes']} | {row.get('sass_instructions', '')} "
            f"| {'' if per_element is None else f'{per_element:.1f}'} | {shown} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    triton_rows = all_triton_rows()
    if len(sys.argv) > 1:  # also the raw rows, as JSON
        Path(sys.argv[1]).write_text(json.dumps(triton_rows, indent=1) + "\n")
    print("## Triton\n\n" + table(triton_rows))
    cuda_rows = compile_cuda()[0] if nvcc_path() else []
    print("\n## CUDA C++ (nvcc)\n\n" + table(cuda_rows))
    found = problems(triton_rows + cuda_rows)
    print("\n" + ("\n".join(found) if found else "no compile errors, no spills"))
    sys.exit(1 if found else 0)
