"""``depthvlm eval-qa``: ask the model the generated spatial questions and score the answers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from depthvlm_ros.files import write_text_atomic


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``depthvlm eval-qa`` subcommand's options."""
    from depthvlm_ros.tools.common import add_input_size_args, add_model_args

    p = sub.add_parser("eval-qa", help="score spatial answers on a generated set (grounding, distance)",
                       description="Asks every question of DIR/qa.jsonl (from depthvlm generate) with the same "
                                   "answer and measurement code as the node's ~/spatial_query: the answer's first "
                                   "place is measured on the depth map of the same forward pass.")
    p.add_argument("--data", type=Path, required=True, metavar="DIR", help="generated folder with qa.jsonl")
    p.add_argument("--limit", type=int, metavar="N", help="first N questions only")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest answer (default 64, as the node)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the summary (and per-answer rows) here")
    add_input_size_args(p)
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``depthvlm eval-qa``: the questions of --data/qa.jsonl asked and scored (grounding, distance, label),
    printed, and with the per-answer rows written to --json (exit code 0, 2 bad input, 3 setup)."""
    from depthvlm_ros.evaluation.qa import DISTANCE_TOLERANCE, evaluate_qa
    from depthvlm_ros.tools.common import check_max_image_tokens, load_model

    max_tokens = check_max_image_tokens(args)
    model = load_model(args)
    result = evaluate_qa(model, args.data, args.limit, args.max_new_tokens, max_tokens, progress=True)
    summary = result["summary"]
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    print(f"{summary['answers']} answers from {model.name} on {args.data}")
    print(f"  grounding point inside the object's box : {pct(summary['grounded']['rate'])} "
          f"(n={summary['grounded']['n']}; target >= 80 %)")
    print(f"  measured distance within {DISTANCE_TOLERANCE:.0%}           : "
          f"{pct(summary['distance_ok']['rate'])} (n={summary['distance_ok']['n']}; target >= 70 %)")
    print(f"  right label (closer / at pixel)        : {pct(summary['label_ok']['rate'])} "
          f"(n={summary['label_ok']['n']})")
    print(f"  distance in the answer's text within {DISTANCE_TOLERANCE:.0%}: "
          f"{pct(summary['text_distance_ok']['rate'])}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
    return 0
