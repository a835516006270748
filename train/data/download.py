"""Fetching dataset files where the user has internet; otherwise a clear error naming what is expected.

Kept apart from the parsers: nothing here runs in the tests (no network there); the parsers are tested
on small files written in the real formats.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import urllib.request
from pathlib import Path

from ..run_dirs import UserError

TIMEOUT_S = 60


class DatasetNotFound(UserError, FileNotFoundError):
    """The dataset files are missing and could not be downloaded (a user's mistake to fix: a UserError)."""


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(url: str, dest: Path, md5: str | None = None) -> Path:
    """Downloads url to dest (via a temporary file) and checks its md5 when one is given."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    print(f"downloading {url} -> {dest}")
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(tmp, "wb") as out:
        shutil.copyfileobj(response, out)
    if md5 is not None and md5sum(tmp) != md5:
        tmp.unlink()
        raise DatasetNotFound(f"{url}: md5 mismatch (expected {md5}); the download is corrupt, try again")
    tmp.replace(dest)
    return dest


def extract_tar(archive: Path, into: Path) -> None:
    if not hasattr(tarfile, "data_filter"):  # added in 3.10.12 / 3.11.4
        raise RuntimeError(
            f"extracting {archive} safely needs Python >= 3.10.12 / 3.11.4; extract it by hand"
        )
    with tarfile.open(archive) as tar:
        # the "data" filter refuses absolute paths, links out of the tree and device files
        tar.extractall(into, filter="data")


def ensure(present: bool, where: Path, files: list[str], download, allowed: bool, how: str) -> None:
    """Calls download() when the files are missing and downloading is allowed; raises DatasetNotFound
    naming the expected path, file names and source when they are still missing."""
    if present:
        return
    error = None
    if allowed:
        try:
            download()
            return
        except (OSError, DatasetNotFound) as exc:  # URLError is an OSError
            error = exc
    reason = f"download failed: {error}" if error else "downloading is off (download=false)"
    raise DatasetNotFound(
        f"dataset files not found under {where}: expected {', '.join(files)} ({reason}). {how}"
    )
