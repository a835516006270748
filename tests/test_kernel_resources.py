"""Every GPU kernel variant compiles for sm_90 and sm_80, without a GPU, and spills no register.

The interpreter the rest of the suite runs the Triton kernels in never runs Triton's compiler; these
tests do (see kernel_resources.py for how). A spill fails the test like a compile error: the table
of registers is printed with the failure (and by `python tests/kernel_resources.py`).
"""

import re

import kernel_resources
import pytest

triton = pytest.importorskip("triton")


@pytest.fixture(scope="module")
def triton_rows():
    return kernel_resources.all_triton_rows()


def test_every_triton_variant_compiles_without_spills(triton_rows):
    found = kernel_resources.problems(triton_rows)
    print(kernel_resources.table(triton_rows))
    assert not found, "\n".join(found)


def test_the_variants_cover_every_launcher_config_and_both_targets(triton_rows):
    """Each config the launchers' config functions return for any K is compiled, on both targets."""
    import torch

    from drainage_fast.backends import triton_launch

    compiled = {
        (row["arch"], row["kernel"], row["config"]["BLOCK_ROWS"], row["config"]["BLOCK_K"], row["num_warps"])
        for row in triton_rows
        if "config" in row and "BLOCK_K" in row["config"]
    }
    for K in range(2, 2**19, 97):
        for dtype in (torch.bfloat16, torch.float32, torch.float64):
            for kernel, config in (
                ("_drainage_fwd_kernel", triton_launch._forward_config(K, dtype)),
                ("_drainage_bwd_kernel", triton_launch._backward_config(K, dtype)),
            ):
                for arch in ("sm_90", "sm_80"):
                    key = (arch, kernel, str(config.block_rows), str(config.block_k), config.num_warps)
                    assert key in compiled, f"K={K} {dtype}: {key} was never compiled"
    kernels = {row["kernel"] for row in triton_rows if "kernel" in row}
    assert kernels == {
        "_drainage_fwd_kernel",
        "_drainage_bwd_kernel",
        "_scale_grad_kernel",
        "_targets_kernel",
    }


def test_the_targets_kernel_keeps_its_device_side_assert(triton_rows):
    """Triton drops tl.device_assert unless the kernel is compiled with debug: the targets kernel
    asks for it (the interpreter never asserts, so only the compiled code can show it), and no
    other kernel pays for debug mode's extra checks."""
    for row in triton_rows:
        if "kernel" in row:
            assert row["asserts"] == (row["kernel"] == "_targets_kernel"), row["kernel"]


@pytest.mark.skipif(
    kernel_resources.nvcc_path() is None, reason="nvcc not found (no CUDA toolkit on this machine)"
)
def test_cuda_kernels_compile_for_sm90_and_sm80_without_spills():
    """nvcc compiles csrc/cuda/drainage_cuda.cu, kernels and torch binding, for both targets.

    Every template instance the launcher's switch can pick is compiled (the switch is what
    instantiates them): threads-per-row cases x 4 dtypes, forward and backward; the scale kernel per
    gradient dtype and the finalize kernel per loss dtype (fp32, fp64). No instance may spill or use a
    stack frame (the device-side assert of the finalize kernel included), and config_for can return
    no threads-per-row case that the switch does not name.
    """
    rows, stderr = kernel_resources.compile_cuda()
    print(kernel_resources.table(rows))
    assert not any("error" in row for row in rows), stderr[-5000:]
    source = (kernel_resources.ROOT / "csrc/cuda/drainage_cuda.cu").read_text()
    launch = source[source.index("void launch(") :]
    launch = launch[: launch.index("\n}\n")]
    cases = {int(c) for c in re.findall(r"case (\d+):", launch)}
    assert cases == {4, 8, 16, 32} and "default:" in launch, launch  # config_for's TPR values, and 0
    rows_per_group = len(cases) + 1
    for arch in ("sm_90", "sm_80"):
        names = [row["kernel"] for row in rows if row["arch"] == arch]
        assert sum("drainage_fwd_kernel" in n for n in names) == 4 * rows_per_group, names
        assert sum("drainage_bwd_kernel" in n for n in names) == 4 * rows_per_group, names
        assert sum("drainage_scale_kernel" in n for n in names) == 4, names
        assert sum("drainage_finalize_kernel" in n for n in names) == 2, names
        assert len(names) == 8 * rows_per_group + 6, names  # nothing else, nothing uncounted
    found = kernel_resources.problems(rows)
    assert not found, "\n".join(found)
