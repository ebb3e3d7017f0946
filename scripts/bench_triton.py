"""Frames per second one Triton server gives 1, 2, 4, ... camera streams (issue 15's serving benchmark).

    .venv/bin/python scripts/bench_triton.py                       # starts depthvlm serve (built-in model)
    .venv/bin/python scripts/bench_triton.py --url host:8001       # an existing server (e.g. the container)

Each stream is a client thread with its own gRPC connection that sends one camera frame's processed
pixels (the sample room at ``--size``), waits for the depth, and sends the next: a camera whose node
is never behind. Stream counts are measured in rounds (1, 2, 4, 1, 2, 4, ...) so a noisy machine
slows them alike; the table gives each count's median over rounds of the total frames/s, the
per-stream rate, the median request latency, and the mean batch the server executed (its inference
count / execution count over the window). The row ``local`` is the same graph on ONNX Runtime in the
benchmark's own process, one frame after another (no server): what serving costs on top.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from depthvlm_ros.tools.serve import free_ports

REPO = Path(__file__).resolve().parents[1]


def pixels_for(model_dir: Path | None, width: int, height: int) -> tuple[np.ndarray, object]:
    """The sample room's processed pixels at the model grid ``width`` x ``height`` (1, patches, D), and the model."""
    from PIL import Image

    from depthvlm_ros.backends.onnx_export import inputs_for_size
    from depthvlm_ros.model.default import resolve_model
    from depthvlm_ros.pipeline import DepthVLM

    vlm = DepthVLM.from_pretrained(resolve_model(model_dir)[0])
    image = np.asarray(Image.open(REPO / "depthvlm_ros" / "data" / "sample_room.png").convert("RGB").resize(
        (width, height)))
    return inputs_for_size(vlm.processor, width, height, image).pixel_values.numpy()[None], vlm


def stream(url: str, name: str, pixels: np.ndarray, stop: threading.Event, latencies: list[float]) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    request = grpcclient.InferInput("pixel_values", list(pixels.shape), "FP32")
    request.set_data_from_numpy(pixels)
    while not stop.is_set():
        start = time.perf_counter()
        client.infer(name, [request])
        latencies.append((time.perf_counter() - start) * 1000.0)
    client.close()


def counts(url: str, name: str) -> tuple[int, int]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    stats = client.get_inference_statistics(name, as_json=True)["model_stats"][0]
    client.close()
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def measure(url: str, name: str, pixels: np.ndarray, n: int, seconds: float) -> dict:
    stop = threading.Event()
    per_stream: list[list[float]] = [[] for _ in range(n)]
    threads = [threading.Thread(target=stream, args=(url, name, pixels, stop, per_stream[i])) for i in range(n)]
    for t in threads:
        t.start()
    time.sleep(min(2.0, seconds / 4))  # warm-up: connections made, the batcher in its steady state
    marks = [len(x) for x in per_stream]
    inf0, exe0 = counts(url, name)
    start = time.perf_counter()
    time.sleep(seconds)
    elapsed = time.perf_counter() - start
    frames = [len(x) - m for x, m in zip(per_stream, marks)]
    inf1, exe1 = counts(url, name)
    stop.set()
    for t in threads:
        t.join()
    window = [ms for x, m, f in zip(per_stream, marks, frames) for ms in x[m : m + f]]
    return {"streams": n, "fps": sum(frames) / elapsed, "fps_per_stream": [f / elapsed for f in frames],
            "latency_p50_ms": float(np.median(window)) if window else float("nan"),
            "mean_batch": (inf1 - inf0) / max(1, exe1 - exe0)}


def measure_local(graph: Path, pixels: np.ndarray, seconds: float) -> dict:
    """The same graph on ONNX Runtime in this process, one frame after another: the depth path without serving."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    session.run(None, {"pixel_values": pixels[0]})
    latencies, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        session.run(None, {"pixel_values": pixels[0]})
        latencies.append((time.perf_counter() - t) * 1000.0)
    fps = len(latencies) / (time.perf_counter() - start)
    return {"streams": "local", "fps": fps, "fps_per_stream": [fps], "latency_p50_ms": float(np.median(latencies)),
            "mean_batch": 1.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="an existing server's gRPC address (default: start depthvlm serve here)")
    parser.add_argument("--model", type=Path, help="DepthVLM folder (default: the built-in model)")
    parser.add_argument("--size", default="320x224",
                        help="model-grid WxH (default 320x224: a 4:3 camera on the built-in model)")
    parser.add_argument("--streams", default="1,2,4", help="stream counts (default 1,2,4)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per count and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the counts (default 3)")
    parser.add_argument("--queue-delay-us", default="2000", help="the served batcher's wait (default 2000 us)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    name = f"depthvlm_depth_{width}x{height}"
    pixels, vlm = pixels_for(args.model, width, height)
    model_name = vlm.name
    server = None
    url = args.url
    if url is None:
        grpc, http, metrics = free_ports(3)
        url = f"localhost:{grpc}"
        cmd = [sys.executable, "-m", "depthvlm_ros", "serve", "--size", args.size, "--grpc-port", str(grpc),
               "--http-port", str(http), "--metrics-port", str(metrics), "--queue-delay-us", args.queue_delay_us]
        if args.model is not None:
            cmd += ["--model", str(args.model)]
        log = Path(tempfile.mkdtemp(prefix="bench-triton-")) / "serve.log"
        with log.open("w") as out:  # a file, not a pipe: the server's log never blocks it
            server = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 600
        while "\nserving " not in "\n" + log.read_text(errors="replace"):
            if server.poll() is not None or time.monotonic() > deadline:
                print(f"bench_triton: depthvlm serve did not start (see {log})", file=sys.stderr)
                return 2
            time.sleep(0.2)
    try:

        counts_wanted = [int(n) for n in args.streams.split(",")]
        graph = vlm.export_path(width, height)  # made by depthvlm serve (absent for a remote server)
        runs: dict[int | str, list[dict]] = {**({"local": []} if graph.is_file() else {}),
                                             **{n: [] for n in counts_wanted}}
        for _ in range(args.rounds):
            for n in runs:
                runs[n].append(measure_local(graph, pixels, args.seconds) if n == "local" else
                               measure(url, name, pixels, n, args.seconds))
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)
    rows = []
    print(f"model {model_name}, {name} at {url}, {os.cpu_count()} CPUs, medians of {args.rounds} rounds "
          f"of {args.seconds:g} s")
    print("streams | frames/s total | slowest stream frames/s | request p50 ms | mean batch executed")
    for n, items in runs.items():
        row = {"streams": n, "fps": statistics.median(r["fps"] for r in items),
               "fps_per_stream": statistics.median(min(r["fps_per_stream"]) for r in items),
               "latency_p50_ms": statistics.median(r["latency_p50_ms"] for r in items),
               "mean_batch": statistics.median(r["mean_batch"] for r in items), "rounds": items}
        rows.append(row)
        print(f"{n!s:>7} | {row['fps']:14.1f} | {row['fps_per_stream']:23.1f} | {row['latency_p50_ms']:14.1f} | "
              f"{row['mean_batch']:19.2f}")
    if args.json:
        args.json.write_text(json.dumps({"model": model_name, "url": url, "size": [width, height], "rows": rows},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
