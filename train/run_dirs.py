"""Run folders: each claimed by exactly one process, never reused or mixed without being asked.

    claim_run_dir(parent, name)                      # an explicit --name: refuses an existing folder
    claim_run_dir(parent, name, overwrite=True)      # --overwrite: the old folder is removed first
    claim_run_dir(parent, stem, unique=True)         # a default name: stem, stem-2, stem-3, ...

The claim is os.mkdir without exist_ok, which the file system makes atomic: of two processes that
ask for the same folder at the same moment, one gets it and the other an error (or, for a default
name, the next free suffix). A folder is claimed only after everything was validated; if the run
then fails before it wrote anything, `discard_if_unused` removes it again.

A process that trains in a folder it may share with other processes (a multi-run command's runs_dir,
`train run --resume`) holds the folder's lock (`lock_run_dir`: an flock on its .lock file, which the
system releases when the process ends, however it ends): a folder whose lock is held is being trained
now, and no other process continues, reuses or clears it.

UserError is a user mistake: the commands print its one-line message and exit with status 2,
without a traceback (a bug still shows its traceback). It is a ValueError, so code that checked its
input with `except ValueError` / `pytest.raises(ValueError)` before UserError existed keeps working.
Interrupted is Ctrl-C with the one line that says what was kept and how to continue (exit status 130).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path


class UserError(ValueError):
    """A mistake of the user's (a bad flag, value, name or path): one line, exit status 2."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, carrying the one line for the user (str(exc)): what the interrupted work kept, and the
    command that continues it. train/cli.py prints it and exits with status 130."""


LOCK = ".lock"  # in a run folder: the file whose flock the process training there holds


def lock_run_dir(run_dir: str | Path) -> int | None:
    """Takes run_dir's lock without waiting; the open file descriptor that holds it (release it with
    unlock_run_dir), or None when another process holds it. The lock file stays: removing it would let
    a second process lock a new file while the first still holds the old one."""
    import fcntl  # POSIX; the harness runs on Linux and macOS

    fd = os.open(Path(run_dir) / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def unlock_run_dir(fd: int) -> None:
    os.close(fd)  # closing the descriptor releases its flock


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def config_hash(resolved: dict, length: int = 6) -> str:
    """A short hash of a resolved config (a dict of JSON values): equal configs, equal hashes."""
    text = json.dumps(resolved, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def claim_run_dir(parent: str | Path, name: str, *, unique: bool = False, overwrite: bool = False) -> Path:
    """Creates and returns parent/name, which no other process can claim after this.

    unique: name is a default stem; when parent/name exists (an earlier run, or one started in the
    same second), parent/name-2, name-3, ... is claimed instead. Otherwise an existing folder is a
    UserError, unless overwrite=True, which removes it first.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / name
    if overwrite and not unique and path.exists():
        shutil.rmtree(path)
    for attempt in range(1, 10_000):
        candidate = path if attempt == 1 else parent / f"{name}-{attempt}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            if not unique:
                raise UserError(
                    f"run folder {candidate} already exists: choose another --name, continue it with "
                    f"--resume {candidate}, or replace it with --overwrite"
                ) from None
    raise UserError(f"no free run folder name for {path} (tried {name}-2 ... {name}-9999)")


def discard_if_unused(run_dir: Path, keep: tuple[str, ...] = ()) -> None:
    """Removes run_dir when it holds nothing but the files named in `keep` (e.g. a log that only
    says why the run failed to start is not worth a folder): a failed start leaves no half-made run."""
    run_dir = Path(run_dir)
    if run_dir.is_dir() and all(p.name in (*keep, LOCK) for p in run_dir.iterdir()):
        shutil.rmtree(run_dir)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Writes text to path through a temporary file in the same folder and os.replace: a reader (or a
    crash) never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
