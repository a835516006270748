"""Open-set training runs: the methods, the paper's constant-drainage model, one run end to end (train on
the known classes, score known and unknown evaluation images, dump every score), and a plan of methods x
hyper-parameter points x splits x seeds, checked whole before the first folder is made (plan_open_set),
then run (run_plan). Used by `train osr`, `train demo789` and `train sweep --openset_splits`.

    drainage_const  the paper's open-set variant: the network emits the C class logits, the drainage
                    logit is held at a constant (ConstantDrainageLogit), alpha = beta = 1; + p_d
    <any loss>      that loss (train/losses.py) on its preset: with an abstain output (drainage,
                    gamblers, dac: a learned node, C + 1 logits), scored by p_d too; ce, nce_rce, ...:
                    C outputs; every method gets msp, max_logit, energy

Run folder: config.json, env.json, noise.json, labels.npz, train.log, metrics.jsonl (as `train run`),
openset.json (method, split, drainage logit), openset_metrics.json (every metric of every score) and
scores.csv: one row per evaluated image, so any metric can be recomputed:

    set (known | unknown), index (in the test set; in the training set for a --tuning validation run),
    label and pred (original class ids; pred = argmax over the C class outputs), correct (known rows),
    drained (argmax over all K outputs is the drainage node; drainage methods), then every outlier
    score of drainage_fast.openset.open_set_scores (higher = more likely unknown).
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from drainage_fast.openset import open_set_metrics, open_set_scores

from ..config import CONFIG_DIR, Config, load_config, resolved, write_run_info
from ..data import RawDataset, load_raw
from ..experiment import check_model_fits, check_runtime, resume_state, run_session, save_noise
from ..grid import best_points, check_owners, distinct, grid_points, parse_grid, point_overrides, point_tag
from ..jobs import Job, same_json
from ..losses import build_loss, canonical_loss_name, is_abstaining, num_outputs
from ..models import build_model
from ..report import aggregate, loss_label, write_csv
from ..run_dirs import UserError, atomic_write_text
from ..trainer import Trainer, class_predictions
from .data import OpenSetData, build_open_set_data, check_split_fits
from .splits import OpenSetSplit


@dataclass(frozen=True)
class Method:
    loss: str
    drainage: str | None  # None: C outputs; "constant": ConstantDrainageLogit; "learned": C + 1 outputs
    primary_score: str  # the score the method is judged and tuned by
    label: str


# the methods that are not a loss's own name; `osr`'s default methods are ce, drainage_const, drainage
METHODS = {"drainage_const": Method("drainage", "constant", "p_d", "Drainage (constant z_d)")}
DEFAULT_METHODS = ("ce", "drainage_const", "drainage")


def method_of(name: str) -> Method:
    """drainage_const, or a loss in any spelling (train/losses.py): with an abstain output a learned node
    judged by p_d, else C outputs judged by msp. A UserError names an unknown one."""
    if name in METHODS:
        return METHODS[name]
    loss = canonical_loss_name(name, "--methods ")
    if is_abstaining(loss):
        return Method(loss, "learned", "p_d", f"{loss_label(loss)} (learned node)")
    return Method(loss, None, "msp", loss_label(loss))


def method_name(name: str) -> str:
    """The name a method's run folders and report rows use: drainage_const, or the loss's code name."""
    return name if name in METHODS else canonical_loss_name(name, "--methods ")


PAPER_OPEN_SET_PARAMS = {"alpha": 1.0, "beta": 1.0}
# Datasets without presets of their own borrow a similar dataset's (SVHN: CIFAR-10's recipe and 8-layer
# CNN, both 3 x 32 x 32); MNIST has none and trains the Config defaults with the paper's MNIST model.
RECIPE_PRESETS = {"svhn": "cifar10"}
DEFAULT_MODELS = {"mnist": "cnn4"}
SCORE_LABELS = {"p_d": "p_d", "msp": "MSP", "max_logit": "max-logit", "energy": "energy"}
OPENSET_RECORD, OPENSET_METRICS = "openset.json", "openset_metrics.json"  # the latter: a finished run


class ConstantDrainageLogit(nn.Module):
    """(N, C) network -> (N, C + 1) logits whose last column (the drainage node) is the constant `value`.

    Softmax is shift invariant, so a constant c trains the same as c = 0 with every class logit shifted
    by -c, which the last layer's bias absorbs: c acts as the initialisation of the class biases at -c
    (and through any penalty on them, l1_delta or weight decay). That start matters: on digits the class
    logits of unknown images stay low while training lifts the known ones, and the validation AUROC of
    p_d rose from 90.6% at c = 0 to 93.5% at c = 40 (benchmarks/results/tuning/digits_osr_tuning_stage3.md).
    With a constant drainage logit p_d = sigmoid(c + energy): it ranks images exactly as energy does.
    """

    def __init__(self, net: nn.Module, value: float = 0.0):
        super().__init__()
        self.net = net
        self.register_buffer("value", torch.tensor(float(value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        return torch.cat([z, self.value.to(z.dtype).expand(z.shape[0], 1)], dim=1)


def build_method_model(
    method: str, model_name: str, num_known: int, drainage_logit: float = 0.0
) -> nn.Module:
    m = method_of(method)
    if m.drainage == "constant":
        return ConstantDrainageLogit(build_model(model_name, num_known), drainage_logit)
    return build_model(model_name, num_outputs(m.loss, num_known))


def config_for_method(method: str, dataset: str, overrides=(), preset_prefix: str | None = "osr") -> Config:
    """The first preset of <prefix>_<dataset>_<method> (none without a prefix), <recipe>_<loss>,
    <recipe> (train/configs/; the recipe is the dataset or RECIPE_PRESETS's stand-in), with clean labels
    and the method's loss (drainage_const: alpha = beta = 1), then `overrides`."""
    m = method_of(method)
    recipe = RECIPE_PRESETS.get(dataset, dataset)
    names = [f"{preset_prefix}_{dataset}_{method}"] if preset_prefix else []
    names += [f"{recipe}_{m.loss}", recipe]
    preset = next((n for n in names if (CONFIG_DIR / f"{n}.json").exists()), None)
    forced = {"dataset": dataset, "noise_type": "none", "noise_rate": 0.0, "loss": m.loss}
    if preset is None and dataset in DEFAULT_MODELS:
        forced["model"] = DEFAULT_MODELS[dataset]
    if m.drainage == "constant":
        forced["loss_params"] = dict(PAPER_OPEN_SET_PARAMS)
    elif preset is None or load_config(preset).loss != m.loss:
        forced["loss_params"] = {}
    cfg = load_config(preset, point_overrides(forced) + list(overrides))
    if cfg.loss != m.loss or cfg.noise_type != "none":
        raise UserError(
            f"method {method} trains {m.loss} on clean labels; got loss={cfg.loss}, "
            f"noise_type={cfg.noise_type}"
        )
    return cfg


def evaluate_open_set(
    known_logits: torch.Tensor, unknown_logits: torch.Tensor, osd: OpenSetData, drainage: bool
) -> tuple[dict, list[dict]]:
    """(metrics, one dump row per image) for (N, K) eval logits of the known and unknown images."""
    C = osd.data.num_classes
    drainage_idx = -1 if drainage else None
    known_scores = open_set_scores(known_logits, drainage_idx)
    unknown_scores = open_set_scores(unknown_logits, drainage_idx)
    correct = class_predictions(known_logits, C) == osd.data.eval_y
    metrics = {
        "closed_set_accuracy": correct.double().mean().item(),
        "num_known": len(known_logits),
        "num_unknown": len(unknown_logits),
    }
    if drainage:
        metrics["drained_known"] = (known_logits.argmax(1) == C).double().mean().item()
        metrics["drained_unknown"] = (unknown_logits.argmax(1) == C).double().mean().item()
    metrics["scores"] = {
        s: open_set_metrics(known_scores[s], unknown_scores[s], correct=correct) for s in known_scores
    }
    known_classes = torch.tensor(osd.split.known)
    rows = []
    for name, logits, scores, index, labels in (
        ("known", known_logits, known_scores, osd.known_eval_index, osd.known_eval_label),
        ("unknown", unknown_logits, unknown_scores, osd.unknown_eval_index, osd.unknown_eval_label),
    ):
        pred = known_classes[class_predictions(logits, C)]
        drained = logits.argmax(1) == C
        for i in range(len(logits)):
            row = {
                "set": name,
                "index": int(index[i]),
                "label": int(labels[i]),
                "pred": int(pred[i]),
                "correct": int(pred[i] == labels[i]) if name == "known" else "",
            }
            if drainage:
                row["drained"] = int(drained[i])
            rows.append(row | {s: float(v[i]) for s, v in scores.items()})  # repr: exact round trip
    return metrics, rows


def open_set_record(method: str, split: OpenSetSplit, unknown_train: str, drainage_logit: float) -> dict:
    """openset.json's content (as JSON reads it back): what, besides config.json, makes an open-set run
    that run."""
    m = method_of(method)
    record = {
        "method": method,
        "description": m.label,
        "unknown_train": unknown_train,
        "drainage_logit": drainage_logit if m.drainage == "constant" else None,
        "split": asdict(split),
    }
    return json.loads(json.dumps(record))


def run_open_set(
    cfg: Config,
    method: str,
    osd: OpenSetData,
    run_dir: str | Path,
    *,
    drainage_logit: float = 0.0,
    quiet: bool = True,
    resume: bool = False,
    continue_with: str | None = None,
) -> dict:
    """Trains `method` on osd's known classes, scores the evaluation images, writes the run folder
    (module docstring; run_dir: claimed by the caller, e.g. train.jobs.Job.claim); returns
    openset_metrics.json's content. resume: continue the cut run in run_dir from its last.pt.
    continue_with: the command that continues the run if it is cut (experiment.run_log)."""
    m, run_dir = method_of(method), Path(run_dir)
    device = check_runtime(cfg)
    state = resume_state(run_dir, cfg, device) if resume else None
    with run_session(cfg, run_dir, quiet, continue_with) as logger:
        if not resume:
            write_run_info(run_dir, cfg, device)
            save_noise(run_dir, osd.data)
            record = open_set_record(method, osd.split, osd.unknown_train, drainage_logit)
            atomic_write_text(run_dir / OPENSET_RECORD, json.dumps(record, indent=1) + "\n")
        C = osd.data.num_classes
        model = build_method_model(method, cfg.model, C, drainage_logit)
        loss_fn = build_loss(cfg.loss, C, **cfg.loss_params)
        logger.info(
            f"{run_dir}: {m.label} on {cfg.dataset} split {osd.split.tag}: known "
            f"{list(osd.split.known)} ({len(osd.data.train_y)} train images), unknown "
            f"{list(osd.split.unknown)} (their training "
            f"images: {osd.unknown_train}); evaluated on {osd.data.eval_split}"
        )
        trainer = Trainer(cfg, osd.data, model, loss_fn, run_dir, device, logger, show_progress=not quiet)
        trainer.fit(state)
        known_logits = trainer.logits(trainer.eval_x).cpu()
        unknown_logits = trainer.logits(osd.unknown_x.to(device)).cpu()
        metrics, rows = evaluate_open_set(known_logits, unknown_logits, osd, m.drainage is not None)
        metrics["eval_split"] = osd.data.eval_split
        metrics["training_set"] = trainer.training_set_stats()
        write_csv(run_dir / "scores.csv", rows)
        # written last: a run with it is finished (run_plan reuses it)
        atomic_write_text(run_dir / OPENSET_METRICS, json.dumps(metrics, indent=1) + "\n")
        trainer.finish()
        return metrics


@dataclass(frozen=True)
class PlannedRun:
    method: str
    point: dict  # the grid point (drainage_logit included when it is an axis)
    split: OpenSetSplit
    seed: int
    cfg: Config
    drainage_logit: float


@dataclass
class OpenSetPlan:
    runs: list[PlannedRun]
    raws: dict  # (dataset, data_root) -> RawDataset, loaded once


def plan_open_set(
    dataset: str,
    methods: list[str],
    splits: list[OpenSetSplit],
    seeds: list[int],
    *,
    grid=(),
    overrides=(),
    drainage_logit: float = 0.0,
    preset_prefix: str | None = "osr",
) -> OpenSetPlan:
    """Every method x grid point x split x seed as a checked config, and the datasets they train on, loaded.
    A grid axis may be `drainage_logit` (drainage_const only); every other axis is a config key as in
    `train sweep --grid`. Raises UserError for any mistake (a method or split given twice included),
    before anything is written. preset_prefix: see config_for_method."""
    methods = [method_name(m) for m in distinct("--methods", methods, method_name)]
    distinct("split", [split.tag for split in splits])
    axes = parse_grid(list(grid))
    check_owners(axes, methods, "methods")
    combos = [
        (m, point, split, seed)
        for m in methods
        for point in grid_points(m, axes)
        for split in splits
        for seed in seeds
    ]
    runs, raws, fitted = [], {}, set()
    for method, point, split, seed in combos:
        if "drainage_logit" in point and method_of(method).drainage != "constant":
            raise UserError(
                "--grid drainage_logit=...: the drainage_logit axis applies to drainage_const "
                "only: write --grid drainage_const:drainage_logit=..."
            )
        config_point = {k: v for k, v in point.items() if k != "drainage_logit"}
        settings = ["checkpoint=false", *overrides, f"seed={seed}", *point_overrides(config_point)]
        cfg = config_for_method(method, dataset, settings, preset_prefix)
        check_runtime(cfg)
        key = (cfg.dataset, cfg.data_root)
        if key not in raws:
            raws[key] = load_raw(cfg.dataset, cfg.data_root, cfg.download)
        check_split_fits(raws[key], split)
        if (method, cfg.model, key, len(split.known)) not in fitted:
            osd = build_open_set_data(raws[key], split, seed=seed, tuning=cfg.tuning)
            check_model_fits(build_method_model(method, cfg.model, len(split.known)), osd.data, cfg)
            fitted.add((method, cfg.model, key, len(split.known)))
        logit = float(point.get("drainage_logit", drainage_logit))
        runs.append(PlannedRun(method, point, split, seed, cfg, logit))
    return OpenSetPlan(runs, raws)


def run_plan(
    plan: OpenSetPlan,
    runs_dir: Path,
    *,
    unknown_train: str = "drop",
    quiet: bool = True,
    continue_with: str = "",
) -> list[dict]:
    """Runs the plan one run after the other, each in runs_dir/<method>[<params>]/<split>/s<seed>: a
    finished run of the same config.json and openset.json is reused, a cut one continued in place, any
    other folder left alone (-2, -3, ...; train/jobs.py); one row per run: method, params, split, seed,
    run_dir and openset_metrics.json's content. Ctrl-C: run_dirs.Interrupted, whose line ends with
    continue_with."""

    def finished(run_dir: Path) -> bool:
        return (run_dir / OPENSET_METRICS).is_file()

    rows, start = [], time.perf_counter()
    with Job(continue_with, runs_dir) as job:
        planned = []
        for run in plan.runs:
            params = point_tag(run.point)
            wanted = {
                "config.json": resolved(run.cfg),
                OPENSET_RECORD: open_set_record(run.method, run.split, unknown_train, run.drainage_logit),
            }
            parent = runs_dir / (f"{run.method}[{params}]" if params else run.method) / run.split.tag
            planned.append(job.plan(parent, f"s{run.seed}", lambda d, w=wanted: same_json(d, w), finished))
        print(job.counts(), flush=True)
        for n, (run, planned_run) in enumerate(zip(plan.runs, planned), 1):
            slot = job.claim(planned_run)
            if slot.state == "reused":
                result = json.loads((slot.run_dir / OPENSET_METRICS).read_text())
            else:
                raw: RawDataset = plan.raws[run.cfg.dataset, run.cfg.data_root]
                osd = build_open_set_data(
                    raw, run.split, seed=run.cfg.seed, tuning=run.cfg.tuning, unknown_train=unknown_train
                )
                result = run_open_set(
                    run.cfg,
                    run.method,
                    osd,
                    slot.run_dir,
                    quiet=quiet,
                    drainage_logit=run.drainage_logit,
                    resume=slot.state == "continue",
                    continue_with=continue_with,
                )
                job.release(slot)
            params = point_tag(run.point)
            rows.append(
                {
                    "method": run.method,
                    "params": params,
                    "split": run.split.tag,
                    "seed": run.seed,
                    "run_dir": str(slot.run_dir),
                    **result,
                }
            )
            score = method_of(run.method).primary_score
            print(
                f"[{n}/{len(plan.runs)}] {run.method:>14} {params:<28} {run.split.tag} s{run.seed}: "
                f"{result['eval_split']} acc {result['closed_set_accuracy']:.4f}, AUROC {score} "
                f"{result['scores'][score]['AUROC']:.4f} ({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
    return rows


METRICS = (
    "AUROC",
    "OSCR",
    "closed_set_accuracy",
    "AUPR-IN",
    "AUPR-OUT",
    "FPR@95TPR[unknown-positive]",
    "FPR@95TPR[known-positive]",
)
EXTRA_METRICS = ("drained_known", "drained_unknown")


def score_rows(runs: list[dict]) -> list[dict]:
    """One row per run and score: method, params, split, seed, score, METRICS, drained_known/unknown."""
    out = []
    for run in runs:
        for score, metrics in run["scores"].items():
            out.append(
                {
                    "method": run["method"],
                    "params": run["params"],
                    "split": run["split"],
                    "seed": run["seed"],
                    "eval_split": run["eval_split"],
                    "score": score,
                    **{k: metrics[k] for k in METRICS},
                    "drained_known": run.get("drained_known"),
                    "drained_unknown": run.get("drained_unknown"),
                }
            )
    return out


def setting_label(method: str, score: str) -> str:
    return f"{method_of(method).label} / {SCORE_LABELS[score]}"


def aggregate_scores(rows: list[dict]) -> list[dict]:
    """score_rows aggregated over splits and seeds (mean +- std per method, params, score), with a
    "setting" label for the tables."""
    agg = aggregate(rows, ["method", "params", "score", "eval_split"], [*METRICS, *EXTRA_METRICS])
    for a in agg:
        a["setting"] = setting_label(a["method"], a["score"]) + (f" [{a['params']}]" if a["params"] else "")
        a["primary"] = a["score"] == method_of(a["method"]).primary_score
    return agg


def best_method_points(agg: list[dict]) -> dict[str, tuple[str, float]]:
    """method -> (params, mean AUROC of its primary score): each method's best grid point (--tuning)."""
    return best_points(agg, "method", "AUROC_mean", keep=lambda a: a["primary"])


def read_scores_csv(run_dir: str | Path) -> dict[str, np.ndarray]:
    """A run folder's scores.csv (module docstring) as column -> (N,) array of strings."""
    with open(Path(run_dir) / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def drained_per_class(run_dir: str | Path, num_classes: int = 10) -> np.ndarray:
    """(num_classes,) fraction of the evaluated images of each true class that the drainage node takes."""
    dump = read_scores_csv(run_dir)
    labels, drained = dump["label"].astype(int), dump["drained"].astype(int)
    return np.array([drained[labels == c].mean() for c in range(num_classes)])
