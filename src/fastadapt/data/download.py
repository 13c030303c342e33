"""Verified downloads and safe extraction."""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
import zipfile
from pathlib import Path


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, destination: Path, checksum: str, timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``destination`` and verify ``checksum`` (``"sha256:<hex>"`` or ``"md5:<hex>"``).

    The file is written under a temporary name and renamed only once verified, so a failed or
    tampered download never leaves a file that looks complete.
    """
    algorithm, _, expected = checksum.partition(":")
    if algorithm not in ("sha256", "md5") or not expected:
        raise ValueError(f"checksum must be 'sha256:<hex>' or 'md5:<hex>', got {checksum!r}")
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
        actual = file_digest(partial, algorithm)
        if actual != expected.lower():
            raise ValueError(f"{url}: {algorithm} checksum mismatch (expected {expected}, got {actual}); "
                             f"the download was discarded")
        os.replace(partial, destination)
    finally:
        if partial.exists():
            partial.unlink()
    return destination


def extract_zip(archive: Path, target: Path) -> Path:
    """Extract ``archive`` into ``target``, refusing any entry that would land outside it."""
    target = Path(target).resolve()
    with zipfile.ZipFile(archive) as zf:
        for member in zf.infolist():
            destination = (target / member.filename).resolve()
            if destination != target and target not in destination.parents:
                raise ValueError(f"{archive}: entry {member.filename!r} would be extracted outside {target}; "
                                 "refusing to extract")
        zf.extractall(target)
    return target
