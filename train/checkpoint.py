"""Atomic checkpoints and RNG-state capture, shared by the trainer and train/imagenet_scale.py.

atomic_save writes to a temporary file in the same folder, fsyncs it and os.replace()s it over the
target: a crash or Ctrl-C mid-write leaves the previous checkpoint intact, never a torn file.
load_checkpoint reads with torch.load(weights_only=True): tensors, numbers, strings, lists, dicts only,
so every state stored here (RNG states included) is kept in those types. read_checkpoint is the same
for a file a user points at (--resume): a missing, truncated or foreign file is a UserError.
"""

from __future__ import annotations

import os
import pickle
import random
import struct
from pathlib import Path

import numpy as np
import torch

from .run_dirs import UserError


def atomic_save(obj, path: str | Path) -> Path:
    """torch.save(obj) to path atomically (temp file in the same directory + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


# what torch.load raises for damaged bytes: whatever its unpickler trips on (over 300 random files:
# UnpicklingError, IndexError, UnicodeDecodeError, EOFError, struct.error, KeyError), RuntimeError for a
# truncated zip archive
DAMAGED_FILE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    OSError,
    RuntimeError,
    IndexError,
    KeyError,
    ValueError,
    struct.error,
)


def read_checkpoint(path: str | Path, keys: tuple[str, ...], map_location="cpu") -> dict:
    """load_checkpoint(path), refusing with a UserError a file that is missing, cannot be unpickled
    (empty, truncated, not a torch file) or lacks one of `keys`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"{path} does not exist: nothing to continue from (a run with checkpoint=false, as the runs "
            "of sweep, clean, osr and demo789, drops it once finished)"
        )
    try:
        state = load_checkpoint(path, map_location)
    except DAMAGED_FILE_ERRORS as exc:
        # torch's messages run to a paragraph: the first sentence names the problem
        reason = str(exc).strip().split("\n")[0].split(". ")[0] or type(exc).__name__
        raise UserError(
            f"{path} cannot be read ({reason}): it is empty, truncated or not a checkpoint; "
            "start the run again (--overwrite)"
        ) from None
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(f"{path} is not a checkpoint of this trainer (no {missing})")
    return state


def capture_rng_state(generator: torch.Generator | None = None) -> dict:
    """Python, numpy (legacy global), torch CPU / CUDA and an optional generator's states, as tensors
    and plain Python values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])
