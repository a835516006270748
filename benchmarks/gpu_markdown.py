"""results.md of benchmarks/gpu_check.py: one table per part, from the report it also writes as
results.json (every status, error and figure is in the report; this only lays them out)."""

from __future__ import annotations

from report import fmt


def _cell_text(value, width: int = 160) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")[:width]


def markdown(r: dict) -> str:
    """The report of gpu_check.main as markdown: a header naming the GPU, then environment,
    correctness, sanitizers, timings and the fused linear losses, each a table."""
    dry = " (dry-run: the plan only, nothing measured)" if r["dry_run"] else ""
    lines = [
        f"# GPU check — {r['gpu']}{dry}",
        "",
        (
            f"`{r['command']}`, started {r['started']}, {fmt(r.get('elapsed_s'), '.0f')} s of a "
            f"{r['plan']['budget_s']} s budget{' (--quick: fewer repeats)' if r['quick'] else ''}. "
            f"Raw data: results.json beside this file; commit both as benchmarks/results/{r['slug']}/."
        ),
        "",
        "## Environment",
        "",
        f"Status: {r['env']['status']}.",
        "",
        "| item | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {_cell_text(v)} |" for k, v in r["env"].get("values", {}).items()]

    tests = r["tests"]
    about = "The core test files on CUDA tensors, every GPU backend (tests/support.py)."
    lines += [
        "",
        "## Correctness",
        "",
        f"{about} Status: {tests['status']}.",
        "",
        "| file | status | passed | failed | errors | skipped | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, f in tests.get("files", {}).items():
        lines.append(
            f"| {name} | {f['status']} | {f.get('passed', '')} | {f.get('failed', '')} | "
            f"{f.get('errors', '')} | {f.get('skipped', '')} | {f.get('seconds', '')} |"
        )
    if "totals" in tests:
        t = tests["totals"]
        lines.append(
            f"| total | | {t['passed']} | {t['failed']} | {t['errors']} | {t['skipped']} | "
            f"{tests.get('seconds', '')} |"
        )
    failures = [x for f in tests.get("files", {}).values() for x in f.get("failures", [])]
    if failures:
        lines += ["", "Failures:", ""] + [
            f"- `{x['test']}` ({x['kind']}): {_cell_text(x['message'])}" for x in failures
        ]

    lines += _sanitizers(r["sanitize"], r["plan"])

    timings = r["timings"]
    lines += [
        "",
        "## Timings: forward + backward, reduction mean, upstream gradient 1",
        "",
        (
            f"Status: {timings['status']}. µs: median of CUDA events around one eager call, inputs "
            "rotating so that L2 never serves them twice. GB/s: the 1-read + 1-write bytes (2 × logits + "
            "int64 targets) over that time; % of copy: against the copy bandwidth measured in the same run "
            f"({fmt(timings.get('copy_GBps'), '.0f')} GB/s). graph µs: the same step replayed from a "
            "CUDA graph (GPU time only); wall µs: a synchronised eager call, so wall − graph is the "
            "host's overhead. kernels: GPU kernels per step; peak MB: memory allocated by one step "
            "beyond its inputs."
        ),
        "",
        "| case | dtype | provider | µs | GB/s | % of copy | graph µs | wall µs | kernels | peak MB | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in timings["cells"]:
        note = c["status"] if c["status"] != "ok" else c.get("graph_error", "")
        lines.append(
            f"| {c['case']} | {c['dtype']} | {c['provider']} | {fmt(c.get('us'))} | "
            f"{fmt(c.get('GBps'), '.0f')} | "
            f"{fmt(c.get('pct_copy'), '.0f')} | {fmt(c.get('graph_us'))} | {fmt(c.get('wall_us'))} | "
            f"{fmt(c.get('kernels'), 'd')} | {fmt(c.get('peak_MB'))} | {_cell_text(note)} |"
        )
    if "linear" in r:
        lines += _linear(r["linear"], r["plan"]["linear"])
    return "\n".join(lines) + "\n"


def _linear(part: dict, plan: dict) -> list[str]:
    """One row per provider of the fused linear step, then the published figures it compares with."""
    shape = plan["shape"]
    lines = [
        "",
        (
            f"## Fused linear losses: {shape['N']:,} tokens × H = {shape['H']:,} × V = {shape['V']:,}, "
            f"{plan['dtype']}"
        ),
        "",
        (
            "One training step of a language model's output layer: logits = hidden @ weight.T, the loss "
            f"(Drainage with alpha = {plan['alpha']}; cross-entropy for the last two), backward to hidden "
            f"and weight; every {plan['ignored_every']}th target ignored. ms: median of CUDA events around "
            "one step after warm-up. TFLOP/s: the three GEMMs' 6 N H V "
            f"({plan['flop_per_step'] / 1e12:.1f} TFLOP) over that time. peak GiB: memory allocated during "
            "one step beyond what was allocated before it (the inputs; the .grad tensors are set to None "
            "before each step, so each provider's peak includes its gradients). Δ: max |difference| / "
            f"max |value| of the loss and gradients against {plan['reference']}. "
            f"Status: {part['status']}."
        ),
        "",
        "| provider | ms | TFLOP/s | peak GiB | Δ loss | Δ grad hidden | Δ grad weight | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in part["cells"]:
        diff = c.get("vs_reference", {})
        peak = c.get("peak_MB")
        note = c["status"] if c["status"] != "ok" else c.get("vs_reference_error", "")
        lines.append(
            f"| {c['provider']} | {fmt(c.get('ms'))} | {fmt(c.get('TFLOPs'), '.0f')} | "
            f"{fmt(None if peak is None else peak / 1024, '.2f')} | {fmt(diff.get('loss'), '.1e')} | "
            f"{fmt(diff.get('grad_hidden'), '.1e')} | {fmt(diff.get('grad_weight'), '.1e')} | "
            f"{_cell_text(note)} |"
        )
    lines += ["", "Published, not measured here (their GPUs, shapes and units):", ""]
    lines += [f"- {line}" for line in plan["published"]]
    return lines


def _sanitizers(part: dict, plan: dict) -> list[str]:
    """Tool x backend, each cell a run's status and seconds; then the excerpt of every run that is not
    ok, the commands and the cases."""
    the_plan = plan["sanitize"]
    tool = f"`{part['tool']}`" if part["tool"] else "not found (PATH, CUDA_HOME, /usr/local/cuda/bin)"
    lines = [
        "",
        "## Sanitizers",
        "",
        (
            "compute-sanitizer on benchmarks/sanitize_cases.py, one process per tool and GPU backend: every "
            "kernel through the public API at every row layout, bf16 and fp32, each case checked against "
            "the float64 oracle. memcheck: out-of-bounds and misaligned accesses (torch's caching "
            "allocator off); racecheck: shared-memory hazards between a block's threads (global memory "
            "is not its concern); synccheck: barriers. ok: the tool reports 0 errors and every case "
            f"passed. Tool: {tool}. Cap: {plan['caps_s']['sanitize']} s for the part. "
            f"Status: {part['status']}."
        ),
        "",
        "| tool | " + " | ".join(the_plan["backends"]) + " |",
        "|---|" + "---|" * len(the_plan["backends"]),
    ]
    runs = {(run["tool"], run["backend"]): run for run in part["runs"]}
    for tool_name in the_plan["tools"]:
        cells = [_run_cell(runs[(tool_name, backend)]) for backend in the_plan["backends"]]
        lines.append(f"| {tool_name} | " + " | ".join(cells) + " |")
    for run in part["runs"]:
        if run.get("excerpt"):
            about = f"{run['status']}; log: sanitize/{run['log']}"
            lines += ["", f"{run['tool']} × {run['backend']} ({about}):", ""]
            lines += [f"    {line}" for line in run["excerpt"]]
    lines += ["", "Commands, from the repository root:", ""]
    lines += [f"    {run['command']}" for run in the_plan["runs"]]
    lines += ["", f"Cases ({len(the_plan['cases'])}): " + "; ".join(the_plan["cases"]) + "."]
    return lines


def _run_cell(run: dict) -> str:
    text = run["status"] + (f", {run['warnings']} warnings" if run.get("warnings") else "")
    return _cell_text(text + (f" ({run['seconds']} s)" if "seconds" in run else ""))
