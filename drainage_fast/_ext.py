"""Loads the native kernels of csrc/ and registers their ops (torch.ops.drainage_fast.*).

Two ways in, tried in this order:
  * ahead of time: the module drainage_fast._C, built at install time by setup.py
    (DRAINAGE_FAST_BUILD_EXT=1 pip install --no-build-isolation .); importing it registers the ops;
  * just in time: torch.utils.cpp_extension.load compiles the same sources on first use (ninja,
    17-56 s on 2 cores) into a per-user cache, keyed by a hash of the sources, the flags,
    torch, Python and the CPU, so later processes only load the library (milliseconds).

The CPU part (schemas + CPU kernels) and the CUDA part (CUDA kernels) are separate libraries in the
just-in-time path, so a machine without nvcc still gets the CPU kernels. Nothing here raises: a
failure becomes the reason string the "cpp" / "cuda" backends report, and a CPU part that cannot be
built also warns once (NativeBuildWarning): backend="auto" then runs "reference" on the CPU, and a
silent fallback cost users the native speed without a word. DRAINAGE_FAST_NO_EXT=1 turns the extension
off (no warning: it was asked for).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import platform
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

CPU_SOURCES = ("drainage.cpp", "reduced_loss.cpp", "cpu/drainage_cpu.cpp")
CUDA_SOURCES = ("cuda/drainage_cuda.cu",)
HEADERS = ("row_math.h", "drainage_common.h", "cpu/fast_exp.h")

# -fno-trapping-math lets the compiler turn the selects of fast_exp into vector blends (measured:
# exp over a row 0.55 ns/element with it, 3.7 without, AVX2); -march picks the vector width of this
# machine (DRAINAGE_FAST_MARCH=x86-64-v3 or similar builds a library for other machines).
CXX_FLAGS = ["-O3", "-fno-trapping-math", "-ffp-contract=fast"]
# No --use_fast_math: it would swap the row terms' logf for an approximation; the hot loops call
# exp2f themselves.
NVCC_FLAGS = ["-O3", "-lineinfo"]


def openmp_flags() -> list[str]:
    """at::parallel_for is inline OpenMP code when torch's ATen uses OpenMP: it needs -fopenmp
    (the OpenMP runtime torch loaded serves it); otherwise -fopenmp-simd for the `omp simd` loops."""
    import torch

    return (
        ["-fopenmp"] if "parallel backend: OpenMP" in torch.__config__.parallel_info() else ["-fopenmp-simd"]
    )


def cxx_flags() -> list[str]:
    march = os.environ.get("DRAINAGE_FAST_MARCH", "native")
    arch = [f"-march={march}"] if platform.machine() in ("x86_64", "AMD64") else []
    return CXX_FLAGS + arch + openmp_flags()


def csrc_dir() -> Path | None:
    """The C++ sources: shipped in the package (_csrc/, a wheel) or beside it (a source checkout)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_csrc", here.parent / "csrc"):
        if (candidate / CPU_SOURCES[0]).is_file():
            return candidate
    return None


class NativeBuildWarning(UserWarning):
    """The C++ CPU kernels could not be built: backend="auto" runs the slower "reference" on the CPU.
    Filter it like any warning: warnings.filterwarnings("ignore", category=NativeBuildWarning)."""


_state: dict[str, str | None] = {}  # part -> None when loaded, else why not
_ahead_of_time: list[bool] = []  # [True] once drainage_fast._C was imported


def load_cpu() -> str | None:
    """Registers the op schemas and the CPU kernels; None on success, else the reason."""
    if "cpu" not in _state:
        _state["cpu"] = _load_cpu()
    return _state["cpu"]


def load_cuda() -> str | None:
    """Registers the CUDA kernels (after the CPU part); None on success, else the reason."""
    if "cuda" not in _state:
        _state["cuda"] = load_cpu() or _load_cuda()
    return _state["cuda"]


def _has_kernel(device_key: str) -> bool:
    import torch

    return torch._C._dispatch_has_kernel_for_dispatch_key("drainage_fast::forward", device_key)


