"""List validation before training: every listed file is checked once, missing and corrupt ones are
counted, reported and dropped, so nothing fails mid-epoch (a corrupt JPEG aborts a DALI pipeline).

Levels (--check):
    none     trust the lists
    exists   the file is there (a stat per file)
    header   PIL parses the header (format and size): catches empty, garbage and non-image files
    decode   PIL decodes the JPEG at 1/8 scale (draft mode: every entropy-coded block is still read,
             so truncated and damaged files fail) -- the default

The work is sharded over the ranks (rank r checks entries r, r + W, ...) and a thread pool per rank
(Pillow releases the GIL while decoding); the ranks then gather the bad entries. The result is cached
per list content and level in <out_dir>/list_checks/, so a restart or a later run skips the check.
Measured cost on 2 CPU cores, 2 threads: see README "Large-scale training" (list validation).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .distributed import DistContext, all_gather_objects, broadcast_object
from .lists import ImageList

LEVELS = ("none", "exists", "header", "decode")
DRAFT_SIZE = (32, 32)


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


@dataclass
class CheckResult:
    name: str
    listed: int
    missing: list[int]
    corrupt: list[int]
    seconds: float
    cached: bool = False

    @property
    def bad(self) -> int:
        return len(self.missing) + len(self.corrupt)


def _check_shard(paths: list[str], level: str, rank: int, world: int, threads: int) -> dict[str, list[int]]:
    mine = range(rank, len(paths), world)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        verdicts = list(pool.map(lambda i: check_file(paths[i], level), mine))
    found = {"missing": [], "corrupt": []}
    for i, verdict in zip(mine, verdicts):
        if verdict is not None:
            found[verdict].append(i)
    return found


def _cache_path(cache_dir: Path, images: ImageList, level: str) -> Path:
    digest = hashlib.sha1(f"{level}\n{images.root}\n".encode())
    digest.update("\n".join(images.paths).encode())
    return cache_dir / f"{images.name}-{level}-{digest.hexdigest()[:16]}.json"


def check_list(images: ImageList, level: str, ctx: DistContext, cache_dir: Path | None, threads: int) -> CheckResult:
    """Checks every file of `images` (sharded over ranks); the same CheckResult on every rank."""
    if level not in LEVELS:
        raise ValueError(f"check level must be one of {LEVELS}, got {level!r}")
    if level == "none":
        return CheckResult(images.name, len(images), [], [], 0.0)
    cache = _cache_path(cache_dir, images, level) if cache_dir else None
    cached = json.loads(cache.read_text()) if ctx.is_main and cache and cache.is_file() else None
    cached = broadcast_object(cached, ctx)  # rank 0 decides, so all ranks take the same branch
    if cached is not None:
        return CheckResult(images.name, len(images), cached["missing"], cached["corrupt"], cached["seconds"], True)
    start = time.perf_counter()
    paths = images.absolute_paths()
    parts = all_gather_objects(_check_shard(paths, level, ctx.rank, ctx.world_size, threads), ctx)
    missing = sorted(i for p in parts for i in p["missing"])
    corrupt = sorted(i for p in parts for i in p["corrupt"])
    result = CheckResult(images.name, len(images), missing, corrupt, time.perf_counter() - start)
    if ctx.is_main and cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"missing": missing, "corrupt": corrupt, "seconds": result.seconds}))
        os.replace(tmp, cache)
    return result


def describe(result: CheckResult, images: ImageList, examples: int = 3) -> str:
    """One readable line, e.g. "webvision_train: 300 listed, 1 missing, 2 corrupt -> 297 used (...)"."""
    line = (f"{result.name}: {result.listed} listed, {len(result.missing)} missing, {len(result.corrupt)} corrupt "
            f"-> {result.listed - result.bad} used ({'cached check' if result.cached else f'checked in {result.seconds:.1f}s'})")
    for kind, index in (("missing", result.missing), ("corrupt", result.corrupt)):
        if index:
            line += f"; {kind}: " + ", ".join(images.paths[i] for i in index[:examples]) + (" ..." if len(index) > examples else "")
    return line


def drop_bad(images: ImageList, result: CheckResult, max_bad_fraction: float) -> ImageList:
    """The list without its missing and corrupt entries. Raises ValueError when more than
    max_bad_fraction of it is bad: that is a wrong data_root or a broken copy, not web noise."""
    if result.listed and result.bad / result.listed > max_bad_fraction:
        raise ValueError(f"{describe(result, images)}: more than max_bad_fraction={max_bad_fraction} of the list is "
                         f"unusable; is the data root {images.root} right?")
    keep = np.ones(len(images), dtype=bool)
    keep[result.missing + result.corrupt] = False
    return images.subset(keep)
