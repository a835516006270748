"""The abstention tables of `train sweep`: selective classification per noise setting, the abstain-output
diagnostics, and the comparison table (accuracy, AURC and the risk at 90% coverage, cleaning precision@k,
open-set AUROC) with one row per loss and noise setting.

They take the sweep's aggregated rows (tables.aggregate over seeds: "<metric>_mean", "<metric>_std") with
a "setting" label; the open-set results come in as {loss: aggregated row of its own score}.
"""

from __future__ import annotations

import math

from .tables import CONFIDENCE_LABELS, confidences_in, pct, selective_table, spread_over


def selective_sections(agg: list[dict], split: str) -> list[str]:
    """One table per noise setting: AURC, E-AURC and the selective risks of every setting and confidence."""
    text = [
        f"## Selective classification (last epoch, {split})",
        "",
        (
            "A model accepts the images it is most confident about and abstains on the rest. Selective risk "
            "at c% coverage: the error rate among the ceil(c n / 100) most confident images; AURC: its mean "
            "over every coverage k / n; E-AURC: AURC minus that of the ideal order of the same predictions "
            "(drainage_fast.openset; ties count as the mean over their orders). Confidences: 1 - p_d (the "
            "abstain output's probability in the open softmax; models with one) and the MSP (the maximum "
            "softmax probability over the C classes; every model). Lower is better; values in %, "
            f"{spread_over(agg[0]['n'], 'seed')}. Figure: `<out>_risk_coverage.png`."
        ),
        "",
    ]
    for noise in dict.fromkeys(a["noise"] for a in agg):
        rows = [(a["setting"], c, a) for a in agg if a["noise"] == noise for c in confidences_in(a)]
        text += [f"### {noise}", "", selective_table(rows), ""]
    return text


def diagnostics_section(agg: list[dict]) -> list[str]:
    """The abstain output's diagnostics of the settings that have one (empty without)."""
    mine = [a for a in agg if "eval_drained_frac_mean" in a and not math.isnan(a["eval_drained_frac_mean"])]
    if not mine:
        return []
    text = [
        "## Abstain-output diagnostics (last epoch)",
        "",
        (
            "Abstained = share of the evaluation images whose argmax over all K outputs is the abstain "
            "(drainage) output. Precision@k = share of flipped labels among the k training samples with "
            "the highest score, k = number of flipped labels; p_d scores the abstaining model, 1 - p(given "
            "label) scores the same model (self-confidence, the usual baseline)."
        ),
        "",
        (
            "| setting | noise | abstained (%) | precision@k p_d (%) | precision@k self-conf. (%) | "
            "mean p_d clean | mean p_d flipped |"
        ),
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    text += [
        f"| {a['setting']} | {a['noise']} | {_cell(a, 'eval_drained_frac', 1)} | "
        f"{_cell(a, 'precision_at_k_pd', 1)} | {_cell(a, 'precision_at_k_self_conf', 1)} | "
        f"{a['pd_clean_mean']:.3f} | {a['pd_flipped_mean']:.3f} |"
        for a in mine
    ]
    return [*text, ""]


def comparison_table(agg: list[dict], openset: dict[str, dict] | None = None) -> str:
    """One row per setting and noise setting: clean accuracy (last epoch, best epoch), AURC and the risk at
    90% coverage by the setting's own confidence and by the MSP, precision@k of the noisy-label ranking by
    p_d and by self-confidence, and with `openset` ({loss: aggregated AUROC / OSCR row of its own score})
    the open-set AUROC of the loss. In %, mean ± std."""
    headers = [
        "acc. last epoch",
        "acc. best epoch",
        "AURC, own conf.",
        "risk@90%, own conf.",
        "AURC, MSP",
        "risk@90%, MSP",
        "precision@k p_d",
        "precision@k self-conf.",
    ]
    if openset is not None:
        headers.append("open-set AUROC, own score")
    lines = ["| loss | noise | " + " | ".join(headers) + " |", "|---|---|" + "---:|" * len(headers)]
    for a in agg:
        own = confidences_in(a)[0]  # 1 - p_d with an abstain output, else the MSP
        cells = [
            _cell(a, "last_eval_acc"),
            _cell(a, "best_eval_acc"),
            f"{_cell(a, f'eval_aurc[{own}]')} ({CONFIDENCE_LABELS[own]})",
            _cell(a, f"eval_risk@90[{own}]"),
            _cell(a, "eval_aurc[msp]"),
            _cell(a, "eval_risk@90[msp]"),
            _cell(a, "precision_at_k_pd"),
            _cell(a, "precision_at_k_self_conf"),
        ]
        if openset is not None:
            found = openset.get(a["loss"]) if not a["params"] else None
            cells.append(pct(found["AUROC_mean"], found["AUROC_std"]) if found else "")
        lines.append(f"| {a['setting']} | {a['noise']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(agg_row: dict, metric: str, digits: int = 2) -> str:
    mean = agg_row.get(f"{metric}_mean", math.nan)
    return "" if math.isnan(mean) else pct(mean, agg_row[f"{metric}_std"], digits=digits)
