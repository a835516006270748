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
K_VALUES = (2, 11, 19, 51, 101, 1001, 4097, 32001, 32769, 128256, 128257, 262147)
# Per-pixel (NCHW) K: the columns layout, and the pixel tiles of 64, 256 and 1024 columns.
PIXEL_K_VALUES = (19, 51, 151, 1001)
# The members of the family beside Drainage: one K per forward layout (columns, tile of rows, a
# one-row tile, stream).
MEMBER_K_VALUES = (11, 101, 1001, 32001)
DTYPES = ("bfloat16", "float16", "float32", "float64")


# --- Triton -------------------------------------------------------------------------------------


def _config_ks_of(launch, kind: str, largest: int) -> list[int]:
    """One K per distinct (forward, backward) config for rows that lie as `kind` says."""
    import torch

    seen, ks = set(), []
    for K in sorted({k for p in range(1, largest) for k in (2**p - 1, 2**p, 2**p + 1) if k >= 2}):
        key = tuple(
            (launch._forward_config(K, dt, kind), launch._backward_config(K, dt, kind))
            for dt in (torch.float32, torch.float64)
        )
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
        extra = set() if dtype_name == "float16" else set(_config_ks_of(launch, launch.CONTIGUOUS, 20))
        stats_2 = torch.zeros(4, 2, dtype=stats_dtype)
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
        # Per-pixel rows (N, K, H, W): NCHW rows are strided (stride_k = H*W, the pixel axis
        # contiguous: the pixel layout), NHWC rows are not (evenly spaced rows).
        pixel_ks = set(PIXEL_K_VALUES) | (
            set(_config_ks_of(launch, launch.SIDE_BY_SIDE, 14))
            if dtype_name in ("float32", "float64")
            else set()
        )
        for K in sorted(pixel_ks):
            for layout in ("NCHW", "NHWC") if K == 19 else ("NCHW",):
                x = torch.zeros(2, K, 4, 8, dtype=dtype)
                if layout == "NHWC":
                    x = x.contiguous(memory_format=torch.channels_last)
                x3 = x.movedim(1, -1).reshape(2, 32, K)
                t = torch.zeros(64, dtype=torch.int64)
                stats = torch.zeros(4, 64, dtype=stats_dtype)
                modes = {
                    "mean+grad": lambda x3=x3, t=t: launch.forward_reduced(x3, t, hp, True, True),
                    "forward rows": lambda x3=x3, t=t: launch.forward(x3, t, hp),
                    "backward": lambda x3=x3, t=t, s=stats, one=one: launch._launch_backward(
                        x3, t, s, one.expand(64), hp
                    ),
                }
                variants += [(f"{dtype_name} K={K} {layout} {mode}", issue) for mode, issue in modes.items()]
        # Rows whose outputs are 2 apart (x[:, ::2]): every element its own address. The configs of
        # side-by-side and strided rows depend on K and fp64 alone (but for the stream tile's bytes,
        # which the named K = 32001 covers): their sweeps run in fp32 and fp64.
        strided_ks = {51, 1001, 32001} | (
            set(_config_ks_of(launch, launch.STRIDED, 19)) if dtype_name in ("float32", "float64") else set()
        )
        for K in sorted(strided_ks):
            x3 = torch.zeros(2, 2 * K, dtype=dtype)[:, ::2].unsqueeze(1)
            t = torch.zeros(2, dtype=torch.int64)
            modes = {
                "mean+grad": lambda x3=x3, t=t: launch.forward_reduced(x3, t, hp, True, True),
                "forward rows": lambda x3=x3, t=t: launch.forward(x3, t, hp),
                "backward": lambda x3=x3, t=t, s=stats_2, one=one: launch._launch_backward(
                    x3, t, s, one.expand(2), hp
                ),
            }
            variants += [(f"{dtype_name} K={K} strided {mode}", issue) for mode, issue in modes.items()]
        if dtype_name == "float32":
            # Rows and row blocks past 2^31 (stride-0 views, and a mean without a gradient: nothing
            # large is allocated): the 64-bit index arithmetic of DIV_ROWS and of PIXEL_ROWS.
            one_elem = torch.zeros(2**20, dtype=dtype)
            many = {
                "DIV": one_elem.as_strided((2**20, 2**12, 4), (1, 0, 0)),
                "PIXEL": one_elem.as_strided((2**28, 2**12, 19), (0, 1, 0)),
            }
            for mode, x3 in many.items():
                t = torch.zeros(1, dtype=torch.int64).as_strided((x3.shape[0] * x3.shape[1],), (0,))
                variants.append(
                    (
                        f"{dtype_name} K={x3.shape[2]} {mode} rows past 2^31 mean",
                        lambda x3=x3, t=t: launch.forward_reduced(x3, t, hp, True, False),
                    )
                )
        grad = torch.zeros(3, 5000, dtype=dtype)
        variants.append(
            (
                f"{dtype_name} scale_",
                lambda g=grad, d=stats_dtype: launch.scale_(g, torch.ones(1, dtype=d), None),
            )
        )
    # The other members of the family and sample weights: the member is a constexpr (MEMBER), the
    # weights a flag (HAS_WEIGHT); K through every layout, fp32 and bf16 (the row math in fp32).
    from drainage_fast._members import Member

    for member in Member:
        for dtype_name in ("bfloat16", "float32"):
            dtype = getattr(torch, dtype_name)
            member_hp = Hyper(0.8, -1.4, 1, -100, int(member))
            for K in MEMBER_K_VALUES:
                x3 = torch.zeros(2, 1, K, dtype=dtype)
                t = torch.zeros(2, dtype=torch.int64)
                w = torch.ones(2, dtype=torch.float32)
                modes = {
                    "mean+grad": lambda x3=x3, t=t, hp=member_hp: launch.forward_reduced(
                        x3, t, hp, True, True
                    ),
                    "weighted mean+grad": lambda x3=x3, t=t, w=w, hp=member_hp: launch.forward_reduced(
                        x3, t, hp, True, True, w
                    ),
                    "forward rows": lambda x3=x3, t=t, hp=member_hp: launch.forward(x3, t, hp),
                }
                if member == Member.DRAINAGE:
                    modes = {"weighted mean+grad": modes["weighted mean+grad"]}
                variants += [
                    (f"{dtype_name} K={K} {member.name} {mode}", issue) for mode, issue in modes.items()
                ]
            x = torch.zeros(2, 151, 4, 8, dtype=dtype)
            x3 = x.movedim(1, -1).reshape(2, 32, 151)
            t = torch.zeros(64, dtype=torch.int64)
            variants.append(
                (
                    f"{dtype_name} K=151 NCHW {member.name} weighted mean+grad",
                    lambda x3=x3, t=t, hp=member_hp: launch.forward_reduced(
                        x3, t, hp, True, True, torch.ones(64)
                    ),
                )
            )
    for index_dtype in ("int32", "int64"):
        t = torch.zeros(10, dtype=getattr(torch, index_dtype))
        for count in (False, True):
            variants.append(
                (
                    f"{index_dtype} targets{' count' if count else ''}",
                    lambda t=t, c=count: launch._launch_targets(
                        t, 5, hp, torch.zeros(launch.WORKSPACE_SLOTS, dtype=torch.int64), c
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


def loop_structure(sass: list[tuple[int, str]], counted=lambda text: True) -> dict | None:
    """The outermost loop of a kernel (the grid-stride loop over row blocks) and the loops inside it,
    found from backward branches: {"outer": instructions, "inner": [[instructions, u], ...]}, counting
    the instructions for which `counted` is true (default: all).

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
            loops.append((start, address, sum(map(counted, body)), u))
    if not loops:
        return None
    outer = max(loops, key=lambda loop: loop[1] - loop[0])
    inner = sorted(
        loop for loop in loops if loop is not outer and outer[0] <= loop[0] and loop[1] <= outer[1]
    )
    return {"outer": outer[2], "inner": [[body, u] for _, _, body, u in inner]}


def per_iteration_instructions(loops: dict, K: int, trips: int | None = None) -> int:
    """Instructions one thread executes per outer iteration, each column loop run over K columns
    (trips: each inner loop runs that many times instead, as a streamed row's tile loops)."""
    inner = loops["inner"]
    executed = loops["outer"] - sum(body for body, _ in inner)
    if trips is not None:
        return executed + sum(body for body, _ in inner) * trips
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


_VECTOR16 = r"\.v(?:4\.b32|2\.b64)\b"  # a 16-byte access in PTX


def code_facts(ptx: str, ttgir: str, sass: list[tuple[int, str]]) -> dict:
    """What the compiled code does with memory, read from its PTX, TTGIR and SASS:
    loads16 / stores16: 16-byte global loads / stores in the PTX (vectorized);
    scalar_loads16: single 16-bit global loads (one bf16 / fp16 element each);
    div64: 64-bit integer divisions and remainders (a ~80-instruction subroutine each);
    atomics: the atomic instructions (atom, and red where the result is unused);
    loop_loads16: 16-byte loads (LDG.E.128) in the first inner loop of the SASS that has any (a
    streamed row's tile loop), else None;
    tile_loads: (shape, order, threadsPerWarp, sizePerThread) of each load of floating-point values in
    a blocked layout (TTGIR): the logits' tiles and columns (a row's scalars have slice layouts)."""
    layouts = {
        name: body
        for name, body in re.findall(r"^(#blocked\d*) = #ttg\.blocked<\{(.*)\}>", ttgir, flags=re.M)
    }

    def field(body: str, key: str) -> list[int]:
        return [int(v) for v in re.search(key + r" = \[([\d, ]*)\]", body).group(1).split(",")]

    tile_loads = []
    pattern = r"tt\.load .*: tensor<(\d+(?:x\d+)?)x!tt\.ptr<(?:bf16|f16|f32|f64)>, (#blocked\d*)>"
    for shape, encoding in re.findall(pattern, ttgir):
        body = layouts[encoding]
        tile_loads.append(
            {
                "shape": [int(v) for v in shape.split("x")],
                "order": field(body, "order"),
                "threadsPerWarp": field(body, "threadsPerWarp"),
                "sizePerThread": field(body, "sizePerThread"),
            }
        )
    loop_loads16 = None
    loops = loop_structure(sass)
    if loops:
        for start, end in _inner_loop_spans(sass):
            n = sum("LDG.E.128" in t for a, t in sass if start <= a <= end)
            if n:
                loop_loads16 = n
                break
    return {
        "loads16": len(re.findall(r"\bld\.global[\w.:]*" + _VECTOR16, ptx)),
        "stores16": len(re.findall(r"\bst\.global[\w.:]*" + _VECTOR16, ptx)),
        "scalar_loads16": len(re.findall(r"\bld\.global(?:\.(?!v\d)[\w:]+)*\.b16\b", ptx)),
        "div64": len(re.findall(r"\b(?:div|rem)\.[su]64\b", ptx)),
        "atomics": sorted(set(re.findall(r"\b(?:atom|red)\.[\w.:]+", ptx))),
        "loop_loads16": loop_loads16,
        "tile_loads": tile_loads,
    }


_LDG_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def loop_load_bytes(sass: list[tuple[int, str]]) -> int:
    """Bytes one thread loads from global memory in one iteration of its loading loop: the first
    inner loop with a load (a column loop, a streamed row's tile loop), else the outer loop (a tile
    of rows). Times warps x 32 x resident programs, what an SM has in flight at once."""
    spans = _inner_loop_spans(sass)
    loading = [span for span in spans if any("LDG" in t for a, t in sass if span[0] <= a <= span[1])]
    if loading:
        start, end = loading[0]
    else:
        outer = loop_structure(sass) and _outer_loop_span(sass)
        start, end = outer if outer else (0, sass[-1][0])
    total = 0
    for address, text in sass:
        if start <= address <= end and (m := re.search(r"LDG\.E(?:\.(\w+))?", text)):
            total += _LDG_BYTES.get(m.group(1), 4)
    return total


def _outer_loop_span(sass: list[tuple[int, str]]) -> tuple[int, int] | None:
    spans = [
        (int(m.group(1), 16), address)
        for address, text in sass
        if (m := re.search(r"BRA (0x[0-9a-f]+)", text)) and int(m.group(1), 16) < address
    ]
    return max(spans, key=lambda span: span[1] - span[0]) if spans else None


def _inner_loop_spans(sass: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(start, end) addresses of the loops inside the outermost loop, in address order."""
    spans = []
    for address, text in sass:
        m = re.search(r"BRA (0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < address:
            spans.append((int(m.group(1), 16), address))
    if not spans:
        return []
    outer = max(spans, key=lambda span: span[1] - span[0])
    return sorted(span for span in spans if span != outer and outer[0] <= span[0] and span[1] <= outer[1])


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
                    **_instruction_counts(sass := _sass(kernel.asm["cubin"], cuobjdump)),
                    **code_facts(kernel.asm["ptx"], kernel.asm["ttgir"], sass),
                    "asserts": "__assertfail" in kernel.asm["ptx"],
                    "enable_fp_fusion": kwargs.get("enable_fp_fusion"),
                }
                seen[key] = row
                rows.append(row)
    finally:
        JITFunction.run = run
    return rows


# --- Before / after: how the fused forward reads memory (issue 19) --------------------------------

# (dtype, logits shape, NCHW): the odd K of real datasets, an aligned K, long rows, per-pixel rows.
MEMORY_CASES = [
    ("bfloat16", (8, 101), False),
    ("bfloat16", (8, 1001), False),
    ("bfloat16", (8, 1024), False),
    ("float32", (8, 1001), False),
    ("bfloat16", (2, 4097), False),
    ("bfloat16", (2, 32001), False),
    ("bfloat16", (2, 128257), False),
    ("float32", (2, 128257), False),
    ("bfloat16", (2, 151, 16, 16), True),
    ("float32", (2, 151, 16, 16), True),
]
H200 = {"sms": 132, "registers_per_sm": 65536, "warps_per_sm": 64, "shared_per_sm": 233472}
OLD_PROGRAMS_PER_SM = 32  # the grid of 7b32fa0..14606a3: 32 one-warp programs per SM (fewer if wider)


def memory_facts(arch: int = 90) -> list[dict]:
    """How the fused forward (mean + gradient) of each MEMORY_CASES case reads memory, as the
    launcher importable here compiles it (this tree's, or an older one's: only forward_reduced is
    called): 16-byte and single 16-bit loads (PTX), warp load instructions per 1000 elements (SASS),
    bytes of logits a program requests per iteration, programs per SM and the grid's waves on an H200.
    Must run in a process where Triton was imported without TRITON_INTERPRET=1."""
    import torch
    import triton
    from triton.runtime.jit import JITFunction

    use_target_only_driver(arch)
    from drainage_fast._inputs import Hyper
    from drainage_fast.backends import triton_launch as launch

    cuobjdump = str(Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump")
    launched, run = [], JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        launched.append((self.fn.__name__, kwargs, kernel))
        return kernel

    JITFunction.run = compile_only
    rows = []
    try:
        for dtype_name, shape, nchw in MEMORY_CASES:
            x = torch.zeros(*shape, dtype=getattr(torch, dtype_name))
            N, K = shape[0], shape[1]
            x3 = x.movedim(1, -1).reshape(N, -1, K) if nchw else x.unsqueeze(1)
            del launched[:]
            launch.forward_reduced(
                x3,
                torch.zeros(x3.shape[0] * x3.shape[1], dtype=torch.int64),
                Hyper(-2.3, 2.3, 1, -100),
                True,
                True,
            )
            _, kwargs, kernel = next(entry for entry in launched if entry[0] == "_drainage_fwd_kernel")
            sass = _sass(kernel.asm["cubin"], cuobjdump)
            usage = _resource_usage(kernel.asm["cubin"], cuobjdump)
            facts = code_facts(kernel.asm["ptx"], kernel.asm["ttgir"], sass)
            warps, block_rows, block_k = kwargs["num_warps"], kwargs["BLOCK_ROWS"], kwargs["BLOCK_K"]
            stream = kwargs["LAYOUT"] == 2
            loads = loop_structure(sass, counted=lambda text: "LDG" in text)
            per_iteration = per_iteration_instructions(loads, K, -(-K // block_k) if stream else None)
            elements = K if stream else block_rows * K  # one outer iteration: a block of rows
            rows.append(
                {
                    "case": f"{dtype_name} {'x'.join(map(str, shape))}{' NCHW' if nchw else ''}",
                    "layout": {0: "columns", 1: "tile", 2: "stream"}[kwargs["LAYOUT"]],
                    "config": f"{block_rows}x{block_k} w{warps}",
                    "registers": usage["registers"],
                    "shared_bytes": usage["shared_bytes"],
                    "warps": warps,
                    "loads16": facts["loads16"],
                    "scalar_loads16": facts["scalar_loads16"],
                    "ldg_per_1000": round(1000 * per_iteration * warps / elements, 1),
                    "loop_load_bytes": loop_load_bytes(sass),
                    "stream": stream,
                    "occupancy_grid": hasattr(launch, "_occupancy"),
                }
            )
    finally:
        JITFunction.run = run
    return rows


def _on_an_h200(row: dict) -> dict:
    """Adds programs per SM (from the registers and shared memory), the grid's waves and the bytes
    of logits in flight per SM, on an H200, to a memory_facts row. The grid of the old launcher was a
    fixed 32 // warps programs per SM; this one's is one wave (one program per SM when streaming)."""
    from drainage_fast.backends.triton_launch import programs_per_sm

    limits = {k: v for k, v in H200.items() if k != "sms"}
    resident = programs_per_sm(row["registers"], row["shared_bytes"], row["warps"], **limits)
    if row["stream"]:
        launched = 1
    else:
        launched = resident if row["occupancy_grid"] else max(1, OLD_PROGRAMS_PER_SM // row["warps"])
    return {
        **row,
        "programs_per_sm": resident,
        "waves": round(launched / resident, 2),
        "bytes_in_flight_per_sm": row["loop_load_bytes"] * 32 * row["warps"] * min(launched, resident),
    }


def memory_table(before_tree: str | None) -> str:
    """Markdown: memory_facts of this tree, and of `before_tree` (a checkout of an older commit) in
    the same layout, side by side."""
    after = [_on_an_h200(row) for row in _memory_facts_of(ROOT)]
    before = (
        [_on_an_h200(row) for row in _memory_facts_of(Path(before_tree))]
        if before_tree
        else [{}] * len(after)
    )
    keys = (
        "layout",
        "config",
        "registers",
        "loads16",
        "scalar_loads16",
        "ldg_per_1000",
        "bytes_in_flight_per_sm",
        "waves",
    )
    lines = [
        "| case | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for old, new in zip(before, after):
        cells = [f"{old.get(k, '-')} → {new[k]}" if old else str(new[k]) for k in keys]
        lines.append(f"| {new['case']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _memory_facts_of(tree: Path) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(tree)
    code = (
        f"import json, sys; sys.path.insert(1, {str(ROOT / 'tests')!r}); import kernel_resources as k; "
        "print('ROWS' + json.dumps(k.memory_facts()))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tree, check=False
    )
    for line in proc.stdout.splitlines():
        if line.startswith("ROWS"):
            return json.loads(line[4:])
    raise RuntimeError(proc.stderr[-3000:])


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
ROWS_MODE_NAMES = {"0": "flat", "1": "div", "2": "pixels"}


def table(rows: list[dict]) -> str:
    """Markdown: one line per compiled kernel."""
    lines = [
        "| arch | kernel | config | warps | registers | spill bytes | SASS | instr/elem at max K "
        "| 16 B loads | 16-bit loads | 64-bit div | variants |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(
                f"| {row['arch']} | {row.get('kernel', '')} | compile error | | | | | | | | "
                f"| {row.get('variant', '')} |"
            )
            continue
        config = row.get("config", {})
        shape = f"{config.get('BLOCK_ROWS', '')}x{config.get('BLOCK_K', '')}" if "BLOCK_K" in config else ""
        flags = [LAYOUT_NAMES[config["LAYOUT"]]] if "LAYOUT" in config else []
        flags += ["aligned"] if config.get("ALIGNED") == "True" else []
        flags += [ROWS_MODE_NAMES[config["ROWS_MODE"]]] if config.get("ROWS_MODE", "0") != "0" else []
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
            f"| {'' if per_element is None else f'{per_element:.1f}'} "
            f"| {row.get('loads16', '')} | {row.get('scalar_loads16', '')} | {row.get('div64', '')} "
            f"| {shown} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--memory":  # [--memory BEFORE_TREE]: the before / after table
        print(memory_table(sys.argv[2] if len(sys.argv) > 2 else None))
        sys.exit(0)
    triton_rows = all_triton_rows()
    if len(sys.argv) > 1:  # also the raw rows, as JSON
        Path(sys.argv[1]).write_text(json.dumps(triton_rows, indent=1) + "\n")
    print("## Triton\n\n" + table(triton_rows))
    cuda_rows = compile_cuda()[0] if nvcc_path() else []
    print("\n## CUDA C++ (nvcc)\n\n" + table(cuda_rows))
    found = problems(triton_rows + cuda_rows)
    print("\n" + ("\n".join(found) if found else "no compile errors, no spills"))
    sys.exit(1 if found else 0)
