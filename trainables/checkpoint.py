"""Checkpoints: everything needed to resume a run bit for bit.

A checkpoint is one ``torch.save`` file holding the model, optimiser and
schedule state, the epoch, every RNG state the run uses, the config, the
per-epoch history and the best validation score so far. It contains only
tensors and plain Python data, so it loads with ``weights_only=True``: a
checkpoint from someone else cannot run code.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import torch

from trainables.errors import CheckpointError

FORMAT = "energy-study/checkpoint-v1"


def rng_state() -> dict[str, Any]:
    """The global RNG states the training loop draws from (torch CPU and CUDA, Python)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_as_tuple(v) for v in value)
    return value


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` atomically, so that a process killed mid-write never leaves
    half a file where a resume would read it.

    The bytes go to a temporary file of this process (``<name>.<pid>.tmp``), are
    flushed to the disk (``fsync``), and the file is renamed over ``path`` (atomic on
    POSIX); the folder is synced too, so the rename survives a power cut.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save({"format": FORMAT, **payload}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - a folder that cannot be opened (some network disks)
        return path
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
    return path


#: What ``torch.load(weights_only=True)`` says when a file names a Python object it
#: refuses to build (any other unpickling error is a damaged or foreign file).
_REFUSED = ("Unsupported global", "not an allowed global")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, refused (it holds
            Python objects other than tensors and plain data, which could run code when
            unpickled: never loaded), or not an energy-study checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        if isinstance(exc, pickle.UnpicklingError) and any(r in str(exc) for r in _REFUSED):
            raise CheckpointError(
                f"checkpoint {str(path)!r} refused: the file holds Python objects other than "
                "tensors and plain data (loading it could run code); it was not loaded. "
                "Use a checkpoint written by energy-study, or re-save the weights alone"
            ) from None
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); the file is corrupt or "
            "truncated, or not a checkpoint: start again without --resume or pick another file"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not an energy-study checkpoint (no {FORMAT!r} marker)"
        )
    return data
