"""``depthvlm serve``: a real Triton Inference Server on this machine, serving the depth path.

For development and tests (and any machine without the Triton container): the server is the
``tritonserver`` binary that ``nvidia-pytriton`` ships, started and stopped by PyTriton. It serves
a repository written by :mod:`~depthvlm_ros.backends.triton_repo` with the Python backend (the one
that binary has): each size's batched graph runs on ONNX Runtime inside the server
(:mod:`~depthvlm_ros.backends.triton_python_model`), batched dynamically across clients. Clients
(``backend: triton``) see the same gRPC models as from the standard container serving the
``onnxruntime`` repository of ``depthvlm export --triton-repo``.

Decisions, named:

- Not PyTriton's Python-function models (``Triton.bind``): their proxy moves arrays through the
  Python backend's NumPy interface, which the bundled stub compiled against NumPy 1 reads wrongly
  under NumPy 2 (empty outputs, wrong inputs; measured). This venv has NumPy 2. Our model moves
  tensors by DLPack instead.
- The stub embeds ``libpython``: the server gets this interpreter's own library directory first on
  ``LD_LIBRARY_PATH`` (otherwise another 3.11 build's ``libpython`` loads with this venv's standard
  library and the model fails to load).
- Locked down by default. It listens on 127.0.0.1 only (``--bind ADDR`` exposes it, and its first line
  says so); HTTP and metrics are off unless asked (``--http``, ``--metrics``). PyTriton runs the server in
  explicit model-control mode (it loads the repository itself), so model control (load, unload, the
  repository index), statistics, shared memory, tracing and logging need the access token: no client
  without it can load a model of its own (a Python-backend ``model.py`` would run in the server) or unload
  the served ones. Clients pass the token (node ``triton_token_file``, tools ``--triton-token-file``).
- The token comes from ``--token-file`` or ``$DEPTHVLM_TRITON_TOKEN``; without either, a new random one is
  written to the cache (``triton_token``, mode 600), where local clients find it. It is never printed. The
  bundled ``tritonserver`` takes it only on its command line (``--grpc-restricted-protocol``), where other
  users of this machine can read it (``/proc/PID/cmdline``): ``serve`` says so at start. On a shared
  machine, use the standard container (``--model-control-mode=none``: no load or unload at all).
- No TLS here: PyTriton checks the server it starts over plaintext gRPC, so it cannot start one that only
  speaks TLS. The standard container can (``--grpc-use-ssl``); clients connect with ``triton_tls_root_cert``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

from depthvlm_ros.backends.triton_repo import DEFAULT_PREFIX
from depthvlm_ros.errors import InputError, SetupError
from depthvlm_ros.tools.common import add_batching_args, add_model_args, parse_size

#: Endpoints that need the access token: model control and the repository index, statistics, shared
#: memory, tracing, logging (PyTriton's default list). Inference, health and model configs stay open.
RESTRICTED_ENDPOINTS = ["model-repository", "statistics", "shared-memory", "trace", "logging"]
#: The address the server listens on unless --bind says otherwise.
DEFAULT_BIND = "127.0.0.1"


def free_ports(n: int) -> list[int]:
    """``n`` TCP ports free on this machine now (for benchmarks and tests that start a server)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``depthvlm serve`` subcommand's options."""
    p = sub.add_parser("serve", help="serve the depth path from a local Triton Inference Server (PyTriton's)")
    p.add_argument("--size", type=parse_size, action="append", default=[],
                   help="model-grid WxH to serve (multiples of 32 px; repeatable); exported once into the cache")
    p.add_argument("--onnx", type=Path, action="append", default=[],
                   help="serve this checked export (depthvlm export --out) instead of exporting (repeatable)")
    p.add_argument("--triton-model", default=DEFAULT_PREFIX, help=f"model name prefix (default {DEFAULT_PREFIX})")
    p.add_argument("--bind", default=DEFAULT_BIND, metavar="ADDR",
                   help=f"address to listen on (default {DEFAULT_BIND}: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001)")
    p.add_argument("--http", action="store_true", help="also serve HTTP (off by default)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port, with --http (default 8000)")
    p.add_argument("--metrics", action="store_true", help="serve Prometheus metrics (off by default)")
    p.add_argument("--metrics-port", type=int, default=8002, help="metrics port, with --metrics (default 8002)")
    p.add_argument("--token-file", type=Path, metavar="FILE",
                   help="access token for model control and statistics (first line; mode 600); default "
                        "$DEPTHVLM_TRITON_TOKEN, else a new one written to the cache for local clients")
    add_batching_args(p)
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads per model (default: its own)")
    p.add_argument("--repo", type=Path, help="write the repository here and keep it (default: a temporary folder)")
    add_model_args(p)
    p.set_defaults(func=run)


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _graphs(args: argparse.Namespace) -> list[Path]:
    """The checked exports to serve: --onnx files and --size exports (each batched graph proves the
    export's probe when the repository is written)."""

    if not args.size and not args.onnx:
        raise InputError("nothing to serve: give --size WxH (and --model DIR) or --onnx FILE")
    graphs = list(args.onnx)
    if args.size:
        from depthvlm_ros.tools.common import load_model

        graphs += load_model(args).exported_graphs(args.size, progress=_log)
    return graphs


