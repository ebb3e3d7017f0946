"""``depthvlm bench-node``: the node measured as a robot sees it, over real Fast DDS.

Starts ``depthvlm node`` in its own process (private ROS_DOMAIN_ID unless one is set, localhost
discovery, the shipped Fast DDS profile), publishes a synthetic camera (image + camera_info) at
``--rate`` Hz from this process, subscribes to ``depth/image`` and ``points`` (so the organized
cloud is built and sent), and reports:

- latency: input stamp -> depth image received here (ms; median, p90);
- throughput: depth images per second, and how many input frames produced no depth (dropped);
- the node's own time per frame from its diagnostics: the model forward, everything else
  (preprocessing included), and the ROS part alone (decode, depth/camera_info/cloud, publish).

``--soak N`` streams N measured frames instead of ``--seconds`` and reports the node's resident
memory (RSS) when measuring starts, every tenth of the way, and at the end: memory that grows with
the number of frames is a leak a robot meets after hours.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from depthvlm_ros.errors import InputError
from depthvlm_ros.files import write_text_atomic


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (Linux /proc), NaN when it cannot be read."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024
    except (OSError, StopIteration, ValueError):
        return float("nan")


def _camera_frame(width: int, height: int) -> np.ndarray:
    u = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    v = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    rgb = np.stack([0.5 + 0.5 * np.sin(9 * u + 3 * v), 0.5 + 0.5 * np.cos(7 * v - 2 * u), 0.4 + 0.3 * u * v], -1)
    return np.rint(rgb * 255).astype(np.uint8)


def steady(diagnostics: list[dict[str, str]]) -> bool:
    """The node's latest diagnostics say it runs its backend: PyTorch, or a compiled size it holds."""
    if not diagnostics:
        return False
    latest = diagnostics[-1]
    return latest.get("backend", "").startswith("torch") or int(latest.get("compiled_sizes_held", "0")) >= 1


