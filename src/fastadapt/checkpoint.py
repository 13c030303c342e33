"""Checkpoints: written atomically, loaded without executing code."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch


def save_checkpoint(payload: dict, path) -> Path:
    """Write ``payload`` to ``path`` via a temporary file in the same folder and an atomic rename,
    so a crash mid-save (or a full disk) leaves the previous checkpoint intact."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as out:
                torch.save(payload, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    return path


def write_text(path, text: str) -> Path:
    """Write a small text file (``config.json``, ``test.json``) atomically, errors as ``writing``'s."""
    path = Path(path)
    with writing(path):
        temporary = path.with_name(f".{path.name}.tmp")
        try:
            temporary.write_text(text)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
    return path


class WriteFailed(OSError):
    """A run's file could not be written; the message names the file and the cause."""


_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
# torch.save reports a failed write as a RuntimeError from its zip writer, without an errno
_TORCH_WRITER = ("PytorchStreamWriter", "inline_container", "unexpected pos")


@contextlib.contextmanager
def writing(path):
    """Within the block, a failure to write ``path`` becomes one ``WriteFailed`` naming the file
    and its cause (a full disk, a read-only file system, a folder without write permission)."""
    path = Path(path)
    try:
        yield path
    except WriteFailed:
        raise
    except (OSError, RuntimeError) as error:
        code = getattr(error, "errno", None)
        if isinstance(error, RuntimeError) and not any(mark in str(error) for mark in _TORCH_WRITER):
            raise
        folder = path.parent
        try:
            free = shutil.disk_usage(folder if folder.exists() else Path.cwd()).free
        except OSError:
            free = None
        if code in _FULL or (code is None and free is not None and free < 16 * 2 ** 20):
            cause = "the disk is full" + (f" ({free / 2 ** 20:.1f} MiB free)" if free is not None else "")
        elif code == errno.EROFS:
            cause = "the file system is read-only"
        elif code in (errno.EACCES, errno.EPERM):
            cause = f"no permission to write in {folder}"
        elif code is not None:
            cause = error.strerror or str(error)
        else:
            cause = str(error).strip().splitlines()[-1]
        kept = f"; the previous {path.name} is intact" if path.suffix == ".pt" and path.is_file() else ""
        failure = WriteFailed(f"could not write {path}: {cause}{kept}")
        failure.errno = code or errno.EIO
        raise failure from error


def find_checkpoint(path, prefer: str = "best.pt") -> Path:
    """A checkpoint file as given, or in a run folder its ``prefer`` file (the validation-selected
    weights) when present, else ``last.pt``."""
    path = Path(path)
    if path.is_dir():
        return path / prefer if (path / prefer).is_file() else path / "last.pt"
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only, onto
    ``map_location`` (the CPU by default, so a run trained on a GPU loads anywhere)."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    expected = "expected a fastadapt checkpoint (a torch.save'd dict with 'model' and 'config')"
    payload = load_tensors(path, expected, map_location)
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        kind = f"a dict with keys {sorted(payload)[:6]}" if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path}: holds {kind}; {expected}")
    if not isinstance(payload["config"], dict):
        raise ValueError(f"{path}: its 'config' is a {type(payload['config']).__name__}, not a dict; {expected}")
    return payload


def load_tensors(path, expected: str, map_location="cpu"):
    """What ``torch.save`` wrote to ``path``, loaded with ``weights_only=True`` after the size
    check below; errors name the file and end with ``expected``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path}: the file is empty (0 bytes); {expected}")
    _check_inflated_size(path, size, expected)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if found is None:  # not a pickle of objects at all: bytes of another kind of file
            raise ValueError(f"{path}: cannot be read as a PyTorch checkpoint ({size} bytes of something "
                             f"else: no pickle in it); {expected}") from error
        raise ValueError(f"{path}: refused: it holds Python objects ({found.group(1)}) that loading would have to "
                         f"run, while a fastadapt checkpoint holds only tensors and plain values; {expected}") from error
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{path}: cannot be read as a PyTorch checkpoint ({size} bytes; truncated, or not "
                         f"one: {type(error).__name__}); {expected}") from error
    return payload


def _check_inflated_size(path: Path, size: int, expected: str) -> None:
    """Refuse, before anything is inflated, a zip whose entries unpack to far more than the file:
    ``torch.save`` stores its records uncompressed, so a checkpoint inflates to about its own size,
    while a crafted one (a "zip bomb") would take gigabytes of memory first."""
    try:
        with zipfile.ZipFile(path) as archive:
            inflated = sum(entry.file_size for entry in archive.infolist())
    except (zipfile.BadZipFile, OSError):
        return  # not a zip (an old-format checkpoint or another file): torch.load says what it is
    if inflated > 2 * size + (1 << 20):
        raise ValueError(f"{path}: refused: its records inflate to {inflated / 2 ** 20:,.0f} MiB from a "
                         f"{size / 2 ** 20:,.1f} MiB file, while a checkpoint stores them uncompressed; {expected}")


class RunLock:
    """A run folder is written by one run at a time: ``.lock`` in it holds the owner's process id.

    A lock whose process no longer exists (a run killed with SIGKILL) is taken over."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / ".lock"
        self.held = False

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def __enter__(self) -> "RunLock":
        with writing(self.path):
            self.folder.mkdir(parents=True, exist_ok=True)
            return self._take()

    def _take(self) -> "RunLock":
        for _ in range(3):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    owner = 0
                if owner and owner != os.getpid() and self._alive(owner):
                    raise RuntimeError(f"run folder {self.folder} is in use by process {owner} (see {self.path}); "
                                       "wait for it to finish, or pass another --out")
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            with os.fdopen(handle, "w") as out:
                out.write(f"{os.getpid()}\n")
            self.held = True
            return self
        raise RuntimeError(f"could not take {self.path}")

    def __exit__(self, *exc) -> None:
        """Release the lock. One that cannot be removed (the folder became read-only) is left to
        be taken over by the next run, which finds its process gone; the run's own error, if
        any, is what is reported."""
        if self.held:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as error:
                warnings.warn(f"could not remove {self.path} ({error.strerror}); the next run in "
                              f"{self.folder} takes it over", stacklevel=2)
            self.held = False


def built_in_python(state: dict) -> str:
    """For a load error: the network class a run was trained with, when it is not one of fastadapt's."""
    name = state.get("model_class") or ""
    if not name or name.startswith("fastadapt."):
        return ""
    return (f"; the run was trained on a network of your own ({name}): load it in Python with "
            f"Predictor.load(run, learner=...) or Trainer(...).resume(run), giving a learner on that network")
