"""The ``depthvlm`` command (also ``python -m depthvlm_ros``): one subcommand per job.

Exit codes: 0 done; 2 bad input (a missing or corrupt image, non-positive or NaN intrinsics, a bad option);
3 this machine or a model folder cannot do it (a runtime or device that is missing, a broken model folder, an
engine built elsewhere); 1 a bug (with a traceback); 130 interrupted. 2 and 3 print one line,
``depthvlm: error: ...`` (depthvlm_ros/errors.py).
"""

from __future__ import annotations

import argparse
import os
import sys

from depthvlm_ros.errors import DepthVLMError


def build_parser() -> argparse.ArgumentParser:
    """The ``depthvlm`` argument parser, with every subcommand's options."""
    from depthvlm_ros.ros import main as node_main
    from depthvlm_ros.tools import (
        ask,
        bench,
        bench_node,
        demo,
        eval_qa,
        eval_tool,
        export_tool,
        generate,
        play,
        predict,
        query,
        record,
        serve,
        train_tool,
    )

    parser = argparse.ArgumentParser(prog="depthvlm", description="DepthVLM metric depth tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    predict.add_parser(sub)
    ask.add_parser(sub)
    bench.add_parser(sub)
    eval_tool.add_parser(sub)
    export_tool.add_parsers(sub)
    serve.add_parser(sub)
    node_main.add_parser(sub)
    bench_node.add_parser(sub)
    query.add_parser(sub)
    play.add_parser(sub)
    record.add_parser(sub)
    generate.add_parser(sub)
    train_tool.add_parser(sub)
    eval_qa.add_parser(sub)
    demo.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``depthvlm`` command on ``argv`` (default: sys.argv; what follows ``--ros-args`` passes through
    untouched); its exit code: 0 done, a DepthVLMError's (2 bad input, 3 setup) printed in one line, 130 interrupted."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    ros_args: list[str] = []
    if "--ros-args" in argv:  # ROS arguments pass through untouched (depthvlm node ... --ros-args -p a:=1)
        cut = argv.index("--ros-args")
        argv, ros_args = argv[:cut], argv[cut:]
    args = parser.parse_args(argv)
    args.ros_args = ros_args
    try:
        return int(args.func(args) or 0)
    except DepthVLMError as exc:  # 2: bad input, 3: this machine or a model folder cannot do it (errors.py)
        print(f"depthvlm: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
