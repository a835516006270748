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
    """Each config the launchers' config functions return for any K and row kind is compiled, on
    both targets."""
    import torch

    from drainage_fast.backends import triton_launch

    compiled = {
        (row["arch"], row["kernel"], row["config"]["BLOCK_ROWS"], row["config"]["BLOCK_K"], row["num_warps"])
        for row in triton_rows
        if "config" in row and "BLOCK_K" in row["config"]
    }
    kinds = (triton_launch.CONTIGUOUS, triton_launch.SIDE_BY_SIDE, triton_launch.STRIDED)
    for K in range(2, 2**19, 97):
        for dtype in (torch.bfloat16, torch.float32, torch.float64):
            for kind in kinds:
                for kernel, config in (
                    ("_drainage_fwd_kernel", triton_launch._forward_config(K, dtype, kind)),
                    ("_drainage_bwd_kernel", triton_launch._backward_config(K, dtype, kind)),
                ):
                    for arch in ("sm_90", "sm_80"):
                        key = (arch, kernel, str(config.block_rows), str(config.block_k), config.num_warps)
                        assert key in compiled, f"K={K} {dtype} {kind}: {key} was never compiled"
    kernels = {row["kernel"] for row in triton_rows if "kernel" in row}
    assert kernels == {
        "_drainage_fwd_kernel",
        "_drainage_bwd_kernel",
        "_scale_grad_kernel",
        "_targets_kernel",
    }


def _variants(row: dict):
    """(dtype, K, kind) of each variant that compiled to this kernel; kind: contiguous, NCHW, NHWC,
    strided, or past-2^31."""
    for label in row.get("variants", []):
        words = label.split()
        kind = next((w for w in ("NCHW", "NHWC", "strided", "past") if w in words), "contiguous")
        K = int(re.search(r"K=(\d+)", label).group(1)) if "K=" in label else None
        yield words[0], K, kind


def _logits_kernels(rows):
    return [r for r in rows if r.get("kernel") in ("_drainage_fwd_kernel", "_drainage_bwd_kernel")]


def test_unit_stride_rows_are_read_and_written_in_16_byte_vectors(triton_rows):
    """Issue 19, item 7: every logits-reading kernel issues 16-byte loads for unit-stride bf16, fp16
    and fp32 rows with K >= 64, odd K included (K = C + 1 is odd for every common dataset: its rows
    start anywhere), and a bf16 / fp16 kernel has at most 8 single 16-bit loads. A kernel that writes
    the gradient writes it in 16-byte stores too."""
    checked = 0
    for row in _logits_kernels(triton_rows):
        for dtype, K, kind in _variants(row):
            if kind != "contiguous" or K < 64 or dtype == "float64":
                continue
            checked += 1
            where = f"{row['arch']} {dtype} K={K} {row['variants'][0]}"
            assert row["loads16"] >= 1, f"{where}: no 16-byte load"
            if dtype in ("bfloat16", "float16"):
                assert row["scalar_loads16"] <= 8, f"{where}: {row['scalar_loads16']} single 16-bit loads"
            if row["kernel"] == "_drainage_bwd_kernel" or row["config"].get("WRITE_GRAD") == "True":
                assert row["stores16"] >= 1, f"{where}: no 16-byte store"
    assert checked > 100


def test_streamed_rows_keep_32_kb_of_loads_in_flight_per_sm(triton_rows):
    """Issue 19, item 8: a streamed row's tile loop (one program per SM) loads at least 32 KB per
    iteration: warps x 32 lanes x its 16-byte loads per iteration (read from the SASS loop) x 16."""
    streamed = [r for r in _logits_kernels(triton_rows) if r.get("config", {}).get("LAYOUT") == "2"]
    assert streamed
    for row in streamed:
        if all(kind == "strided" for _, _, kind in _variants(row)):
            continue  # one address per element: no vectors to count
        in_flight = row["num_warps"] * 32 * row["loop_loads16"] * 16
        assert in_flight >= 32 * 1024, f"{row['arch']} {row['variants'][0]}: {in_flight} bytes in flight"


def test_side_by_side_rows_put_consecutive_lanes_on_consecutive_pixels(triton_rows):
    """Issue 19, item 9: for NCHW logits (the pixel axis contiguous) every load of logits is laid
    along the pixels: a column of pixels one per lane ([rows] vectors), or a 2-D tile whose fastest
    dimension (order[0]) is the pixels, spread over several lanes."""
    checked = 0
    for row in _logits_kernels(triton_rows):
        if not any(kind == "NCHW" for _, _, kind in _variants(row)):
            continue
        assert row["tile_loads"], row["variants"]
        for load in row["tile_loads"]:
            checked += 1
            assert load["order"][0] == 0 and (len(load["shape"]) == 1 or load["threadsPerWarp"][0] > 1), (
                row["arch"],
                row["variants"][0],
                load,
            )
    assert checked > 10


def test_grids_are_one_wave_of_the_programs_the_compiled_kernel_fits():
    """Issue 19, item 10: programs_per_sm, from which the launcher sizes a persistent grid, against
    the occupancy the CUDA occupancy calculator gives for the same registers, shared memory and warps
    on an SM of 65536 registers, 64 warps and 228 KB of shared memory (sm_90)."""
    from drainage_fast.backends.triton_launch import programs_per_sm

    assert programs_per_sm(168, 0, 1) == 12  # 168 x 32 = 5376 registers a warp: 12 warps
    assert programs_per_sm(130, 0, 1) == 15  # 130 -> 136 a thread (units of 256 a warp): 15 warps
    assert programs_per_sm(128, 1024, 4) == 4
    assert programs_per_sm(32, 0, 4) == 16  # the warp limit: 64 warps
    assert programs_per_sm(16, 0, 1) == 32  # the program limit
    assert programs_per_sm(64, 100_000, 2) == 2  # the shared-memory limit (plus 1 KB each)
    assert programs_per_sm(255, 0, 16) == 1  # never 0


