"""The on-disk cache of on-demand ONNX exports, and the two ways of filling it.

Exports made on first use live in ``$DEPTHVLM_CACHE/exports/<model>-<fingerprint>/depth_WxH_fp32.onnx``
with their report, probe and external data beside them. The cache is bounded: after each new export
the least recently used graphs are deleted until at most ``DEPTHVLM_EXPORT_CACHE_MAX_GRAPHS``
(default 16) graphs and ``DEPTHVLM_EXPORT_CACHE_MAX_GB`` (default 20) gigabytes remain; the newest
graph always stays. A graph counts as used when a backend takes it from the cache. Leftovers of
exports that failed their parity check (``*.failed``) or were killed (``.*.partial`` older than
an hour) are deleted too.

- :class:`InProcessExporter` exports in the calling process and waits: the tools, where the user
  asked for this size and waits for it anyway.
- :class:`SubprocessExporter` runs the export worker (``python -m depthvlm_ros.backends.onnx_export``)
  as a separate, lower-priority process and waits for it: the node's background thread uses it, so
  neither the node's frame path nor its memory carries an export; :meth:`~SubprocessExporter.cancel`
  stops a running export when the node shuts down (the worker cleans up its staging folder, and
  ends by itself if the node dies).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from depthvlm_ros.backends.base import BackendError
from depthvlm_ros.backends.probe import PROBE_SUFFIX

#: Defaults of the cache bounds (environment variables override them).
MAX_CACHED_GRAPHS = 16
MAX_CACHE_GB = 20.0
#: A background export that takes longer than this is killed (the 4B model exports in minutes).
EXPORT_TIMEOUT_S = 3600.0
#: A staging folder (``.NAME.partial``) untouched this long belongs to an export that was killed.
STALE_PARTIAL_S = 3600.0
#: How long a cancelled export gets to clean up after SIGTERM before it is killed.
CANCEL_GRACE_S = 10.0
#: Files that belong to an exported graph ``X.onnx`` (besides the graph itself).
_COMPANIONS = (".json", ".data", PROBE_SUFFIX)


def export_cache_path(model_name: str, fingerprint: str | None, width: int, height: int, dtype: str = "fp32") -> Path:
    """Where an on-demand ONNX export of a model (its name and weights' fingerprint) at one size is kept."""
    from depthvlm_ros.model.default import cache_dir

    folder = cache_dir() / "exports" / f"{model_name}-{fingerprint or model_name}"
    return folder / f"depth_{width}x{height}_{dtype}.onnx"


def _graph_files(graph: Path) -> list[Path]:
    return [graph] + [Path(str(graph) + suffix) for suffix in _COMPANIONS]


def remove_export(graph: Path) -> None:
    """Delete an exported graph and the files that belong to it."""
    for f in _graph_files(graph):
        f.unlink(missing_ok=True)


def _bound(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def prune_export_cache(root: Path, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used graphs under ``root`` beyond the cache bounds; returns them."""
    max_graphs = int(_bound("DEPTHVLM_EXPORT_CACHE_MAX_GRAPHS", MAX_CACHED_GRAPHS))
    max_bytes = _bound("DEPTHVLM_EXPORT_CACHE_MAX_GB", MAX_CACHE_GB) * 1e9
    graphs = []
    for graph in root.glob("*/*.onnx"):
        try:
            files = [f for f in _graph_files(graph) if f.exists()]
            graphs.append((graph.stat().st_mtime, sum(f.stat().st_size for f in files), graph))
        except OSError:  # removed meanwhile by another process
            continue
    graphs.sort(key=lambda g: (g[2] != keep, -g[0]))  # the one to keep first, then newest first
    removed, count, total = [], 0, 0
    for _mtime, size, graph in graphs:
        count, total = count + 1, total + size
        if count > 1 and (count > max_graphs or total > max_bytes):
            remove_export(graph)
            removed.append(graph)
    stale = time.time() - STALE_PARTIAL_S
    for leftover in [*root.glob("*/*.failed"), *root.glob("*/.*.partial")]:
        try:
            if leftover.suffix == ".failed" or leftover.stat().st_mtime < stale:
                shutil.rmtree(leftover, ignore_errors=True)
                removed.append(leftover)
        except OSError:
            continue
    for folder in root.glob("*/"):
        if folder.is_dir() and not any(folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)
    return removed


def _from_cache(path: Path, replace: bool) -> Path | None:
    """The cached graph (marked as used), or None when it must be made (absent, or ``replace``)."""
    if replace:
        remove_export(path)
        return None
    if not path.is_file():
        return None
    try:
        os.utime(path)  # least recently used goes first when the cache is pruned
    except OSError:
        pass
    return path


#: ``where(width, height) -> Path``: the cache path of a size (``export_cache_path`` of one model).
CachePath = Callable[[int, int], Path]


class InProcessExporter:
    """Exports into the cache in this process, on the caller's thread (the tools): ``export(width, height,
    path, progress)`` writes a checked graph (the pipeline's :func:`~depthvlm_ros.backends.onnx_export.export_onnx`)."""

    def __init__(self, where: CachePath, export: Callable[[int, int, Path, Callable[[str], None]], None],
                 log: Callable[[str], None] = print) -> None:
        self.where, self.export, self.log = where, export, log

    def __call__(self, width: int, height: int, replace: bool = False) -> Path:
        path = self.where(width, height)
        if _from_cache(path, replace) is not None:
            return path
        self.log(f"exporting the depth path at {width}x{height} for ONNX Runtime (once) -> {path}")
        self.export(width, height, path, self.log)
        prune_export_cache(path.parent.parent, keep=path)
        return path


class SubprocessExporter:
    """Exports into the cache with the export worker in its own process (the node's background sizes): the
    worker loads the model folder itself, so neither the node's frame path nor its memory carries an export."""

    def __init__(self, where: CachePath, model_folder: Path | None, log: Callable[[str], None] = print,
                 timeout_s: float = EXPORT_TIMEOUT_S) -> None:
        if model_folder is None:
            raise BackendError("exports in the background need a model loaded from a folder")
        self.where, self.model_folder = where, Path(model_folder)
        self.log = log
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._cancelled = False

    def __call__(self, width: int, height: int, replace: bool = False) -> Path:
        path = self.where(width, height)
        if _from_cache(path, replace) is not None:
            return path
        self.log(f"exporting the depth path at {width}x{height} for ONNX Runtime in the background -> {path}")
        command = [sys.executable, "-m", "depthvlm_ros.backends.onnx_export", str(self.model_folder),
                   f"{width}x{height}", str(path), "--parent", str(os.getpid())]
        with self._lock:
            if self._cancelled:
                raise BackendError("export cancelled (shutting down)")
            self._proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True)
        try:
            output, _ = self._proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            _stop(self._proc)
            raise BackendError(f"export of {width}x{height} took over {self.timeout_s:g} s; stopped") from None
        finally:
            code = self._proc.returncode
            with self._lock:
                self._proc = None
        if code != 0 or not path.is_file():
            lines = [line for line in (output or "").splitlines() if line.strip()]
            last = lines[-1] if lines else "no output"
            raise BackendError(f"export of {width}x{height} failed (exit {code}): {last}")
        prune_export_cache(path.parent.parent, keep=path)
        return path

    def cancel(self) -> None:
        """Stop a running export (SIGTERM: it removes its staging folder; SIGKILL after a grace period) and
        refuse new ones."""
        with self._lock:
            self._cancelled = True
            proc = self._proc
        if proc is not None:
            _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if the process has not ended within CANCEL_GRACE_S."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=CANCEL_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