def _load_cpu() -> str | None:
    if os.environ.get("DRAINAGE_FAST_NO_EXT") == "1":
        return "the native extension is disabled by DRAINAGE_FAST_NO_EXT=1"
    try:
        importlib.import_module("drainage_fast._C")
        _ahead_of_time.append(True)
        return None
    except ImportError:
        reason = _jit("cpu", CPU_SOURCES, with_cuda=False)
    if reason is not None:  # load_cpu caches the answer: this warns once per process
        warnings.warn(
            f"drainage_fast: the C++ CPU kernels could not be built ({_telling_line(reason)}), so "
            "backend='auto' runs the slower 'reference' backend on the CPU. Fix: install a C++ "
            "compiler (g++ or clang++) and ninja (pip install ninja) and start Python again, or build "
            "the kernels at install time with DRAINAGE_FAST_BUILD_EXT=1 pip install "
            "--no-build-isolation -e . ; the full reason: drainage_fast.backends.availability('cpp'). "
            "DRAINAGE_FAST_NO_EXT=1 turns the extension off.",
            NativeBuildWarning,
            stacklevel=2,
        )
    return reason


def _telling_line(reason: str) -> str:
    """The line of a build failure that says what went wrong: the first compiler error or missing tool,
    not ninja's closing "build stopped" or a compiler command line; else the last line."""
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    telling = [
        line
        for line in lines
        if re.search(r"error|not found|no such file|required", line, re.IGNORECASE)
        and " -c " not in line
        and not line.startswith(("FAILED", "ninja:"))
    ]
    return (telling or lines)[0 if telling else -1][:300]


def _load_cuda() -> str | None:
    if _has_kernel("CUDA"):
        return None  # the ahead-of-time module was built with CUDA
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if _ahead_of_time:
        return (
            "drainage_fast._C was built without CUDA (no nvcc at install time); rebuild it with "
            "nvcc on the PATH or CUDA_HOME set"
        )
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return "nvcc not found (set CUDA_HOME) for the just-in-time CUDA build"
    return _jit("cuda", CUDA_SOURCES, with_cuda=True)


def _cache_key(root: Path, names: tuple[str, ...], flags: list[str]) -> str:
    import torch

    h = hashlib.sha256()
    for name in sorted(set(names) | set(HEADERS)):
        h.update(name.encode() + (root / name).read_bytes())
    h.update(" ".join([torch.__version__, sys.version, platform.machine(), *flags]).encode())
    h.update(_cpu_flags().encode())  # -march=native code must not run on another CPU
    return h.hexdigest()[:16]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def cache_root() -> Path:
    if "DRAINAGE_FAST_CACHE_DIR" in os.environ:
        return Path(os.environ["DRAINAGE_FAST_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "drainage_fast"


def _jit(part: str, names: tuple[str, ...], with_cuda: bool) -> str | None:
    root = csrc_dir()
    if root is None:
        return "the C++ sources (csrc/) are not shipped with this installation"
    import torch

    sources = [root / name for name in names]
    flags = cxx_flags()
    key = _cache_key(root, names, flags + (NVCC_FLAGS if with_cuda else []))
    name = f"drainage_fast_{part}_{key}"
    build_dir = cache_root() / name
    library = build_dir / f"{name}.so"
    try:
        if (build_dir / "BUILT").is_file() and library.is_file():
            torch.ops.load_library(str(library))  # built before with these exact inputs
            return None
        from torch.utils import cpp_extension

        _put_ninja_on_path()
        build_dir.mkdir(parents=True, exist_ok=True)
        _clear_stale_lock(build_dir)
        print(
            f"drainage_fast: compiling the {part} extension (first use; cached in {build_dir})",
            file=sys.stderr,
        )
        cpp_extension.load(
            name=name,
            sources=[str(s) for s in sources],
            extra_cflags=flags,
            extra_cuda_cflags=NVCC_FLAGS,
            extra_ldflags=openmp_flags(),
            build_directory=str(build_dir),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=os.environ.get("DRAINAGE_FAST_VERBOSE_BUILD") == "1",
        )
        (build_dir / "BUILT").touch()
        return None
    except Exception as err:  # noqa: BLE001 - a compiler error, a missing tool: report, never raise
        message = str(err).strip()
        return f"the just-in-time build of csrc/ failed: {message[-1500:]}"


# A build takes under 2 minutes even on 2 loaded cores; a lock older than this was left by a build
# that was killed (Ctrl-C during the first import), and torch's FileBaton would wait on it forever.
STALE_LOCK_SECONDS = 15 * 60


def _clear_stale_lock(build_dir: Path) -> None:
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        print(f"drainage_fast: removing a stale build lock ({age / 60:.0f} min old): {lock}", file=sys.stderr)
        lock.unlink(missing_ok=True)


def _put_ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH; the one from the `test` extra is in the venv's bin/."""
    if shutil.which("ninja"):
        return
    try:
        import ninja

        bin_dir = ninja.BIN_DIR
    except (ImportError, AttributeError):
        bin_dir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
