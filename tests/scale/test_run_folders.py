"""Run folders of `python -m train.imagenet_scale`: a new run claims a fresh folder (two runs started
together get two), an explicit --name that exists is refused unless --overwrite, a run that stops
before its first checkpoint leaves no folder, Ctrl-C keeps the last checkpoint for --resume, and a
resumed run takes the overrides it can honour and refuses the others. Most runs call main() in this
process (a fresh interpreter costs ~3 s); the tiny config trains 97 images of 32 px."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.scale.support import run_main, run_module, tiny_run_args
from train.config import load_config
from train.scale import start
from train.scale.distributed import DistContext
from train.scale.loop import ScaleTrainer
from train.scale.options import ScaleOptions
from train.scale.validate import DataFileError, default_cache_dir

SINGLE = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
DEFAULT_NAME = r"\d{8}-\d{6}-webvision-drainage-s3-[0-9a-f]{6}(-\d+)?"


@pytest.fixture
def tiny(webvision_tree, tmp_path):
    """(out_dir, flags of a 2-epoch run)."""
    out = tmp_path / "runs"
    return out, tiny_run_args(webvision_tree[0], out, epochs=2)


def folders(out) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.is_dir())


def stop_in_epoch(monkeypatch, epoch: int, error: BaseException) -> None:
    """Makes training raise `error` when epoch `epoch` (0-based) starts."""
    train_epoch = ScaleTrainer.train_epoch

    def stopping(self):
        if self.epoch == epoch:
            raise error
        return train_epoch(self)

    monkeypatch.setattr(ScaleTrainer, "train_epoch", stopping)


def test_runs_started_together_with_the_default_name_get_their_own_folders(webvision_tree, tmp_path):
    out = tmp_path / "runs"
    # one thread each: two processes with a thread per core would spin against each other (17 s, not 5)
    args = [*tiny_run_args(webvision_tree[0], out, epochs=1, cpu_threads=1), "--check", "exists"]
    procs = [run_module(args, wait=False) for _ in range(2)]
    results = [(p.wait(timeout=240), *p.communicate()) for p in procs]
    assert [status for status, _, _ in results] == [0, 0], results
    names = folders(out)
    assert len(names) == 2 and all(re.fullmatch(DEFAULT_NAME, n) for n in names), names
    if names[0][:15] == names[1][:15]:  # started in the same second: the claim gave the second one -2
        assert names[1] == names[0] + "-2"
    for name in names:
        assert json.loads((out / name / "summary.json").read_text())["epochs"] == 1
        # --check exists lets the tree's 2 corrupt files through: the loader replaces them, the run goes on
        log = (out / name / "train.log").read_text()
        assert "could not be decoded, replaced by other training images" in log
    # --quiet: nothing but the result line
    assert sorted(stdout for _, stdout, _ in results) == sorted(
        f"done: selected epoch 1 on webvision_val (top-1 {stdout.split('(top-1 ')[1]}"
        for _, stdout, _ in results
    )
    assert all(len(stdout.splitlines()) == 1 and stdout.startswith("done: ") for _, stdout, _ in results)


def test_default_names_of_the_same_second_get_suffixes(tmp_path, monkeypatch):
    monkeypatch.setattr(start, "timestamp", lambda: "20990101-000000")
    cfg = load_config(None, ["dataset=webvision", f"out_dir={tmp_path}"])
    first, second = (start.claim(cfg, ScaleOptions(), SINGLE, overwrite=False) for _ in range(2))
    assert re.fullmatch(r"20990101-000000-webvision-drainage-s1-[0-9a-f]{6}", first.name)
    assert second.name == f"{first.name}-2"
    other = start.claim(
        load_config(None, ["dataset=webvision", f"out_dir={tmp_path}", "lr=0.5"]),
        ScaleOptions(),
        SINGLE,
        overwrite=False,
    )
    assert other.name.startswith("20990101-000000-webvision-drainage-s1-")
    assert other.name[:-7] == first.name[:-7]
    assert other.name != first.name  # the config hash tells runs of other settings apart


def test_an_existing_name_is_refused_and_replaced_only_with_overwrite(tiny, capsys):
    out, args = tiny
    (out / "taken").mkdir()
    (out / "taken" / "config.json").write_text("{}")
    status, _, err = run_main([*args, "--name", "taken"], capsys)
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "--name taken: run folder" in err and "--resume" in err and "--overwrite" in err
    assert folders(out) == ["taken"] and (out / "taken" / "config.json").read_text() == "{}"

    (out / "notarun").mkdir()
    (out / "notarun" / "precious.txt").write_text("keep me")
    status, _, err = run_main([*args, "--name", "notarun", "--overwrite"], capsys)
    assert status == 2 and "--overwrite: " in err and "is not a run folder" in err
    assert (out / "notarun" / "precious.txt").read_text() == "keep me"

    status, out_text, _ = run_main([*args, "--name", "taken", "--overwrite", "--set", "epochs=1"], capsys)
    assert status == 0 and out_text.startswith("done: ") and len(out_text.splitlines()) == 1
    assert json.loads((out / "taken" / "config.json").read_text())["epochs"] == 1
    run_files = {p.name for p in (out / "taken").iterdir()}
    assert {"last.pt", "best.pt", "summary.json"} <= run_files and not any(
        n.endswith(".tmp") for n in run_files
    )
    # the checkpoints load weights-only; the list checks' cache is outside the run and source folders
    assert torch.load(out / "taken" / "last.pt", weights_only=True)["epoch"] == 1
    assert not (out / "list_checks").exists() and any(default_cache_dir().iterdir())


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt(), 130), (DataFileError("x.jpg went bad"), 1)])
def test_a_run_stopped_before_its_first_checkpoint_leaves_no_folder(tiny, capsys, monkeypatch, error, status):
    out, args = tiny
    stop_in_epoch(monkeypatch, 0, error)
    result, stdout, err = run_main(args, capsys)
    assert result == status and folders(out) == []
    assert "before the first checkpoint: the run folder" in stdout + err and "Traceback" not in err


def test_a_bug_keeps_its_traceback_and_leaves_no_empty_folder(tiny, capsys, monkeypatch):
    out, args = tiny
    stop_in_epoch(monkeypatch, 0, ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError):
        run_main(args, capsys)
    assert folders(out) == []


def test_interrupted_run_resumes_with_the_overrides_it_can_take(tiny, capsys, monkeypatch):
    out, args = tiny
    stop_in_epoch(monkeypatch, 1, KeyboardInterrupt())
    status, stdout, err = run_main([*args, "--name", "r"], capsys)
    run = out / "r"
    assert status == 130
    assert (
        f"interrupted after epoch 1; continue with: python -m train.imagenet_scale --resume {run}"
        in stdout + err
    )
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    monkeypatch.undo()

    status, stdout, _ = run_main(["--resume", str(run), "--set", "epochs=3", "--quiet"], capsys)
    assert status == 0 and stdout.startswith("done: ")
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
    ]
    assert json.loads((run / "config.json").read_text())["epochs"] == 3  # the folder says what the run did
    assert "resumed with changes: epochs 2 -> 3" in (run / "train.log").read_text()

    for flags, message in [
        (["--set", "lr=0.1"], "--set lr cannot change in a resumed run"),
        (["--crop", "48"], "--crop cannot change in a resumed run"),
        (["--set", "epochs=2"], "--set epochs=2: the run has already trained 3 epochs"),
        (["--name", "other"], "--name cannot be combined with --resume"),
    ]:
        status, _, err = run_main(["--resume", str(run), *flags], capsys)
        assert status == 2 and message in err and err.count("\n") == 1, (flags, err)
    assert json.loads((run / "config.json").read_text())["epochs"] == 3


def _resume_folder(out, checkpoint: bytes | None):
    run = out / "broken"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"dataset": "webvision", "device": "cpu"}))
    (run / "scale_options.json").write_text("{}")
    if checkpoint is not None:
        (run / "last.pt").write_bytes(checkpoint)
    return ["--resume", str(run)]


def _empty_dir(out):
    (out / "empty").mkdir()
    return out / "empty"


def _valid_checkpoint() -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({"epoch": 1, "model": {"w": torch.zeros(3)}}, buffer)
    return buffer.getvalue()


# (flags from (data tree, out_dir), what the one line must say)
MISTAKES = {
    "missing list file": (
        lambda tree, out: ["--config", "webvision_drainage", "--data_root", str(_empty_dir(out))],
        ["--data_root", "list file not found", "info/train_filelist_google.txt", "a webvision root holds"],
    ),
    "unknown config": (
        lambda tree, out: ["--config", "nosuch"],
        ["--config nosuch: no such preset or .json file; presets: clothing1m_dac, clothing1m_drainage"],
    ),
    "resume of a missing folder": (
        lambda tree, out: ["--resume", str(out / "nowhere")],
        ["no such run folder"],
    ),
    "resume without a checkpoint": (
        lambda tree, out: _resume_folder(out, None),
        ["no last.pt; the run stopped before its first epoch ended"],
    ),
    "resume of an empty checkpoint": (lambda tree, out: _resume_folder(out, b""), ["last.pt cannot be read"]),
    "resume of a truncated checkpoint": (
        lambda tree, out: _resume_folder(out, _valid_checkpoint()[:300]),
        ["last.pt cannot be read"],
    ),
    "resume of a garbage checkpoint": (
        lambda tree, out: _resume_folder(out, b"not a checkpoint" * 10),
        ["last.pt cannot be read"],
    ),
    "resume of a foreign checkpoint": (
        lambda tree, out: _resume_folder(out, _valid_checkpoint()),
        ["is not a checkpoint of this trainer", "optimizer"],
    ),
    "global batch larger than the data": (
        lambda tree, out: tiny_run_args(tree, out, batch_size=512),
        [
            "config batch_size=512 (global): there are only 97 usable training images",
            "batch_size=N with N <= 97",
        ],
    ),
    "bf16 input on the CPU": (
        lambda tree, out: [*tiny_run_args(tree, out), "--input_dtype", "bf16"],
        ["--input_dtype bf16: needs CUDA with amp=true", "accepted here: auto or fp32"],
    ),
    "a config value out of range": (
        lambda tree, out: [*tiny_run_args(tree, out), "--set", "epochs=0"],
        ["epochs=0: must be an integer >= 1"],
    ),
}


@pytest.mark.parametrize("case", MISTAKES)
def test_a_mistake_is_one_line_exit_2_and_creates_nothing(case, webvision_tree, tmp_path, capsys):
    out = tmp_path / "runs"
    out.mkdir()
    flags, fragments = MISTAKES[case]
    argv = flags(webvision_tree[0], out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    status, stdout, err = run_main(argv, capsys)
    assert status == 2 and stdout == "" and err.count("\n") == 1, err
    assert err.startswith("python -m train.imagenet_scale: error: ") and "Traceback" not in err
    assert all(fragment in err for fragment in fragments), err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_a_mistake_in_a_fresh_process_exits_with_status_2(tmp_path):
    result = run_module(["--config", "nosuch", "--out_dir", str(tmp_path / "runs")], check=False)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert not (tmp_path / "runs").exists()