def run_bench(args: argparse.Namespace) -> dict:
    """The node measured in its own process: a synthetic camera streamed to it for --seconds (or --soak frames);
    the report of latency (ms), throughput (Hz), frames without output, the node's own times and its RSS (MiB)."""
    import threading

    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, Image, PointCloud2
    from std_msgs.msg import Header

    from depthvlm_ros.geometry import Intrinsics
    from depthvlm_ros.ros.messages import intrinsics_to_camera_info, rgb_to_image
    from depthvlm_ros.ros.runtime import private_ros_environment, short_gil_switch
    from depthvlm_ros.tools.common import announce_model

    announce_model(args.model)  # (the node's own log says it too)
    width, height = args.size
    env = private_ros_environment()
    short_gil_switch()  # the camera thread and the receiving executor share this process's GIL
    params = {"backend": args.backend, "max_side_px": args.max_side, "input_reliability": args.input_reliability}
    if args.model is not None:
        params["model_path"] = str(args.model)
    ros = ["--ros-args"] + [x for k, v in params.items() for x in ("-p", f"{k}:={v}")]
    node = subprocess.Popen([sys.executable, "-m", "depthvlm_ros", "node", *ros], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rclpy.init(args=["depthvlm_bench_node"])
    client = rclpy.create_node("depthvlm_bench_node")
    reliable = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.RELIABLE)
    # The camera publishes with the node's input reliability (best effort by default, like camera drivers'
    # sensor QoS).
    camera = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.RELIABLE
                        if args.input_reliability == "reliable" else ReliabilityPolicy.BEST_EFFORT)
    pub_image = client.create_publisher(Image, "image", camera)
    pub_info = client.create_publisher(CameraInfo, "camera_info", camera)
    sent: dict[int, float] = {}
    rss: list[tuple[int, float]] = []  # (measured frames sent, node RSS MiB)
    received: list[tuple[float, float]] = []  # (stamp -> receive latency ms, receive time)
    diagnostics: list[dict[str, str]] = []
    measuring = [False]

    last_stamp = [0]  # the newest frame's depth has arrived when this stamp does

    def on_depth(msg: Image) -> None:
        now = client.get_clock().now().nanoseconds
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        if measuring[0] and stamp in sent:
            received.append(((now - stamp) / 1e6, time.monotonic()))
        if stamp == last_stamp[0]:
            last_stamp[0] = -1

    def on_diag(msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.endswith(": depth"):
                diagnostics.append({kv.key: kv.value for kv in status.values})

    depth_sub = client.create_subscription(Image, "depth/image", on_depth, reliable)
    client.create_subscription(PointCloud2, "points", lambda _msg: None, reliable)
    client.create_subscription(DiagnosticArray, "/diagnostics", on_diag, 10)
    rgb = _camera_frame(width, height)
    k = Intrinsics.from_fx(width, height, args.fx)
    try:
        deadline = time.monotonic() + args.startup_timeout
        while pub_image.get_subscription_count() == 0 or depth_sub.get_publisher_count() == 0:
            if node.poll() is not None or time.monotonic() > deadline:
                raise InputError(f"the node did not start: {node.stderr.read()[-2000:] if node.poll() else 'timeout'}")
            rclpy.spin_once(client, timeout_sec=0.1)
        # Receiving runs on an executor thread that blocks while idle; this thread only paces the camera
        # and sleeps between frames. (A spin_once loop with a zero timeout here burned a core that the
        # node needed: most frames then never reached the node.)
        executor = SingleThreadedExecutor()
        executor.add_node(client)
        spinner = threading.Thread(target=executor.spin, daemon=True)
        spinner.start()
        period = 1.0 / args.rate
        start = time.monotonic()
        next_frame = start
        measure_start = measure_end = None
        while (len(sent) < args.soak) if args.soak else (measure_start is None or
                                                         time.monotonic() < measure_start + args.seconds):
            if node.poll() is not None:
                raise InputError(f"the node exited: {node.stderr.read()[-2000:]}")
            time.sleep(max(0.0, next_frame - time.monotonic()))
            now_m = time.monotonic()
            # Measure after --warmup, once the node runs the backend asked for (a compiled backend's
            # first size is exported in the background meanwhile; PyTorch stands in until then).
            measuring[0] = measuring[0] or (now_m >= start + args.warmup and (
                steady(diagnostics) or now_m >= start + args.warmup + args.startup_timeout))
            if measuring[0] and measure_start is None:
                measure_start = now_m
                rss.append((0, rss_mb(node.pid)))
            if args.soak and sent and len(sent) % max(1, args.soak // 10) == 0 and rss[-1][0] != len(sent):
                rss.append((len(sent), rss_mb(node.pid)))
            header = Header(frame_id="camera_optical_frame", stamp=client.get_clock().now().to_msg())
            image = rgb_to_image(rgb, header)
            pub_info.publish(intrinsics_to_camera_info(k, header))
            pub_image.publish(image)
            stamp_ns = header.stamp.sec * 1_000_000_000 + header.stamp.nanosec
            if measuring[0]:
                sent[stamp_ns] = now_m
            last_stamp[0] = stamp_ns
            next_frame = max(next_frame + period, time.monotonic() - period)  # late: no burst to catch up
        measure_end = time.monotonic()
        rss.append((len(sent), rss_mb(node.pid)))
        # The node always serves its newest frame (latest wins): once the last frame's depth is here, every
        # depth image of the run has been sent. If best-effort transport lost that frame, a status after it
        # that shows nothing pending says the same.
        seen = len(diagnostics)
        deadline = time.monotonic() + args.startup_timeout
        def settled() -> bool:
            return last_stamp[0] == -1 or (len(diagnostics) > seen + 1 and diagnostics[-1].get("frames_pending") == "0")

        while not settled():
            if node.poll() is not None or time.monotonic() > deadline:
                raise InputError("the node stopped answering: the last frame's depth never came back")
            time.sleep(0.05)
        executor.shutdown(timeout_sec=2.0)
    finally:
        node.terminate()
        try:
            node.wait(timeout=20)
        except subprocess.TimeoutExpired:
            node.kill()
        client.destroy_node()
        rclpy.try_shutdown()
    latencies = np.array([r[0] for r in received]) if received else np.array([np.nan])
    diag = diagnostics[-1] if diagnostics else {}
    seconds = (measure_end - measure_start) if measure_start is not None and measure_end is not None else args.seconds
    report = {
        "size": [width, height], "fx": args.fx, "rate_hz": args.rate, "seconds": round(seconds, 2),
        "backend": diag.get("backend", args.backend), "model": diag.get("model", ""),
        "max_side_px": args.max_side, "input_reliability": args.input_reliability,
        "sent": len(sent), "depth_received": len(received),
        "no_output": len(sent) - len(received),
        "throughput_hz": len(received) / seconds if seconds > 0 else 0.0,
        "latency_ms": {"median": float(np.median(latencies)), "p90": float(np.percentile(latencies, 90))},
        "node": {key: float(diag[key]) for key in ("forward_p50_ms", "overhead_p50_ms", "ros_overhead_p50_ms",
                                                    "ros_overhead_p90_ms", "inference_rate_hz") if key in diag},
        "node_frames_received": int(diag.get("frames_received", 0)),
        "node_frames_lost_before_node": int(diag.get("frames_lost_before_node", 0)),
        "node_frames_dropped": int(diag.get("frames_dropped", 0)),
        "node_rss_mb": {"start": round(rss[0][1], 1), "end": round(rss[-1][1], 1),
                        "growth": round(rss[-1][1] - rss[0][1], 1),
                        "samples": [[n, round(mb, 1)] for n, mb in rss]} if rss else {},
    }
    return report


def cmd_bench_node(args: argparse.Namespace) -> int:
    """Run ``depthvlm bench-node``: :func:`run_bench`'s report printed as text and JSON, also to --json (exit
    code 0, 2 bad input or a node that does not start or stops answering)."""
    if args.soak < 0 or not (args.rate > 0 and args.seconds > 0 and args.warmup >= 0):
        raise InputError("--soak must be >= 0, --rate and --seconds > 0, --warmup >= 0")
    report = run_bench(args)
    lat, node = report["latency_ms"], report["node"]
    print(f"bench-node {report['size'][0]}x{report['size'][1]} fx {report['fx']:g} at {report['rate_hz']:g} Hz "
          f"for {report['seconds']:g} s, backend {report['backend']}, model {report['model']}")
    print(f"  depth out: {report['depth_received']} of {report['sent']} frames "
          f"({report['throughput_hz']:.1f} Hz), {report['no_output']} without output")
    print(f"  latency stamp->depth: median {lat['median']:.1f} ms, p90 {lat['p90']:.1f} ms")
    mem = report["node_rss_mb"]
    if mem:
        print(f"  node RSS: {mem['start']:.0f} MiB at the start of measuring, {mem['end']:.0f} MiB after "
              f"{report['sent']} frames ({mem['growth']:+.1f} MiB)")
    if node:
        print(f"  node per frame: forward {node.get('forward_p50_ms', float('nan')):.1f} ms, "
              f"all but forward {node.get('overhead_p50_ms', float('nan')):.2f} ms, "
              f"ROS part (decode, outputs, cloud, publish) {node.get('ros_overhead_p50_ms', float('nan')):.2f} ms "
              f"(p90 {node.get('ros_overhead_p90_ms', float('nan')):.2f})")
    print(json.dumps(report))
    if args.json is not None:
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``depthvlm bench-node`` subcommand's options."""
    from depthvlm_ros.tools.common import parse_size

    p = sub.add_parser("bench-node", help="latency, throughput and overhead of the ROS node over Fast DDS",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=(640, 480), help="camera size WxH (default 640x480)")
    p.add_argument("--fx", type=float, default=1000.0,
                   help="camera focal length in px (default 1000: the model sees the image at its own size)")
    p.add_argument("--rate", type=float, default=30.0, help="camera rate in Hz (default 30)")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds (after --warmup)")
    p.add_argument("--soak", type=int, default=0, metavar="N",
                   help="stream N measured frames instead of --seconds and report the node's RSS along the way")
    p.add_argument("--warmup", type=float, default=5.0,
                   help="seconds before measuring (at least; a compiled backend also waits for its first size)")
    p.add_argument("--model", type=Path, help="DepthVLM folder (default: the built-in model)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnxruntime", "tensorrt"],
                   help="the node's backend parameter (default auto, the node's default)")
    p.add_argument("--max-side", type=int, default=0, help="node parameter max_side_px (0 = protocol size)")
    p.add_argument("--input-reliability", default="best_effort", choices=["best_effort", "reliable"],
                   help="node parameter input_reliability (default best_effort, the node's default)")
    p.add_argument("--startup-timeout", type=float, default=120.0)
    p.add_argument("--json", type=Path, help="also write the report here")
    p.set_defaults(func=cmd_bench_node)