def test_the_compiled_fused_forwards_fill_one_wave_and_keep_their_loads_in_flight():
    """Issue 19, items 7, 8 and 10 on the kernels the launcher really compiles for sm_90 (not on
    hand-computed registers): for each memory case, programs per SM from the compiled registers and
    shared memory on an H200, a grid of one wave of them, the streamed rows' >= 32 KB of loads in
    flight per SM, and 16-byte loads. The table of benchmarks/results/kernel_registers.md."""
    rows = [
        kernel_resources._on_an_h200(row) for row in kernel_resources._memory_facts_of(kernel_resources.ROOT)
    ]
    assert len(rows) == len(kernel_resources.MEMORY_CASES)
    for row in rows:
        assert row["occupancy_grid"] and row["programs_per_sm"] >= 1, row
        assert row["waves"] == 1.0, row
        assert row["loads16"] >= 1, row
        if row["stream"]:
            assert row["bytes_in_flight_per_sm"] >= 32 * 1024, row


def test_the_launcher_sizes_its_grid_from_the_compiled_kernel(monkeypatch):
    """_occupancy reads the registers and shared memory of the kernel the launch compiles to, once."""
    from types import SimpleNamespace

    import torch

    from drainage_fast.backends import triton_launch

    compiled = SimpleNamespace(n_regs=168, metadata=SimpleNamespace(shared=0), _init_handles=lambda: None)
    compiles = []

    class Kernel:
        def warmup(self, *args, grid, **kwargs):
            compiles.append(kwargs)
            return compiled

    props = SimpleNamespace(
        regs_per_multiprocessor=65536,
        max_threads_per_multi_processor=2048,
        shared_memory_per_multiprocessor=233472,
    )
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setitem(triton_launch._OCCUPANCY, "other", 3)
    device = torch.device("cuda", 0)
    for _ in range(2):
        assert triton_launch._occupancy(Kernel(), (), {"num_warps": 1}, device, ("key",)) == 12
    assert len(compiles) == 1
    triton_launch._OCCUPANCY.pop(("key",))


def test_index_arithmetic_is_32_bit_below_2_pow_31_rows(triton_rows):
    """Issue 19, item 11: no 64-bit division (a ~80-instruction subroutine) in any logits kernel whose
    rows fit in 32 bits; past 2^31 rows the 64-bit arithmetic still compiles."""
    for row in _logits_kernels(triton_rows):
        if row["config"].get("INDEX32") == "True":
            assert row["div64"] == 0, (row["arch"], row["variants"][:2])
    assert any(kind == "past" for row in _logits_kernels(triton_rows) for *_, kind in _variants(row))


def test_counts_and_tickets_are_64_bit_atomics(triton_rows):
    """Issue 19, item 2: the kept count (past 2^31 targets on a per-pixel batch) and the ticket are
    int64 on the device: no 32-bit atomic anywhere."""
    counted = 0
    for row in triton_rows:
        atomics = row.get("atomics", [])
        assert not any(".u32" in a or ".s32" in a or ".b32" in a for a in atomics), (
            row.get("variants"),
            atomics,
        )
        if row.get("config", {}).get("COUNT") == "True" or row.get("config", {}).get("REDUCE", "0") != "0":
            assert any(a.endswith(".u64") for a in atomics), (row.get("variants"), atomics)
            counted += 1
    assert counted


def test_every_launch_pins_fp_fusion(triton_rows):
    """Issue 19, item 6: the launch options name enable_fp_fusion (Triton 3.10 changes its default)."""
    from drainage_fast.backends.triton_launch import FP_FUSION

    assert all(row["enable_fp_fusion"] is FP_FUSION for row in triton_rows if "kernel" in row)


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


def test_every_member_costs_what_drainage_costs(triton_rows):
    """Issue 21: each member of the family (and sample weights) compiles to about the same warp
    instructions per element as Drainage's forward with gradient, within 10%, at every layout
    (streamed rows: the whole kernel's instructions, its loops being the same)."""
    costs = {}
    pattern = re.compile(
        r"(\w+) K=(\d+) (?:(GAMBLERS|DAC|CE_ALL|CE_CLASSES|DRAINAGE) )?(weighted )?mean\+grad$"
    )
    for row in triton_rows:
        if row.get("kernel") != "_drainage_fwd_kernel":
            continue
        for label in row["variants"]:
            m = pattern.match(label)
            if m is None or int(m.group(2)) not in kernel_resources.MEMBER_K_VALUES:
                continue
            dtype, K, member, weighted = (
                m.group(1),
                int(m.group(2)),
                m.group(3) or "DRAINAGE",
                bool(m.group(4)),
            )
            per_element = kernel_resources.instructions_per_element(row, K)
            cost = per_element if per_element is not None else row["sass_instructions"]
            costs[(row["arch"], dtype, K, weighted, member)] = cost
    compared = 0
    for (arch, dtype, K, weighted, member), cost in costs.items():
        base = costs.get((arch, dtype, K, False, "DRAINAGE"))
        if member == "DRAINAGE" and not weighted or base is None:
            continue
        assert cost <= 1.10 * base, (
            f"{arch} {dtype} K={K} {member} {'weighted ' * weighted}: {cost} vs {base}"
        )
        compared += 1
    assert compared >= 2 * 2 * len(kernel_resources.MEMBER_K_VALUES) * 9
