"""The ``depthvlm`` command (also ``python -m depthvlm_ros``): one subcommand per job.

Bad input (a missing or corrupt image, non-positive or NaN intrinsics, a broken model folder)
prints one line, ``depthvlm: error: ...``, and exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from depthvlm_ros.errors import InputError

#: What ``ask`` prints when the model generated only special tokens (an untrained model can).
NO_TEXT = "(the model generated no text)"


def cmd_ask(args: argparse.Namespace) -> int:
    from depthvlm_ros.tools.common import check_max_image_tokens, intrinsics_from_args, load_model, read_rgb

    rgb = read_rgb(args.image)
    k = intrinsics_from_args(args, rgb.shape[1], rgb.shape[0])
    max_tokens = check_max_image_tokens(args)
    model = load_model(args)
    answer = model.ask(rgb, k, args.question, max_new_tokens=args.max_new_tokens, max_tokens=max_tokens)
    print(answer.text if answer.text else NO_TEXT)
    print(f"({answer.num_tokens} tokens, {sum(answer.timings_ms.values()):.0f} ms)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from depthvlm_ros.tools import (
        bench,
        bench_node,
        compile,
        demo,
        eval_qa,
        eval_tool,
        generate,
        node_tool,
        play,
        predict,
        query,
        record,
        serve,
        train_tool,
    )
    from depthvlm_ros.tools.common import add_input_size_args, add_intrinsics_args, add_model_args

    parser = argparse.ArgumentParser(prog="depthvlm", description="DepthVLM metric depth tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    predict.add_parser(sub)
    ask = sub.add_parser("ask", help="answer a spatial question about an image")
    ask.add_argument("image", type=Path)
    ask.add_argument("question")
    ask.add_argument("--max-new-tokens", type=int, default=64)
    add_intrinsics_args(ask)
    add_input_size_args(ask)
    add_model_args(ask)
    ask.set_defaults(func=cmd_ask)
    bench.add_parser(sub)
    eval_tool.add_parser(sub)
    compile.add_parsers(sub)
    serve.add_parser(sub)
    node_tool.add_parser(sub)
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
    except InputError as exc:
        print(f"depthvlm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
