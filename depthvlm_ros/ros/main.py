"""``depthvlm node``: run the ROS 2 node with the PyPI rclpy (no ``ros2 run`` needed).

``depthvlm node [--params-file F] [--no-autostart] [--ros-args ...]`` sets the shipped Fast DDS large-data
profile (unless ``FASTDDS_DEFAULT_PROFILES_FILE`` is set), then runs the node until SIGINT/SIGTERM or its
lifecycle shutdown (exit 0). ``--no-autostart`` (``-p autostart:=false``): the node waits unconfigured for
a lifecycle manager (``~/change_state``). Remaps and parameters go after ``--ros-args`` as usual:
``-r image:=/camera/image_rect -p backend:=onnxruntime``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from depthvlm_ros.errors import DepthVLMError, InputError


def ros_arguments(args: argparse.Namespace) -> list[str]:
    """The argv rclpy.init gets: program name, then one ``--ros-args`` section."""
    extra = list(getattr(args, "ros_args", []) or [])
    if extra and extra[0] == "--ros-args":
        extra = extra[1:]
    if args.params_file is not None:
        if not args.params_file.is_file():
            raise InputError(f"--params-file {args.params_file}: no such file")
        extra = ["--params-file", str(args.params_file)] + extra
    if getattr(args, "no_autostart", False):
        extra = extra + ["-p", "autostart:=false"]
    return ["depthvlm_node"] + (["--ros-args"] + extra if extra else [])


def cmd_node(args: argparse.Namespace) -> int:
    """Run ``depthvlm node``: the ROS 2 node until SIGINT/SIGTERM or its lifecycle shutdown (exit code 0; 2 a
    missing --params-file; 3 a model folder that cannot be loaded, under autostart)."""
    from depthvlm_ros.ros.node import main

    return main(ros_arguments(args))


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``depthvlm node`` subcommand's options."""
    p = sub.add_parser("node", help="run the ROS 2 node (camera in; depth, cloud, services out)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params-file", type=Path, help="ROS parameters YAML (e.g. config/depthvlm.yaml)")
    p.add_argument("--no-autostart", action="store_true",
                   help="wait unconfigured for a lifecycle manager (~/change_state) instead of starting at once")
    p.set_defaults(func=cmd_node)


def console_main() -> None:
    """Entry point ``depthvlm_node`` (what the launch file runs): plain ROS arguments."""
    from depthvlm_ros.ros.node import main

    try:
        sys.exit(main(sys.argv))
    except DepthVLMError as exc:
        print(f"depthvlm_node: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
