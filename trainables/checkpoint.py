"""Checkpoints: everything needed to resume a run bit for bit.

A checkpoint is one ``torch.save`` file holding the model, optimiser and
schedule state, the epoch, every RNG state the run uses, the config, the
per-epoch history and the best validation score so far. It contains only
tensors and plain Python data, so it loads with ``weights_only=True``: a
checkpoint from someone else cannot run code.
"""

from __future__ import annotations

import os
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
    """Write ``payload`` atomically (temp file + rename) so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **payload}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``.

    Raises:
        CheckpointError: the file is missing, truncated, or not an energy-study checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
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
