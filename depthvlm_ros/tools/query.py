"""``depthvlm query``: ask the running node from the command line (what ``ros2 action send_goal`` and
``ros2 service call`` would do).

    depthvlm query "How far is the chair?"           # ~/ask: the answer streams as it is generated
    depthvlm query "How far is the chair?" --camera left --max-new-tokens 32
    depthvlm query --at 320,240 --at 10,20           # ~/depth_at: depth and point per pixel

A question goes through the ``~/ask`` action: the answer is printed as it is generated, then its
distance and 3D point. Ctrl-C cancels it (the node stops generating within one token) and exits 130.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from depthvlm_ros.errors import InputError


def _pixel(text: str) -> tuple[int, int]:
    try:
        u, v = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"pixel must look like U,V (integers), got {text!r}") from None
    return u, v


def _fmt(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.3f}"


def call(node, srv_type, name: str, request, timeout_s: float):
    """Call a service once and return the response (InputError on timeout)."""
    import rclpy

    client = node.create_client(srv_type, name)
    if not client.wait_for_service(timeout_sec=timeout_s):
        raise InputError(f"service {name} is not available (is the node running, same ROS_DOMAIN_ID?)")
    future = client.call_async(request)
    rclpy.spin_until_future_complete(node, future, timeout_sec=timeout_s)
    if not future.done():
        raise InputError(f"service {name} did not answer within {timeout_s} s")
    return future.result()


def ask(node, name: str, goal, timeout_s: float) -> tuple[object, bool]:
    """Send an ``Ask`` goal, print the answer as it streams; ``(result, canceled)``. Ctrl-C (at any point)
    cancels the goal once it is accepted and waits for its result (the node stops within one token)."""
    import signal

    import rclpy
    from depthvlm_msgs.action import Ask
    from rclpy.action import ActionClient

    client = ActionClient(node, Ask, name)
    if not client.wait_for_server(timeout_sec=timeout_s):
        raise InputError(f"action {name} is not available (is the node running, same ROS_DOMAIN_ID?)")
    shown = [""]

    def on_feedback(msg) -> None:
        text = msg.feedback.answer
        if text.startswith(shown[0]):
            sys.stdout.write(text[len(shown[0]):])
        else:  # decoding rewrote the tail (a multi-byte character completed): start the line again
            sys.stdout.write("\r" + text)
        sys.stdout.flush()
        shown[0] = text

    interrupted = [False]
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.__setitem__(0, True))  # only a flag: the
    try:  # executor is never interrupted in the middle of a task

        def spin_until(done) -> bool:
            deadline = time.monotonic() + timeout_s
            while not done() and time.monotonic() < deadline:
                rclpy.spin_once(node, timeout_sec=0.1)
            return done()

        sys.stdout.write("answer: ")
        sent = client.send_goal_async(goal, feedback_callback=on_feedback)
        if not spin_until(sent.done):
            raise InputError(f"action {name} did not answer the goal request within {timeout_s} s")
        if not sent.result().accepted:  # the node's log and diagnostics (goals_rejected) say why
            raise InputError(f"action {name} rejected the question (node not active, max_new_tokens above its "
                             "max_answer_tokens, or questions already waiting; its log says which)")
        handle = sent.result()
        result = handle.get_result_async()
        canceled = False
        deadline = time.monotonic() + timeout_s
        while not result.done() and time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.1)
            if interrupted[0] and not canceled:
                canceled = True
                handle.cancel_goal_async()
                deadline = time.monotonic() + timeout_s
    finally:
        signal.signal(signal.SIGINT, previous)
    sys.stdout.write("\n")
    if not result.done():
        raise InputError(f"action {name} gave no result within {timeout_s} s")
    return result.result().result, canceled


def cmd_query(args: argparse.Namespace) -> int:
    """Run ``depthvlm query``: a question through the node's ``~/ask`` (the answer streamed, then its distance
    and point), or --at pixels through ``~/depth_at`` (exit code 0, 2 bad input or no answer, 130 canceled)."""
    import rclpy
    from depthvlm_msgs.action import Ask
    from depthvlm_msgs.srv import DepthAt
    from rclpy.signals import SignalHandlerOptions

    from depthvlm_ros.ros.runtime import use_large_data_profile

    if (args.question is None) == (not args.at):
        raise InputError("give a question or --at U,V (not both)")
    if not 0 <= args.max_new_tokens <= 4096:
        raise InputError(f"--max-new-tokens must be in 0..4096, got {args.max_new_tokens}")
    use_large_data_profile()
    rclpy.init(args=["depthvlm_query"], signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node("depthvlm_query")
    try:
        base = args.node.rstrip("/")
        if args.question is not None:
            goal = Ask.Goal(question=args.question, camera=args.camera, max_new_tokens=args.max_new_tokens)
            res, canceled = ask(node, f"{base}/ask", goal, args.timeout)
            if canceled:
                print(f"canceled: {res.message}", file=sys.stderr)
                return 130
            if not res.success:
                raise InputError(f"ask: {res.message}")
            p = res.point.point
            print(f"distance_m: {_fmt(res.distance_m)}")
            print(f"point: [{_fmt(p.x)}, {_fmt(p.y)}, {_fmt(p.z)}] in {res.point.header.frame_id or '(no frame)'}")
            print(f"note: {res.message}", file=sys.stderr)
        else:
            u, v = zip(*args.at)
            res = call(node, DepthAt, f"{base}/depth_at", DepthAt.Request(u=list(u), v=list(v), camera=args.camera),
                       args.timeout)
            if not res.success:
                raise InputError(f"depth_at: {res.message}")
            for (uu, vv), d, p in zip(args.at, res.depth_m, res.points):
                print(f"({uu}, {vv}) depth_m {_fmt(d)} point [{_fmt(p.x)}, {_fmt(p.y)}, {_fmt(p.z)}]")
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``depthvlm query`` subcommand's options."""
    p = sub.add_parser("query", help="ask the running node a spatial question (streamed), or depth at pixels",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("question", nargs="?", help="the question (omit with --at)")
    p.add_argument("--at", type=_pixel, action="append", default=[], metavar="U,V",
                   help="pixel (column,row) of the input image for ~/depth_at (repeatable)")
    p.add_argument("--camera", default="", help="which of the node's cameras (default: its first)")
    p.add_argument("--max-new-tokens", type=int, default=0,
                   help="most tokens of the answer (0 = the node's max_answer_tokens)")
    p.add_argument("--node", default="/depthvlm", help="the node's name with namespace (default /depthvlm)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the node and the answer")
    p.set_defaults(func=cmd_query)
