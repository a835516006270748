"""`train clean`: the ranking and its report on a planted case whose answer is worked out by hand, the
no-flip case, and the command end to end on digits (train, then rank the finished runs again)."""

import csv
import json

import numpy as np
import pytest

from drainage_fast.openset import precision_curve
from train.cleaning import rank_run
from train.cli import main

# 20 training samples, 5 flipped (positions 0-4). p_d ranks them 0.9 (flipped), 0.85 (clean, position 5),
# 0.8, 0.7, 0.6 (flipped), then the clean 0.00-0.13 and the flipped 0.2 among them.
FLIPPED_PD = [0.9, 0.8, 0.7, 0.6, 0.2]
CLEAN_PD = [0.85] + [0.01 * i for i in range(14)]


def planted_run(tmp_path, flips=True):
    n = 20
    clean = np.arange(n) % 4
    noisy = clean.copy()
    if flips:
        noisy[:5] = (clean[:5] + 1) % 4
    p_given = np.full(n, 0.9)
    p_given[:5] = [0.1, 0.2, 0.3, 0.4, 0.5]  # self-confidence ranks the flipped five first
    np.savez(
        tmp_path / "scores.npz",
        index=np.arange(n) + 100,
        noisy=noisy,
        clean=clean,
        pred=clean,
        p_given=p_given,
        p_drain=np.array(FLIPPED_PD + CLEAN_PD),
    )
    return tmp_path


def test_planted_ranking_by_hand(tmp_path):
    result = rank_run(planted_run(tmp_path), ks=(2, 10, 50))
    pd, sc = result["scores"]["p_d"], result["scores"]["self_confidence"]
    assert result["num_flipped"] == 5 and result["num_samples"] == 20
    # top 5 by p_d: 0.9 F, 0.85 C, 0.8 F, 0.7 F, 0.6 F -> 4 of 5; top 2: 1 of 2; top 10: all 5 flipped
    assert pd["precision@k_flipped"] == pd["precision@5"] == pytest.approx(4 / 5)
    assert (pd["precision@2"], pd["recall@2"]) == (pytest.approx(1 / 2), pytest.approx(1 / 5))
    assert (pd["precision@10"], pd["recall@10"]) == (pytest.approx(5 / 10), 1.0)
    assert "precision@50" not in pd  # k larger than the training set is skipped
    # AUROC = P(flipped > clean): 0.9 beats all 15 clean, 0.8 / 0.7 / 0.6 / 0.2 beat 14 each -> 71 / 75
    assert pd["AUROC"] == pytest.approx(71 / 75)
    assert sc["precision@k_flipped"] == 1.0 and sc["AUROC"] == 1.0
    assert result["pd_flipped"] == pytest.approx(np.mean(FLIPPED_PD))
    assert result == json.loads((tmp_path / "cleaning.json").read_text())
    assert (tmp_path / "cleaning.png").exists()


