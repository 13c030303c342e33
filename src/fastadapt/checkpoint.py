"""Checkpoints: written atomically, loaded without executing code."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def save_checkpoint(payload: dict, path) -> Path:
    """Write ``payload`` to ``path`` via a temporary file in the same folder and an atomic rename,
    so a crash mid-save leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            torch.save(payload, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path


def find_checkpoint(path, prefer: str = "best.pt") -> Path:
    """A checkpoint file as given, or in a run folder its ``prefer`` file (the validation-selected
    weights) when present, else ``last.pt``."""
    path = Path(path)
    if path.is_dir():
        return path / prefer if (path / prefer).is_file() else path / "last.pt"
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or unsafe files
        raise ValueError(f"{path}: not a loadable fastadapt checkpoint ({error})") from error
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise ValueError(f"{path}: not a fastadapt checkpoint (no model/config entries)")
    return payload
