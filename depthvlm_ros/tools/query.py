"""``depthvlm query``: call the node's services from the command line (what ``ros2 service call`` would do).

    depthvlm query "How far is the chair?"           # ~/spatial_query: answer, distance, point
    depthvlm query --at 320,240 --at 10,20           # ~/depth_at: depth and point per pixel
"""

from __future__ import annotations

import argparse
import math
import sys

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


def cmd_query(args: argparse.Namespace) -> int:
    import rclpy
    from depthvlm_msgs.srv import DepthAt, SpatialQuery

    from depthvlm_ros.ros.runtime import use_large_data_profile

    if (args.question is None) == (not args.at):
        raise InputError("give a question or --at U,V (not both)")
    use_large_data_profile()
    rclpy.init(args=["depthvlm_query"])
    node = rclpy.create_node("depthvlm_query")
    try:
        base = args.node.rstrip("/")
        if args.question is not None:
            res = call(node, SpatialQuery, f"{base}/spatial_query", SpatialQuery.Request(question=args.question),
                       args.timeout)
            if not res.success:
                raise InputError(f"spatial_query: {res.message}")
            p = res.point.point
            print(f"answer: {res.answer}")
            print(f"distance_m: {_fmt(res.distance_m)}")
            print(f"point: [{_fmt(p.x)}, {_fmt(p.y)}, {_fmt(p.z)}] in {res.point.header.frame_id or '(no frame)'}")
            print(f"note: {res.message}", file=sys.stderr)
        else:
            u, v = zip(*args.at)
            res = call(node, DepthAt, f"{base}/depth_at", DepthAt.Request(u=list(u), v=list(v)), args.timeout)
            if not res.success:
                raise InputError(f"depth_at: {res.message}")
            for (uu, vv), d, p in zip(args.at, res.depth_m, res.points):
                print(f"({uu}, {vv}) depth_m {_fmt(d)} point [{_fmt(p.x)}, {_fmt(p.y)}, {_fmt(p.z)}]")
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("query", help="ask the running node a spatial question, or depth at pixels",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("question", nargs="?", help="the question (omit with --at)")
    p.add_argument("--at", type=_pixel, action="append", default=[], metavar="U,V",
                   help="pixel (column,row) of the input image for ~/depth_at (repeatable)")
    p.add_argument("--node", default="/depthvlm", help="the node's name with namespace (default /depthvlm)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the service and answer")
    p.set_defaults(func=cmd_query)
