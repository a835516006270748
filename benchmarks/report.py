"""Turns a pytest-benchmark JSON file into benchmarks/results/<device>.md and a PNG plot.

    python benchmarks/report.py results.json [--out benchmarks/results]

For every (mode, dtype) it tabulates, per shape, the fastest drainage_fast provider: median time,
GB/s on the explicit byte count (cases.py), % of the copy bandwidth measured in the same run, the
speed-up over each baseline and peak memory; then every provider's raw numbers.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

OURS = "drainage_fast["
BASELINES = ["reference-eager", "reference-compiled", "naive", "F.cross_entropy", "liger-cross_entropy"]


def load(path: Path) -> tuple[list[dict], list[dict]]:
    """(loss benchmarks, training-step benchmarks) from a pytest-benchmark JSON file."""
    loss_rows, step_rows = [], []
    for bench in json.loads(path.read_text())["benchmarks"]:
        info = bench["extra_info"]
        median_s = bench["stats"]["median"]
        if "step" in info:
            step_rows.append(dict(info, median_ms=median_s * 1e3))
        else:
            loss_rows.append(dict(info, median_us=median_s * 1e6, GBps=info["bytes"] / median_s / 1e9))
    return loss_rows, step_rows


def step_table(rows: list[dict]) -> list[str]:
    lines = [
        "| training step | loss | median ms | images/s | loss fwd+bwd µs | loss share of the step |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["step"], r["loss"])):
        lines.append(
            f"| {r['step']} | {r['loss']} | {r['median_ms']:.1f} | {r['images_per_s']:.0f} | "
            f"{r['loss_us']:.0f} | {100 * r['loss_share']:.2f}% |"
        )
    return lines


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def fmt(x, spec=".1f"):
    return "–" if x is None else format(x, spec)


def summary_table(rows: list[dict]) -> list[str]:
    by_shape = defaultdict(dict)
    for r in rows:
        by_shape[(r["N"], r["K"])][r["provider"]] = r
    present = [b for b in BASELINES if any(b in p for p in by_shape.values())]
    lines = [
        "| N × K | fastest drainage_fast | median µs | GB/s | % of copy | "
        + " | ".join(f"× vs {b}" for b in present)
        + " | peak MB (ours / naive) |",
        "|---" * (5 + len(present) + 1) + "|",
    ]
    for (N, K), providers in sorted(by_shape.items()):
        ours = [r for p, r in providers.items() if p.startswith(OURS)]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["median_us"])
        ratios = [
            fmt(providers[b]["median_us"] / best["median_us"], ".2f") if b in providers else "–"
            for b in present
        ]
        naive_mem = providers.get("naive", {}).get("peak_mem_MB")
        lines.append(
            f"| {N} × {K} | {best['provider']} | {best['median_us']:.1f} | {best['GBps']:.1f} | "
            f"{100 * best['GBps'] / best['copy_GBps']:.0f}% | "
            + " | ".join(ratios)
            + f" | {fmt(best.get('peak_mem_MB'))} / {fmt(naive_mem)} |"
        )
    return lines


def raw_table(rows: list[dict]) -> list[str]:
    lines = [
        "| N × K | provider | median µs | GB/s | % of copy | device µs | host µs | kernels | peak MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["N"] * r["K"], r["K"], r["median_us"])):
        lines.append(
            f"| {r['N']} × {r['K']} | {r['provider']} | {r['median_us']:.1f} | {r['GBps']:.1f} | "
            f"{100 * r['GBps'] / r['copy_GBps']:.0f}% | {fmt(r.get('device_us'))} "
            f"| {fmt(r.get('host_us'))} | "
            f"{fmt(r.get('kernels'), 'd')} | {fmt(r.get('peak_mem_MB'))} |"
        )
    return lines


def plot(groups: dict, device: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 5.2), squeeze=False)
    providers = sorted({r["provider"] for rows in groups.values() for r in rows})
    colors = dict(zip(providers, plt.get_cmap("tab10").colors))  # one colour per provider, every panel
    for ax, ((mode, dtype), rows) in zip(axes[0], sorted(groups.items())):
        shapes = sorted({(r["N"], r["K"]) for r in rows}, key=lambda s: s[0] * s[1])
        for provider in providers:
            pts = {(r["N"], r["K"]): r["GBps"] for r in rows if r["provider"] == provider}
            xs = [i for i, s in enumerate(shapes) if s in pts]
            style = "-o" if provider.startswith(OURS) else "--."
            ax.plot(xs, [pts[shapes[i]] for i in xs], style, color=colors[provider], label=provider)
        ax.axhline(rows[0]["copy_GBps"], color="gray", lw=1, ls=":", label="copy bandwidth")
        ax.set_xticks(range(len(shapes)), [f"{N}×{K}" for N, K in shapes], rotation=30, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("GB/s on the design's bytes (higher is faster)")
        ax.set_title(f"{mode}, {dtype.removeprefix('torch.')}")
        ax.grid(alpha=0.3)
    handles = {}
    for ax in axes[0]:
        handles.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(5, len(handles)), fontsize=8)
    fig.suptitle(f"Drainage loss throughput — {device}")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    rows, step_rows = load(args.json)
    device = (rows or step_rows)[0]["device"]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["mode"], r["dtype"])].append(r)

    first = (rows or step_rows)[0]
    md = [
        f"# Drainage loss benchmarks — {device}",
        "",
        (
            f"torch {first['torch']}, triton {first['triton']}, {first['threads']} CPU threads. "
            f"Copy bandwidth measured in the same run: **{fmt(first.get('copy_GBps'))} GB/s**. "
            "Times are medians of host wall-clock with a device synchronisation in every call; GB/s is the "
            "explicit byte count of the mode (benchmarks/cases.py: fwd 1 read; fwd+bwd 1 read + 1 write; "
            "fwd+bwd-none 2 reads + 1 write) over that time. Raw data: the JSON beside this file."
        ),
    ]
    for (mode, dtype), rows_g in sorted(groups.items()):
        md += ["", f"## {mode}, {dtype.removeprefix('torch.')}", ""] + summary_table(rows_g)
    if step_rows:
        md += ["", "## End-to-end training step (fused vs naive loss)", ""] + step_table(step_rows)
    md += ["", "## Every provider", ""]
    for (mode, dtype), rows_g in sorted(groups.items()):
        md += ["", f"### {mode}, {dtype.removeprefix('torch.')}", ""] + raw_table(rows_g)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / slug(device)
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    if args.json.resolve() != stem.with_suffix(".json").resolve():
        shutil.copyfile(args.json, stem.with_suffix(".json"))
    plot(groups, device, stem.with_suffix(".png"))
    print(f"wrote {stem}.md, .json, .png")


if __name__ == "__main__":
    main()
