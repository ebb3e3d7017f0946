"""Content hashes of files: what fingerprints, caches and sidecars record (hashlib only)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

#: Hex digits kept of a sha256 (64 bits: enough to tell files apart, short enough to read).
DIGITS = 16


def sha256_of_files(paths: Iterable[str | Path], digits: int = DIGITS) -> str:
    """sha256 over the bytes of ``paths`` in order (first ``digits`` hex digits; 64 = all of it, what an
    integrity check needs); OSError if one cannot be read. Reads 4 MB at a time, so any file size takes
    constant memory."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:digits]
