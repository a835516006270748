"""The runs of a multi-run command (sweep, clean, osr, demo789): each planned run's folder is found or
claimed right before the run starts, and a job cut by Ctrl-C continues when the same command runs again.

    with Job(continue_with, runs_dir) as job:
        planned = [job.plan(parent, f"s{seed}", same_run, finished) for ... in the plan]
        print(job.counts())                      # "8 runs: 2 reused, 1 continued ..., 5 to run"
        for p in planned:
            slot = job.claim(p)                  # the folder, locked while the run trains in it
            ... train slot.run_dir unless slot.state == "reused" (from its last.pt when "continue") ...
            job.release(slot)

Which folder a planned run takes: parent/stem, stem-2, stem-3, ... in that order, the first that holds
the same run (same_run: its config.json, and whatever else names the run, equals the plan's) and that
no other process is training (run_dirs.lock_run_dir):

    finished (finished(run_dir))                 reused as it is
    cut, with a readable last.pt                 continued in place, from that checkpoint
    never checkpointed, or with no config.json   cleared and trained in (what a killed process left)

A folder of another run, or one that another process holds, is left alone (a line says why); when no
folder fits, a fresh one is claimed after them. So the same command run again reuses what finished,
continues what was cut, and never makes a second folder of a run (no s1-2 beside a cut s1). A folder is
locked only while its run trains (at most --jobs at a time: a job of thousands of runs would otherwise
hold thousands of open files).

At its end, however it ends, the job removes a folder it claimed in which no run began (no last.pt, not
finished), with the folders above it up to runs_dir left empty. Ctrl-C ends the job with
run_dirs.Interrupted: one line that says how many runs finished, which are cut (and the epoch their
last.pt holds) and `continue_with`, the command that continues the job.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import read_checkpoint
from .config import Config, resolved
from .grid import PlannedRun
from .run_dirs import LOCK, Interrupted, UserError, claim_run_dir, lock_run_dir, unlock_run_dir
from .trainer import CHECKPOINT, CHECKPOINT_KEYS

SUMMARY = "summary.json"  # experiment.run_experiment's last output: a run with it finished


@dataclass
class Slot:
    """A planned run's folder. state: "reused" (finished before this job), "continue" (cut: continues
    from its last.pt) or "new" (trains from the start)."""

    run_dir: Path
    state: str
    lock: int | None = None  # the descriptor holding the folder's lock while the run trains


@dataclass
class Planned:
    """A planned run: where its folder is looked for, how its folder is recognised, and where it stands."""

    parent: Path
    stem: str
    same_run: Callable[[Path], str | None]  # None when the folder holds this run, else why not
    finished: Callable[[Path], bool]
    preview: Slot | None  # what the job's start saw (counts); None: a fresh folder
    slot: Slot | None = None  # once claimed


def same_json(run_dir: Path, expected: dict[str, dict]) -> str | None:
    """None when every file named in `expected` (config.json, ...) holds that JSON in run_dir, else the
    reason it does not (for the line that says why a folder was left alone)."""
    for name, wanted in expected.items():
        what = name.removesuffix(".json")
        try:
            stored = json.loads((run_dir / name).read_text())
        except FileNotFoundError:
            return f"no {name} (unfinished, or running now)"
        except (OSError, json.JSONDecodeError) as exc:
            return f"its {name} is unreadable ({exc})"
        if stored != wanted:
            changed = [k for k in wanted if stored.get(k) != wanted[k]] + sorted(set(stored) - set(wanted))
            return f"its {what} differs: " + ", ".join(
                f"{k} {stored.get(k)!r} (wanted {wanted.get(k)!r})" for k in changed[:4]
            )
    return None


def _candidates(parent: Path, stem: str) -> list[Path]:
    """parent/stem, stem-2, stem-3, ... as they exist, in that order."""

    def suffix(path: Path) -> int | None:
        tail = path.name[len(stem) + 1 :]
        return 1 if path.name == stem else int(tail) if tail.isdigit() else None

    found = [p for p in [parent / stem, *parent.glob(f"{stem}-*")] if p.is_dir() and suffix(p)]
    return sorted(found, key=suffix)


def _state(path: Path, run: Planned) -> tuple[str | None, str]:
    """What the planned run would do with the folder path, as it reads now: (state, "") or (None, why it
    holds another run, never to be touched)."""
    reason = run.same_run(path)
    if reason is not None:
        started = any((path / name).exists() for name in ("config.json", CHECKPOINT))
        return (None, reason) if started else ("new", "")
    if run.finished(path):
        return "reused", ""
    return ("continue" if (path / CHECKPOINT).is_file() else "new"), ""


def _held(path: Path) -> bool:
    """Whether another process holds path's lock (it is training there now)."""
    lock = lock_run_dir(path)
    if lock is not None:
        unlock_run_dir(lock)
    return lock is None


