"""``depthvlm ask IMAGE QUESTION``: answer a spatial question about an image (the model's text; the node's
``~/spatial_query`` also measures the place it names)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: What ``ask`` prints when the model generated only special tokens (an untrained model can).
NO_TEXT = "(the model generated no text)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``depthvlm ask`` subcommand's options."""
    from depthvlm_ros.tools.common import add_input_size_args, add_intrinsics_args, add_model_args

    p = sub.add_parser("ask", help="answer a spatial question about an image")
    p.add_argument("image", type=Path)
    p.add_argument("question")
    p.add_argument("--max-new-tokens", type=int, default=64)
    add_intrinsics_args(p)
    add_input_size_args(p)
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``depthvlm ask``: the model's answer to a question about one image on stdout, its token count and time
    on stderr (exit code 0, 2 bad input, 3 setup)."""
    from depthvlm_ros.pipeline.plan import RouteSettings
    from depthvlm_ros.tools.common import check_max_image_tokens, intrinsics_from_args, load_model, read_rgb

    rgb = read_rgb(args.image)
    k = intrinsics_from_args(args, rgb.shape[1], rgb.shape[0])
    max_tokens = check_max_image_tokens(args)
    model = load_model(args)
    answer = model.ask(rgb, k, args.question, max_new_tokens=args.max_new_tokens,
                       route=RouteSettings(max_tokens=max_tokens))
    print(answer.text if answer.text else NO_TEXT)
    print(f"({answer.num_tokens} tokens, {sum(answer.timings_ms.values()):.0f} ms)", file=sys.stderr)
    return 0
