"""List validation before training: every listed file is checked, missing and corrupt ones are counted,
reported and dropped, so nothing fails mid-epoch (a corrupt JPEG aborts a DALI pipeline).

Levels (--check):
    none     trust the lists
    exists   the file is there (a stat per file)
    header   PIL parses the header (format and size): catches empty, garbage and non-image files
    decode   PIL decodes the JPEG at 1/8 scale (draft mode: every entropy-coded block is still read,
             so truncated and damaged files fail) -- the default

The work is sharded over the ranks (rank r checks entries r, r + W, ...) and a thread pool per rank
(Pillow releases the GIL while decoding); the ranks then gather the verdicts. Verdicts are cached per
list and level in the user's cache folder (default_cache_dir) together with each file's size and
modification time: a later run stats every file and decodes again only those whose size or time
changed, so a file damaged or deleted since the last check is found again (a verdict keyed by the
list alone said "fine" for it, and the run died mid-epoch). Measured cost on 2 CPU cores, 2 threads:
see docs/scale.md (list validation).
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..checkpoint import atomic_save, read_checkpoint
from ..run_dirs import UserError
from .distributed import DistContext, all_gather_objects, broadcast_object
from .lists import ImageList

LEVELS = ("none", "exists", "header", "decode")
DRAFT_SIZE = (32, 32)
FINE, MISSING, CORRUPT = 0, 1, 2
CACHE_COLUMNS = ("size", "mtime_ns", "verdict")
VERDICTS = {None: FINE, "missing": MISSING, "corrupt": CORRUPT}


class DataFileError(Exception):
    """A data file that passed the check could not be read during training (it changed since, or the
    storage failed): one line for the user, no traceback."""


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/drainage_fast/list_checks (default ~/.cache/...): outside the source tree and the
    run folders, shared by all runs on the same lists."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "drainage_fast" / "list_checks"


def check_file(path: str, level: str) -> str | None:
    """None if the file passes `level`, else "missing" or "corrupt"."""
    if not os.path.isfile(path):
        return "missing"
    if level == "exists":
        return None
    try:
        with Image.open(path) as image:
            if level == "decode":
                image.draft("RGB", DRAFT_SIZE)
                image.load()
            elif image.width < 1 or image.height < 1:
                return "corrupt"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return "corrupt"
    return None


def file_stamp(path: str) -> tuple[int, int]:
    """(size, mtime_ns) of a regular file, (-1, -1) when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return (st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else (-1, -1)


@dataclass
class CheckResult:
    name: str
    listed: int
    missing: list[int]
    corrupt: list[int]
    seconds: float
    rechecked: int = -1  # files opened this time; -1: no earlier verdicts (a full check)

    @property
    def bad(self) -> int:
        return len(self.missing) + len(self.corrupt)

    @property
    def cached(self) -> bool:
        return self.rechecked == 0


def _check_shard(
    paths: list[str], level: str, rank: int, world: int, threads: int, cached: dict | None
) -> dict:
    """This rank's entries: stamps and verdicts, reusing a cached verdict when the stamp is unchanged."""
    mine = np.arange(rank, len(paths), world)

    def verdict(i: int) -> tuple[int, int, int, bool]:
        size, mtime = file_stamp(paths[i])
        if size < 0:
            return size, mtime, MISSING, False
        if cached is not None and cached["size"][i] == size and cached["mtime_ns"][i] == mtime:
            return size, mtime, int(cached["verdict"][i]), False
        return size, mtime, VERDICTS[check_file(paths[i], level)], True

    with ThreadPoolExecutor(max(1, threads)) as pool:
        rows = np.asarray(list(pool.map(verdict, mine.tolist())), dtype=np.int64).reshape(-1, 4)
    return {
        "index": mine,
        "size": rows[:, 0],
        "mtime_ns": rows[:, 1],
        "verdict": rows[:, 2].astype(np.int8),
        "opened": int(rows[:, 3].sum()),
    }


def _cache_path(cache_dir: Path, images: ImageList, level: str) -> Path:
    digest = hashlib.sha1(f"{level}\n{images.root}\n".encode())
    digest.update("\n".join(images.paths).encode())
    return cache_dir / f"{images.name}-{level}-{digest.hexdigest()[:16]}.pt"


def _read_cache(path: Path, n: int) -> dict | None:
    """The cached stamps and verdicts, or None when absent, unreadable or for another list length."""
    try:
        stored = read_checkpoint(path, CACHE_COLUMNS)
    except UserError:  # absent, damaged or of another format: check again
        return None
    cached = {k: stored[k].numpy() for k in CACHE_COLUMNS}
    return cached if all(len(v) == n for v in cached.values()) else None


def _write_cache(path: Path, columns: dict) -> None:
    try:
        atomic_save({k: torch.from_numpy(v) for k, v in columns.items()}, path)
    except OSError:
        pass  # a read-only cache folder only costs the next run a full check


def check_list(
    images: ImageList, level: str, ctx: DistContext, cache_dir: Path | None, threads: int
) -> CheckResult:
    """Checks every file of `images` (sharded over ranks); the same CheckResult on every rank."""
    if level not in LEVELS:
        raise ValueError(f"check level must be one of {LEVELS}, got {level!r}")
    if level == "none":
        return CheckResult(images.name, len(images), [], [], 0.0)
    cache = _cache_path(cache_dir, images, level) if cache_dir else None
    cached = _read_cache(cache, len(images)) if ctx.is_main and cache else None
    cached = broadcast_object(cached, ctx)  # rank 0's verdicts on every rank: all ranks judge alike
    start = time.perf_counter()
    parts = all_gather_objects(
        _check_shard(images.absolute_paths(), level, ctx.rank, ctx.world_size, threads, cached), ctx
    )
    columns = {
        "size": np.zeros(len(images), np.int64),
        "mtime_ns": np.zeros(len(images), np.int64),
        "verdict": np.zeros(len(images), np.int8),
    }
    for part in parts:
        for key, column in columns.items():
            column[part["index"]] = part[key]
    opened = sum(p["opened"] for p in parts)
    if (
        ctx.is_main
        and cache
        and (cached is None or not all(np.array_equal(columns[k], cached[k]) for k in columns))
    ):
        _write_cache(cache, columns)
    verdicts = columns["verdict"]
    return CheckResult(
        images.name,
        len(images),
        np.flatnonzero(verdicts == MISSING).tolist(),
        np.flatnonzero(verdicts == CORRUPT).tolist(),
        time.perf_counter() - start,
        rechecked=-1 if cached is None else opened,
    )


def describe(result: CheckResult, images: ImageList, examples: int = 3) -> str:
    """One readable line, e.g. "webvision_train: 300 listed, 1 missing, 2 corrupt -> 297 used (...)"."""
    if result.cached:
        how = "cached check"
    elif result.rechecked > 0:
        how = (
            f"{result.rechecked} new or changed file(s) checked in {result.seconds:.1f}s, "
            f"{result.listed - result.rechecked} cached"
        )
    else:
        how = f"checked in {result.seconds:.1f}s"
    line = (
        f"{result.name}: {result.listed} listed, {len(result.missing)} missing, "
        f"{len(result.corrupt)} corrupt "
        f"-> {result.listed - result.bad} used ({how})"
    )
    for kind, index in (("missing", result.missing), ("corrupt", result.corrupt)):
        if index:
            line += (
                f"; {kind}: "
                + ", ".join(images.paths[i] for i in index[:examples])
                + (" ..." if len(index) > examples else "")
            )
    return line


def drop_bad(images: ImageList, result: CheckResult, max_bad_fraction: float) -> ImageList:
    """The list without its missing and corrupt entries. A UserError when more than max_bad_fraction of it
    is bad: that is a wrong data root or a broken copy, not web noise."""
    if result.listed and result.bad / result.listed > max_bad_fraction:
        raise UserError(
            f"--max_bad_fraction {max_bad_fraction}: exceeded, {describe(result, images)}; is the data "
            f"root {images.root} right? (a higher --max_bad_fraction trains on what is left)"
        )
    keep = np.ones(len(images), dtype=bool)
    keep[result.missing + result.corrupt] = False
    return images.subset(keep)