def _clear(run_dir: Path) -> None:
    """Everything in run_dir but its lock file (held by this process)."""
    for path in run_dir.iterdir():
        if path.name != LOCK:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


class Job:
    def __init__(self, continue_with: str, runs_dir: Path):
        self.continue_with, self.runs_dir = continue_with, Path(runs_dir)
        self.planned: list[Planned] = []

    def __enter__(self) -> Job:
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        interrupted = kind is not None and issubclass(kind, KeyboardInterrupt)
        line = self._interrupted_line() if interrupted else None  # before unstarted folders go
        for run in self.planned:
            if run.slot is not None:
                self.release(run.slot)
                started = (run.slot.run_dir / CHECKPOINT).is_file() or run.finished(run.slot.run_dir)
                if run.slot.state == "new" and not started:
                    shutil.rmtree(run.slot.run_dir, ignore_errors=True)
                    self._remove_empty_folders(run.slot.run_dir.parent)
        if line:
            raise Interrupted(line) from None
        return False

    def plan(self, parent: Path, stem: str, same_run, finished) -> Planned:
        """A planned run (same_run, finished: see Planned), with the folder it would take now."""
        run = Planned(parent, stem, same_run, finished, None)
        for path in _candidates(parent, stem):
            state, _ = _state(path, run)
            if state is not None and (state == "reused" or not _held(path)):
                run.preview = Slot(path, state)
                break
        self.planned.append(run)
        return run

    def counts(self) -> str:
        states = [run.preview.state if run.preview else "new" for run in self.planned]
        return (
            f"{len(states)} run{'s' * (len(states) != 1)}: {states.count('reused')} reused, "
            f"{states.count('continue')} continued from their checkpoint, {states.count('new')} to run"
        )

    def claim(self, run: Planned) -> Slot:
        """The folder of a planned run (module docstring), locked unless reused; prints why a folder was
        left alone. What the job's start saw may have changed: another job may have finished the run."""
        for path in _candidates(run.parent, run.stem):
            state, reason = _state(path, run)
            if state is None:
                print(f"{path}: not reused, {reason}", flush=True)
                continue
            if state == "reused":
                print(f"{path}: reused (finished, same config)", flush=True)
                run.slot = Slot(path, state)
                return run.slot
            lock = lock_run_dir(path)
            if lock is None:
                print(f"{path}: not reused, another process is training it now", flush=True)
                continue
            if _state(path, run)[0] != state:  # changed before the lock was taken: look again
                unlock_run_dir(lock)
                return self.claim(run)
            if state == "continue":
                try:
                    read_checkpoint(path / CHECKPOINT, CHECKPOINT_KEYS)
                    for stale in path.glob(".*.tmp"):  # a checkpoint write cut by a kill
                        stale.unlink()
                except UserError as exc:
                    print(f"{path}: trained again from the start ({exc})", flush=True)
                    state = "new"
            if state == "new":
                _clear(path)
            run.slot = Slot(path, state, lock)
            return run.slot
        while True:  # None: between our mkdir and our lock, another job took the empty folder over
            path = claim_run_dir(run.parent, run.stem, unique=True)
            lock = lock_run_dir(path)
            if lock is not None:
                run.slot = Slot(path, "new", lock)
                return run.slot

    @staticmethod
    def release(slot: Slot) -> None:
        """Unlocks a claimed folder (its run ended)."""
        if slot.lock is not None:
            unlock_run_dir(slot.lock)
            slot.lock = None

    def _interrupted_line(self) -> str:
        finished, reused, cut = 0, 0, []
        for run in self.planned:
            slot = run.slot or run.preview
            if slot is not None and run.finished(slot.run_dir):
                finished += 1
                reused += slot.state == "reused"
            elif slot is not None and (slot.run_dir / CHECKPOINT).is_file():
                try:
                    epoch = read_checkpoint(slot.run_dir / CHECKPOINT, ("epoch",))["epoch"]
                    cut.append(f"{slot.run_dir} (its last.pt holds epoch {epoch})")
                except UserError:
                    cut.append(f"{slot.run_dir} (its last.pt cannot be read: it starts again)")
        return (
            f"interrupted: {finished} of {len(self.planned)} runs finished"
            + (f" ({reused} reused)" if reused else "")
            + f"; cut: {', '.join(cut) or 'none'}; continue with: {self.continue_with}"
        )

    def _remove_empty_folders(self, folder: Path) -> None:
        """folder and the folders above it up to runs_dir (included), while they are empty."""
        root = self.runs_dir.resolve()
        while folder.resolve() == root or root in folder.resolve().parents:
            if not folder.is_dir() or any(folder.iterdir()):
                return
            folder.rmdir()
            folder = folder.parent