def test_planted_ranked_csv(tmp_path):
    rank_run(planted_run(tmp_path))
    with open(tmp_path / "cleaning_ranked.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows[:5]] == [100, 105, 101, 102, 103]  # original indices, by p_d
    assert [r["flipped"] for r in rows[:5]] == ["1", "0", "1", "1", "1"]
    assert [int(r["rank"]) for r in rows] == list(range(1, 21))
    by_index = {int(r["index"]): r for r in rows}
    assert [int(by_index[100 + i]["rank_self_confidence"]) for i in range(5)] == [1, 2, 3, 4, 5]
    assert float(by_index[100]["self_confidence"]) == pytest.approx(0.9)
    curve = precision_curve(np.array(FLIPPED_PD + CLEAN_PD), np.arange(20) < 5)
    assert curve[[0, 1, 4]] == pytest.approx([1, 0.5, 0.8])


def test_no_flips_ranks_but_scores_nothing(tmp_path):
    result = rank_run(planted_run(tmp_path, flips=False))
    assert result["scores"] == {} and result["num_flipped"] == 0
    assert (tmp_path / "cleaning_ranked.csv").exists() and not (tmp_path / "cleaning.png").exists()


def test_clean_command_trains_ranks_and_reranks_finished_runs(tmp_path):
    runs = tmp_path / "runs"
    assert main(["clean", "--set", "epochs=3", "--runs_dir", str(runs), "--out", str(tmp_path / "a")]) == 0
    with open(tmp_path / "a_runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["loss"], r["score"]) for r in rows] == [
        ("drainage", "p_d"),
        ("drainage", "self_confidence"),
        ("ce", "self_confidence"),
    ]
    labels = np.load(runs / "drainage" / "asym0.4" / "s1" / "labels.npz")
    flipped = int((labels["noisy"] != labels["clean"]).sum())
    # 40% of classes 2, 3, 5, 6, 7
    assert flipped == 268 and all(int(r["num_flipped"]) == flipped for r in rows)
    reported = json.loads((runs / "drainage" / "asym0.4" / "s1" / "cleaning.json").read_text())
    assert float(rows[0]["precision@k_flipped"]) == pytest.approx(reported["scores"]["p_d"]["precision@268"])
    assert "| Drainage / p_d |" in (tmp_path / "a.md").read_text()
    # the same runs ranked again from their folders give the same numbers
    assert (
        main(
            [
                "clean",
                "--runs",
                str(runs / "drainage" / "asym0.4" / "s1"),
                str(runs / "ce" / "asym0.4" / "s1"),
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    with open(tmp_path / "b_runs.csv", newline="") as f:
        again = list(csv.DictReader(f))
    assert [r["AUROC"] for r in again] == [r["AUROC"] for r in rows]


def test_clean_takes_a_list_of_noise_settings_as_sweep_does(tmp_path):
    runs = tmp_path / "runs"
    assert (
        main(
            [
                "clean",
                "--losses",
                "ce",
                "--noise",
                "asym:0.2",
                "sym:0.4",
                "--set",
                "epochs=1",
                "batch_size=256",
                "--runs_dir",
                str(runs),
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    assert (runs / "ce" / "asym0.2" / "s1" / "cleaning.json").exists()
    assert (runs / "ce" / "sym0.4" / "s1" / "cleaning.json").exists()
    with open(tmp_path / "a_runs.csv", newline="") as f:
        assert [r["noise"] for r in csv.DictReader(f)] == ["asym:0.2", "sym:0.4"]
    text = (tmp_path / "a.md").read_text()
    assert "| CE, asym:0.2 / self-confidence |" in text and "| CE, sym:0.4 / self-confidence |" in text
    assert "--noise asym:0.2 sym:0.4" in text


def test_clean_ranks_the_abstaining_ancestors_by_their_p_d(tmp_path):
    runs = tmp_path / "runs"
    argv = [
        "clean",
        "--losses",
        "dac",
        "gamblers",
        "--set",
        "epochs=3",
        "--grid",
        "gamblers:loss_params.pretrain=1",
    ]
    assert main([*argv, "--runs_dir", str(runs), "--out", str(tmp_path / "a")]) == 0
    with open(tmp_path / "a_runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["loss"], r["score"]) for r in rows] == [
        ("dac", "p_d"),
        ("dac", "self_confidence"),
        ("gamblers", "p_d"),
        ("gamblers", "self_confidence"),
    ]
    scores = dict(np.load(runs / "dac" / "asym0.4" / "s1" / "scores.npz"))
    flipped = scores["noisy"] != scores["clean"]
    top = np.argsort(-scores["p_drain"], kind="stable")[: flipped.sum()]  # p_d, the most suspect first
    assert float(rows[0]["precision@k_flipped"]) == pytest.approx(flipped[top].mean())
    text = (tmp_path / "a.md").read_text()
    assert "| DAC / p_d |" in text and "| Deep Gamblers [pretrain=1] / p_d |" in text
