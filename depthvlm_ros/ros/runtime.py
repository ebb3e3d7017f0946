"""Process set-up shared by every ROS entry point: the Fast DDS profile, rclpy start and clean exit."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from depthvlm_ros.errors import InputError

if TYPE_CHECKING:
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.node import Node

#: The shipped Fast DDS profile (64 MiB shared-memory segment; see the file's comment).
FASTDDS_PROFILE = "fastdds_large_data.xml"
#: How often a thread waiting for the GIL gets it (Python's default is 5 ms). rclpy's executor loop
#: holds the GIL while it looks for ready callbacks; at 5 ms the node's camera callbacks waited for
#: it in a convoy and at 30 Hz most frames were lost before the node in some runs (11, 19, 150, 172
#: or 361 of 361 frames delivered); at 0.5 ms, 342-361 of 361 in every run (docs/benchmarks.md).
GIL_SWITCH_INTERVAL_S = 0.0005


def short_gil_switch() -> None:
    """Hand the GIL over every :data:`GIL_SWITCH_INTERVAL_S` (a process with an rclpy executor and
    other Python threads: the node, the demo, bench-node)."""
    import sys

    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)


def config_path(name: str) -> Path:
    """A file of the package's ``config/`` folder: from a source checkout or an installed share dir."""
    here = Path(__file__).resolve().parents[2] / "config" / name
    if here.exists():
        return here
    try:
        from ament_index_python.packages import get_package_share_directory

        shared = Path(get_package_share_directory("depthvlm_ros")) / "config" / name
        if shared.exists():
            return shared
    except (ImportError, LookupError, ValueError):
        pass
    import sys

    return Path(sys.prefix) / "share" / "depthvlm_ros" / "config" / name


def use_large_data_profile() -> str | None:
    """Point Fast DDS at the shipped profile unless the user chose a profile or another RMW.

    Must run before ``rclpy.init()`` (Fast DDS reads the variable when the participant is made).
    Returns the profile in effect, or None when another RMW is selected.
    """
    rmw = os.environ.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    if not rmw.startswith("rmw_fastrtps"):
        return None
    if "FASTDDS_DEFAULT_PROFILES_FILE" not in os.environ:
        path = config_path(FASTDDS_PROFILE)
        if path.exists():
            os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(path)
    return os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE")


def private_ros_environment() -> dict[str, str]:
    """This process's ROS environment for tools that start their own node: a private domain id
    (unless one is set), localhost discovery, the shipped Fast DDS profile. Set in ``os.environ``
    (before ``rclpy.init``) and returned for child processes."""
    os.environ.setdefault("ROS_DOMAIN_ID", str(40 + os.getpid() % 50))
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    use_large_data_profile()
    return dict(os.environ)


class NodeProcess:
    """``depthvlm node`` in its own process, as a robot runs it (``depthvlm demo`` and ``bench-node``).

    Its output goes to ``log`` (a file: a pipe nobody reads would block the node). ``params`` are
    ROS parameters (``-p name:=value``).
    """

    def __init__(self, params: dict[str, object], log: Path, env: dict[str, str] | None = None) -> None:
        import subprocess
        import sys

        self.log = Path(log)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        ros = ["--ros-args"] + [x for k, v in params.items() for x in ("-p", f"{k}:={v}")]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "depthvlm_ros", "node", *ros],
                                            env=env or private_ros_environment(), stdout=out,
                                            stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def output_tail(self, chars: int = 2000) -> str:
        """The end of the node's log (for error messages)."""
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout_s``; the exit code."""
        import subprocess

        if self.alive():
            self.process.terminate()
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


class NodeStatus:
    """The latest ``depthvlm: depth`` diagnostics of a node, as a dict of strings (updated on arrival)."""

    def __init__(self, node: Node, name: str = "depthvlm: depth") -> None:
        import threading

        from diagnostic_msgs.msg import DiagnosticArray

        self.name = name
        self.latest: dict[str, str] = {}
        self.count = 0
        self._lock = threading.Lock()
        self.sub = node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name == self.name:
                with self._lock:
                    self.latest = {kv.key: kv.value for kv in status.values}
                    self.count += 1

    def get(self) -> tuple[int, dict[str, str]]:
        """(how many diagnostics arrived so far, the latest values)."""
        with self._lock:
            return self.count, dict(self.latest)

    def number(self, key: str, default: float = 0.0) -> float:
        try:
            return float(self.get()[1].get(key, default))
        except ValueError:
            return default


# -- a ROS process of the tools (play, record, demo) ------------------------------------------------

@contextmanager
def ros_node(name: str, ros_args: list[str] | None = None) -> Iterator[tuple[Any, threading.Event]]:
    """A node in its own rclpy context, and an event set by SIGINT/SIGTERM.

    Uses the shipped Fast DDS profile (:func:`use_large_data_profile`, before ``rclpy.init``) and
    our own signal handlers (rclpy's are disabled), so a loop that checks the event ends cleanly and
    the process exits 0. ``ros_args`` (``--ros-args -r image:=/cam/image ...``) go to ``rclpy.init``.
    """
    use_large_data_profile()
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    context = rclpy.Context()
    node = None
    try:
        argv = [name, *(ros_args or [])]
        if len(argv) > 1 and argv[1] != "--ros-args":
            argv.insert(1, "--ros-args")
        try:
            rclpy.init(args=argv, context=context, signal_handler_options=SignalHandlerOptions.NO)
        except Exception as exc:  # rclpy's RCLError: bad --ros-args
            raise InputError(f"ROS arguments {' '.join(argv[1:])}: {exc}") from None
        node = rclpy.create_node(name, context=context)
        yield node, stop
    finally:
        if node is not None:
            node.destroy_node()
        if context.ok():
            rclpy.shutdown(context=context)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class StatusLine:
    """At most one line per ``period`` seconds on stderr."""

    def __init__(self, period: float = 1.0) -> None:
        self.period = period
        self.last = time.monotonic()

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.period:
            return False
        self.last = now
        return True