def _server_environment(threads: int) -> None:
    """What the server and its Python-backend stubs inherit (see the module docstring)."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    if libdir and os.path.isdir(libdir):
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)
    if threads > 0:
        os.environ["DEPTHVLM_SERVE_THREADS"] = str(threads)


def server_token(path: Path | None) -> tuple[str, str]:
    """(the access token, where it came from): ``path``, ``$DEPTHVLM_TRITON_TOKEN``, the file local clients read by
    default, or a new random token written there (mode 600)."""
    import secrets

    from depthvlm_ros.backends.triton_backend import TOKEN_ENV, default_token_file, read_token

    if path is not None:
        return read_token(path) or "", str(path)
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    target = default_token_file()
    if target.is_file():  # the one an earlier serve made: local clients already hold it
        return read_token(target) or "", str(target)
    token = secrets.token_urlsafe(32)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".triton_token.", dir=target.parent)  # created with mode 600
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, target)
    return token, f"{target} (new)"


def run(args: argparse.Namespace) -> int:
    """Run ``depthvlm serve``: a Python-backend Triton repository of the graphs written and served by PyTriton's
    server until SIGINT/SIGTERM (exit code 0, 2 bad input or a server that does not start, 3 a server that exits)."""
    for port in (args.grpc_port, args.http_port, args.metrics_port):
        if not 1 <= port <= 65535:
            raise InputError(f"port {port} outside 1..65535")
    try:
        from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig
    except ImportError:
        raise InputError("depthvlm serve needs nvidia-pytriton (make setup installs it; see the README)") from None
    import tritonclient.grpc as grpcclient

    from depthvlm_ros.backends.triton_repo import check_serving, write_triton_repo

    local = args.bind in ("127.0.0.1", "localhost", "::1")
    _log(f"depthvlm serve: listening on {args.bind} only (this machine; --bind ADDR exposes it)" if local else
         f"depthvlm serve: listening on {args.bind}: every machine that reaches it may send requests (model control "
         "needs the token)")
    check_serving("python", args.max_batch, args.queue_delay_us)
    token, token_from = server_token(args.token_file)
    _log(f"depthvlm serve: model control, the repository index and statistics need the access token from "
         f"{token_from}; note: the bundled tritonserver takes it on its command line, readable by other users of "
         "this machine in /proc")
    graphs = _graphs(args)
    keep = args.repo is not None
    repo = args.repo or Path(tempfile.mkdtemp(prefix="depthvlm-triton-"))
    names = write_triton_repo(graphs, repo, args.triton_model, "python", args.max_batch, args.queue_delay_us,
                              progress=_log)
    _server_environment(args.threads)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    config = TritonConfig(model_repository=repo, grpc_address=args.bind, grpc_port=args.grpc_port,
                          allow_http=args.http, http_address=args.bind, http_port=args.http_port,
                          allow_metrics=args.metrics, metrics_address=args.bind, metrics_port=args.metrics_port,
                          exit_on_error=True)
    host = "localhost" if local or args.bind in ("0.0.0.0", "::") else args.bind  # where this machine reaches it
    triton = Triton(config=config, security_config=TritonSecurityConfig(access_token=token,
                                                                        restricted_endpoints=RESTRICTED_ENDPOINTS))
    try:
        try:
            triton.run()  # the server loads every model of the repository (PyTriton's --load-model=*)
            client = grpcclient.InferenceServerClient(f"{host}:{args.grpc_port}")
            failed = [name for name in names if not client.is_model_ready(name)]
            client.close()
            if failed:
                raise RuntimeError(f"{', '.join(failed)} did not load (the server's log above says why)")
        except Exception as exc:  # PyTriton's and tritonclient's errors: a busy port, a model that fails to load
            first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:300]
            raise InputError(f"the Triton server did not start serving ({first})") from None
        print(f"serving {', '.join(names)} at grpc://{host}:{args.grpc_port} "
              f"(batches of up to {args.max_batch}; repository {repo}); Ctrl-C stops", flush=True)
        while not stop.wait(1.0):
            if not triton.is_alive():
                raise SetupError("the Triton server exited (its log above says why)")
    finally:
        triton.stop()
        if not keep:
            import shutil

            shutil.rmtree(repo, ignore_errors=True)
    return 0

