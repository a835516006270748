"""The worst error of every member of the abstention family against its float64 oracle, per backend,
input dtype and logit scale (issue 21).

    .venv/bin/python benchmarks/family_accuracy.py [--out benchmarks/results]

For each case: logits = scale * randn(N, K) rounded to the dtype (the oracle sees the same rounded
values in float64), targets never the drainage output, one row in 8 with its target's logit raised
by 4 * scale (confident rows, where p_t -> 1 and the losses are differences of near-equal terms).
Errors, in units of the fp32 unit roundoff u = 2^-24 (fp64 input: 2^-53):

- loss: max over rows of |l - l_ref| / max(|l_ref|, 1) (reduction "none"), an error relative to the
  loss where it is above 1 and absolute below;
- gradient: max |g - g_ref| / max |g_ref| over the whole (N, K) gradient of the mean, relative to its
  largest entry (not per row: a confident row's largest entry, p_t - 1, cancels to 0 in float64 too,
  so no per-row scale is exact), next to what the rounding of the exact gradient to the input dtype
  alone errs by; the last column is the error in units of the input dtype's roundoff.

On a machine without CUDA, Triton runs in its interpreter (TRITON_INTERPRET=1, set here): numbers,
not GPU code. Writes family_accuracy.json and family_accuracy.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import drainage_fast as df  # noqa: E402 -- after TRITON_INTERPRET
from drainage_fast import backends  # noqa: E402

N, K = 64, 1001
SCALES = [1.0, 30.0, 1e3, 1e5]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# name -> (fused loss, oracle, hyper-parameters): the values tests/support.py uses.
MEMBERS = {
    "drainage": (df.fused_drainage_loss, df.drainage_loss_reference, {"alpha": 0.3}),
    "gamblers": (df.fused_gamblers_loss, df.gamblers_loss_reference, {"reward": 2.2}),
    "dac": (df.fused_dac_loss, df.dac_loss_reference, {"alpha": 0.7}),
    "ce_all": (df.fused_cross_entropy_loss, df.cross_entropy_loss_reference, {"over": "all"}),
    "ce_classes": (df.fused_cross_entropy_loss, df.cross_entropy_loss_reference, {"over": "classes"}),
}


def case_inputs(dtype, scale, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, K, generator=g, dtype=torch.float64) * scale
    target = torch.randint(0, K - 1, (N,), generator=g)
    logits[::8].scatter_add_(
        1, target[::8, None], torch.full((len(range(0, N, 8)), 1), 4 * scale, dtype=torch.float64)
    )
    if dtype == torch.float16 and logits.abs().max() > torch.finfo(dtype).max:
        return None
    return logits.to(dtype).to(device), target.to(device)


def errors(member, backend, dtype, scale, device) -> dict | None:
    made = case_inputs(dtype, scale, device)
    if made is None:
        return None
    logits, target = made
    fused, oracle, params = MEMBERS[member]
    x = logits.detach().requires_grad_()
    x64 = logits.double().requires_grad_()
    loss = fused(x, target, reduction="none", backend=backend, **params)
    ref = oracle(x64, target, reduction="none", **params)
    (grad,) = torch.autograd.grad(loss.sum() / N, x)
    (ref_grad,) = torch.autograd.grad(ref.sum() / N, x64)
    u = UNIT[torch.float64] if dtype == torch.float64 else UNIT[torch.float32]
    loss_err = ((loss.double() - ref).abs() / ref.abs().clamp_min(1)).max().item()
    scale_g = ref_grad.abs().max()
    grad_err = ((grad.double() - ref_grad).abs().max() / scale_g).item()
    rounded = ref_grad.to(dtype).double()  # the best a gradient stored in the dtype can be
    rounding = ((rounded - ref_grad).abs().max() / scale_g).item()
    return {
        "member": member,
        "backend": backend,
        "dtype": str(dtype).removeprefix("torch."),
        "scale": scale,
        "loss_err_u": loss_err / u,
        "grad_err": grad_err,
        "grad_rounding_alone": rounding,
        "grad_err_in_dtype_units": grad_err / UNIT[dtype],
    }


def table(rows) -> str:
    lines = [
        "| member | backend | dtype | logit scale | loss error (u) | gradient error | of which rounding "
        "to the dtype | gradient error (dtype units) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['member']} | {r['backend']} | {r['dtype']} | {r['scale']:g} | {r['loss_err_u']:.1f} "
            f"| {r['grad_err']:.2e} | {r['grad_rounding_alone']:.2e} | {r['grad_err_in_dtype_units']:.2f} |"
        )
    return "\n".join(lines)


def worst(rows) -> str:
    """Per member and dtype, the worst loss error over backends and scales."""
    lines = [
        "| member | dtype | worst loss error (u) | worst gradient error (dtype units) |",
        "|---|---|---:|---:|",
    ]
    keys = dict.fromkeys((r["member"], r["dtype"]) for r in rows)
    for member, dtype in keys:
        mine = [r for r in rows if (r["member"], r["dtype"]) == (member, dtype)]
        loss = max(mine, key=lambda r: r["loss_err_u"])
        grad = max(mine, key=lambda r: r["grad_err_in_dtype_units"])
        lines.append(
            f"| {member} | {dtype} | {loss['loss_err_u']:.1f} ({loss['backend']}, scale {loss['scale']:g}) "
            f"| {grad['grad_err_in_dtype_units']:.2f} ({grad['backend']}, scale {grad['scale']:g}) |"
        )
    return "\n".join(lines)


def write_report(out: Path) -> None:
    data = json.loads((out / "family_accuracy.json").read_text())
    info, rows = data["machine"], data["rows"]
    text = (
        "# The abstention family against its float64 oracle\n\n"
        f"({N}, {K}) logits, seed 0, on {info['device']} (torch {info['torch']}"
        f"{', Triton in its interpreter' if info['interpreted'] else ''}). Generated by "
        "`benchmarks/family_accuracy.py`, whose docstring defines the errors: loss in units of "
        "u = 2^-24 (fp32 compute; 2^-53 for fp64 input), relative above 1 and absolute below; gradient "
        "relative to its largest entry, and in units of the input dtype's roundoff.\n\n"
        "## Worst case per member and dtype\n\n" + worst(rows) + "\n\n## Every case\n\n" + table(rows) + "\n"
    )
    (out / "family_accuracy.md").write_text(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json")
    args = parser.parse_args()
    if args.report_only:
        write_report(args.out)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = [b for b in backends.NAMES if backends.availability(b, device)[0]]
    rows = []
    for member in MEMBERS:
        for backend in names:
            for dtype in DTYPES:
                for scale in SCALES:
                    r = errors(member, backend, dtype, scale, device)
                    if r is not None:
                        rows.append(r)
                        print(table([r]).splitlines()[-1], flush=True)
    info = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.machine()})",
        "torch": torch.__version__,
        "interpreted": os.environ.get("TRITON_INTERPRET") == "1",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "family_accuracy.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    write_report(args.out)


if __name__ == "__main__":
    main()
