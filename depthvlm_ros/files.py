"""Writing files so that a kill, a full disk or an error never leaves a half-written one in place.

Every report, summary and sidecar the package writes goes through :func:`write_text_atomic`: the text
goes to a temporary file beside the target, is flushed to disk, and then replaces the target in one
rename. Readers see the old file or the new one, never a mix; on any error the old file is untouched.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from depthvlm_ros.errors import InputError


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename in it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, rename); InputError (one line) when the
    file cannot be written, e.g. a full disk or a missing folder. The previous file is kept on error."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    except OSError as exc:
        raise InputError(f"cannot write {path} ({exc.strerror or exc})") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path