def plan_experiment(job: Job, run: PlannedRun, runs_dir: Path) -> Planned:
    """job.plan for a run of grid.plan_runs (sweep, clean) under runs_dir/<loss>[<point>]/<noise>/s<seed>:
    the same run has an equal config.json; a finished one has a summary.json after cfg.epochs epochs."""
    wanted = {"config.json": resolved(run.cfg)}

    def finished(run_dir: Path) -> bool:
        try:
            return json.loads((run_dir / SUMMARY).read_text()).get("epochs") == run.cfg.epochs
        except (OSError, json.JSONDecodeError):
            return False

    return job.plan(runs_dir / run.folder, f"s{run.seed}", lambda d: same_json(d, wanted), finished)


def train_planned(cfg: Config, run_dir: Path, state: str, continue_with: str) -> dict:
    """The summary of a claimed run (a Slot's run_dir and state; plain values, so that a worker process
    can take them): read back when reused; else trained, from its last.pt when it was cut."""
    from .experiment import run_experiment

    if state == "reused":
        return json.loads((run_dir / SUMMARY).read_text())
    resume = state == "continue"
    return run_experiment(
        cfg, run_dir, resume=resume, quiet=True, progress=False, continue_with=continue_with
    ).summary


# how long a stopped worker may take to end its run (write its log line) before it is killed
STOP_SECONDS = 60


class Workers:
    """`size` worker processes (spawned, one CPU thread each: tiny models train fastest so) that run
    train_planned for a job's runs, one run each at a time (`train sweep --jobs`).

    Ctrl-C is this process's alone: leaving the `with` block with it (or an error) stops the workers with
    SIGTERM, which ends a run as Ctrl-C would (its last.pt kept, its train.log saying how to continue)
    and the worker quietly. A worker that dies (killed, out of memory) is an error naming its run, never
    a wait for a result that cannot come.
    """

    def __init__(self, size: int):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.idle, self.busy = [], {}  # busy: worker -> the key of its run
        for _ in range(size):
            parent_end, child_end = context.Pipe()
            worker = context.Process(target=_serve, args=(child_end,), daemon=True)
            worker.start()
            child_end.close()
            self.idle.append((worker, parent_end))

    def submit(self, key, *args) -> None:
        """train_planned(*args) on an idle worker; its result comes back with `key` (next_result)."""
        worker, conn = self.idle.pop()
        conn.send(args)
        self.busy[worker, conn] = key

    def next_result(self) -> tuple:
        """(key, train_planned's result) of the next run to end; a run's error is raised here."""
        from multiprocessing.connection import wait

        ends = {end: (worker, conn) for worker, conn in self.busy for end in (conn, worker.sentinel)}
        ready = wait(list(ends))
        worker, conn = ends[ready[0]]
        key = self.busy.pop((worker, conn))
        if not conn.poll():
            raise RuntimeError(f"the worker process training {key} died (exit status {worker.exitcode})")
        ok, value = conn.recv()
        if not ok:
            raise value if isinstance(value, UserError) else RuntimeError(f"the run {key} failed:\n{value}")
        self.idle.append((worker, conn))
        return key, value

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        """Done: the workers see their pipes close and return. Otherwise (Ctrl-C, an error): SIGTERM ends
        an idle worker at once and a busy one once its run stopped as after Ctrl-C."""
        for worker, _ in [*self.idle, *self.busy]:
            if kind is not None and worker.is_alive():
                worker.terminate()  # before its pipe closes: a worker that returned must not get it
        for worker, conn in [*self.idle, *self.busy]:
            conn.close()
            worker.join(STOP_SECONDS)
            if worker.is_alive():  # stuck where no signal reaches Python: its last.pt is intact anyway
                worker.kill()
        return False


def _serve(conn) -> None:
    """A worker's loop: runs train_planned(*args) for each args received, until the pipe closes."""
    import signal
    import sys
    import traceback

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the job's process's (Workers)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # Workers stopping: a run ends as after Ctrl-C
    try:
        import torch

        torch.set_num_threads(1)
        while True:
            try:
                args = conn.recv()
            except EOFError:
                return
            try:
                conn.send((True, train_planned(*args)))
            except UserError as exc:
                conn.send((False, exc))
            except Exception:  # a bug: its traceback goes back to the job, which raises it
                conn.send((False, traceback.format_exc()))
    except KeyboardInterrupt:
        sys.exit(130)  # SystemExit: no traceback, and the process's finalizers run (semaphores unlinked)
