"""Build script of the native extension (csrc/); the project itself is described in pyproject.toml.

By default nothing is compiled at install time: pip builds in an isolated environment without torch
(putting torch in build-system.requires would pull a multi-GB CUDA build into it). The C++ sources
go into the package instead (drainage_fast/_csrc; an editable install reads csrc/ directly) and
drainage_fast/_ext.py compiles them just in time, on first use, into a per-user cache.

Ahead-of-time build into drainage_fast._C, against the torch already installed (CPU kernels, plus
the CUDA kernels when torch is a CUDA build and nvcc is found; DRAINAGE_FAST_CUDA=0 skips them):

    DRAINAGE_FAST_BUILD_EXT=1 pip install --no-build-isolation -e .
"""

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package, for the just-in-time build of an installed package."""

    def run(self):
        super().run()
        if not self.editable_mode:  # an editable install finds csrc/ beside the package
            shutil.copytree(
                ROOT / "csrc", Path(self.build_lib) / "drainage_fast" / "_csrc", dirs_exist_ok=True
            )


def _build_options() -> tuple[list, dict]:
    if os.environ.get("DRAINAGE_FAST_BUILD_EXT") != "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    # The source lists and flags live in the loader, so both builds compile the same thing.
    spec = importlib.util.spec_from_file_location("_drainage_fast_ext", ROOT / "drainage_fast" / "_ext.py")
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)

    sources = [f"csrc/{name}" for name in ext.CPU_SOURCES]
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("DRAINAGE_FAST_CUDA") != "0"
    )
    kind = CppExtension
    if with_cuda:
        sources += [f"csrc/{name}" for name in ext.CUDA_SOURCES]
        kind = CUDAExtension
    module = kind(
        "drainage_fast._C",
        sources,
        extra_compile_args={"cxx": ext.cxx_flags(), "nvcc": ext.NVCC_FLAGS},
        extra_link_args=ext.openmp_flags(),
    )
    return [module], {"build_ext": BuildExtension}


ext_modules, build_commands = _build_options()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **build_commands})
