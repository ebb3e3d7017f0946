"""Triton backend: the depth path served by a Triton Inference Server over gRPC (``backend: triton``).

The server holds a repository written by ``depthvlm export --triton-repo`` (or runs ``depthvlm
serve``): one model per size, ``PREFIX_WxH`` (:mod:`~depthvlm_ros.backends.triton_repo`). This
backend learns the served sizes from the repository index, refuses models whose
``depthvlm.model_fingerprint`` parameter is not its model's, and sends each frame's processed pixels
(the camera's plan picks the nearest served size, as for any compiled backend); the server's dynamic
batcher joins the requests of many cameras and clients.

Failures are the backend's, not the frame's:

- unreachable at start: :class:`BackendError` naming the URL (the tools exit 2), or with
  ``connect_now=False`` (the node) the backend starts disconnected and says why in :meth:`problem`;
- lost while streaming: the frame fails with :class:`BackendError` (the node drops and counts it;
  its diagnostics turn ERROR with :meth:`problem`), and the next frame at most every
  ``retry_s`` seconds connects again: sizes and fingerprints are read again before it is served.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from depthvlm_ros.backends.base import INPUT_NAME, OUTPUT_NAME, BackendError, DepthBackend, Stage, _no_stage
from depthvlm_ros.backends.triton_repo import DEFAULT_PREFIX, parse_served_name
from depthvlm_ros.errors import InputError

DEFAULT_URL = "localhost:8001"
#: Seconds between connection attempts while the server is unreachable (frames meanwhile fail at once).
RETRY_S = 1.0
#: Seconds a control call (liveness, repository index, a model's config) may take.
CONTROL_TIMEOUT_S = 2.0
#: Seconds one request (a frame) may take before it counts as failed: a few frame periods of a camera at
#: 5-10 Hz (the node's ``triton_timeout_s``). A server slower than that fails frames; it never holds them.
REQUEST_TIMEOUT_S = 1.0
#: The gRPC header that carries the server's access token: Triton prefixes a restricted protocol's key
#: (``--grpc-restricted-protocol=model-repository:triton-access-token=TOKEN``) with ``triton-grpc-protocol-``.
TOKEN_HEADER = "triton-grpc-protocol-triton-access-token"
#: Where a token is found when none is named: this variable, then the file ``depthvlm serve`` writes.
TOKEN_ENV = "DEPTHVLM_TRITON_TOKEN"
TOKEN_FILE_NAME = "triton_token"


class TritonClient(Protocol):
    """A ``tritonclient.grpc.InferenceServerClient`` (an optional dependency), as used here."""

    def is_server_live(self, *, headers: dict[str, str] | None = None, client_timeout: float | None = None) -> bool:
        ...

    def get_model_repository_index(self, *, headers: dict[str, str] | None = None, as_json: bool = False,
                                   client_timeout: float | None = None) -> Any: ...

    def get_model_config(self, model_name: str, *, headers: dict[str, str] | None = None, as_json: bool = False,
                         client_timeout: float | None = None) -> Any: ...

    def infer(self, model_name: str, inputs: list[Any], *, headers: dict[str, str] | None = None,
              client_timeout: float | None = None) -> Any: ...

    def close(self) -> None: ...


def default_token_file() -> Path:
    """The file ``depthvlm serve`` writes its generated token to (mode 0600, in the package's cache)."""
    from depthvlm_ros.model.default import cache_dir

    return cache_dir() / TOKEN_FILE_NAME


def read_token(path: str | Path | None = None) -> str | None:
    """The access token: the first line of ``path``; without one, :data:`TOKEN_ENV`, then
    :func:`default_token_file` if it exists; None when there is none. A token file that others may read
    (group or world permissions) is refused, as ssh refuses such keys."""
    if not path:
        if os.environ.get(TOKEN_ENV):
            return os.environ[TOKEN_ENV].strip()
        path = default_token_file()
        if not path.is_file():
            return None
    path = Path(path)
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise InputError(f"token file {path}: readable by others (mode {stat.S_IMODE(mode):o}); chmod 600 it")
        token = (path.read_text().splitlines() or [""])[0].strip()
    except OSError as exc:
        raise InputError(f"token file {path}: {exc.strerror or exc}") from None
    if not token:
        raise InputError(f"token file {path}: empty")
    return token


@dataclass(frozen=True)
class TritonConnection:
    """How the client reaches a server: address, model prefix, access token, request timeout and TLS: PEM
    files (``root_certificates`` given: gRPC over TLS; with ``private_key`` and ``certificate_chain`` too:
    mutual TLS)."""

    url: str = DEFAULT_URL
    prefix: str = DEFAULT_PREFIX
    token: str | None = None  # the token itself; None: read at each connection attempt (:func:`read_token`)
    timeout_s: float = REQUEST_TIMEOUT_S
    root_certificates: str | None = None
    private_key: str | None = None
    certificate_chain: str | None = None
    token_file: str = ""  # where read_token looks when ``token`` is None ("" = its defaults)

    def headers(self) -> dict[str, str] | None:
        """The request headers that carry the token (None without one). Read now: a token that appears after
        the node started (a server started later) is used at the next connection attempt."""
        token = self.token if self.token is not None else read_token(self.token_file or None)
        return {TOKEN_HEADER: token} if token else None

    def __repr__(self) -> str:  # never the token
        return f"TritonConnection(url={self.url!r}, prefix={self.prefix!r}, token={'set' if self.token else None})"

    @property
    def scheme(self) -> str:
        return "grpcs" if self.root_certificates else "grpc"

    @classmethod
    def from_settings(cls, url: str, prefix: str, token_file: str = "", timeout_s: float = REQUEST_TIMEOUT_S,
                      root_cert: str = "", cert: str = "", key: str = "") -> TritonConnection:
        """A connection from the node's parameters or the tools' options (files read now; empty = unset)."""
        def pem(path: str, what: str) -> str | None:
            if not path:
                return None
            try:
                with open(path, "rb"):
                    return str(path)
            except OSError as exc:
                raise InputError(f"{what} {path}: {exc.strerror or exc}") from None

        if bool(cert) != bool(key):
            raise InputError("a TLS client certificate needs its key, and a key its certificate")
        if (cert or key) and not root_cert:
            raise InputError("a TLS client certificate needs the server's root certificate too")
        if token_file:
            read_token(token_file)  # a missing or readable-by-others file is refused now, in one line
        return cls(url or DEFAULT_URL, prefix or DEFAULT_PREFIX, None, float(timeout_s),
                   pem(root_cert, "TLS root certificate"), pem(key, "TLS key"), pem(cert, "TLS certificate"),
                   token_file)
#: gRPC status codes that mean the server is gone (anything else fails only the request).
LOST = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN")
Size = tuple[int, int]


class TritonBackend(DepthBackend):
    """Depth from the models a Triton server serves under ``prefix``; see the module docstring.

    Thread-safe for one caller of :meth:`depth` (the node's worker) alongside readers of
    :meth:`problem`, :meth:`sizes` and :meth:`describe` (diagnostics): network calls never run under
    the lock, so a server that stops answering never stalls diagnostics.
    """

    name = "triton"
    remote = True

    def __init__(self, connection: TritonConnection = TritonConnection(), expected_fingerprint: str | None = None,
                 connect_now: bool = True, retry_s: float = RETRY_S, log: Callable[[str], None] = print) -> None:
        try:
            import tritonclient.grpc as grpcclient
        except ImportError:
            raise BackendError("tritonclient is not installed (pip install 'tritonclient[grpc]')") from None
        self._grpc = grpcclient
        self.connection = connection
        self.url = connection.url.removeprefix("grpcs://").removeprefix("grpc://")
        self.prefix = connection.prefix
        self._headers: dict[str, str] | None = None  # the token's header, read at each connection attempt
        self.expected_fingerprint = expected_fingerprint
        self.retry_s, self.timeout_s, self.log = retry_s, connection.timeout_s, log
        self._lock = threading.Lock()
        self._client: TritonClient | None = None
        self._models: dict[Size, dict] = {}  # served size -> {"name", "dtype", "max_batch"}
        self._problem = "not connected yet"
        self._connected_once = self._connecting = self._closed = False
        self._last_attempt = -float("inf")
        self._vision_patch = 16
        try:
            self._ready()
        except BackendError as exc:
            if connect_now:
                self.close()
                raise
            self.log(f"{exc}; retrying as frames arrive")

    # -- connection ---------------------------------------------------------------------------

    def _discover(self, client: TritonClient) -> tuple[dict[Size, dict], int]:
        """The served sizes of ``client``'s server, their fingerprints checked; BackendError if none."""
        try:
            client.is_server_live(headers=self._headers, client_timeout=CONTROL_TIMEOUT_S)
            index = client.get_model_repository_index(headers=self._headers, as_json=True,
                                                      client_timeout=CONTROL_TIMEOUT_S)
        except Exception as exc:  # tritonclient's InferenceServerException, grpc errors
            raise BackendError(f"triton server at grpc://{self.url} unreachable ({_first_line(exc)})") from None
        models: dict[Size, dict] = {}
        patch = self._vision_patch
        listed = [entry.get("name", "?") for entry in index.get("models", [])]
        for entry in index.get("models", []):
            size = parse_served_name(entry.get("name", ""), self.prefix)
            if size is None or entry.get("state") != "READY":
                continue
            name = entry["name"]
            try:
                config = client.get_model_config(name, headers=self._headers, as_json=True,
                                                 client_timeout=CONTROL_TIMEOUT_S)["config"]
                params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
                dtype = config["input"][0].get("data_type", "TYPE_FP32")
                max_batch = int(config.get("max_batch_size", 0))
                patch = int(params.get("depthvlm.vision_patch", patch))
            except Exception as exc:  # a model unloaded meanwhile, or a config that is not a depthvlm export's
                self.log(f"triton at grpc://{self.url}: {name} skipped ({exc.__class__.__name__}: "
                         f"{_first_line(exc)})")
                continue
            fingerprint = params.get("depthvlm.model_fingerprint", "")
            if self.expected_fingerprint and fingerprint != self.expected_fingerprint:
                raise BackendError(
                    f"triton at grpc://{self.url}: {name} was exported from other weights (model "
                    f"{fingerprint or 'unknown'}, this model {self.expected_fingerprint}); refused: serve this "
                    "model's repository (depthvlm export --triton-repo, or depthvlm serve --model)")
            if max_batch < 1:
                self.log(f"triton at grpc://{self.url}: {name} skipped (max_batch_size {max_batch}: not batched)")
                continue
            models[size] = {"name": name, "dtype": np.float16 if dtype == "TYPE_FP16" else np.float32,
                            "max_batch": max_batch}
        if not models:
            raise BackendError(f"triton at grpc://{self.url} serves no ready model named {self.prefix}_WxH "
                               f"(models: {', '.join(sorted(listed)) or 'none'})")
        return models, patch

    def _ready(self) -> None:
        """Connected, or try once now (at most every retry_s, never two at once); BackendError meanwhile.

        Every attempt uses a new gRPC channel: an old one's reconnect backoff grows to minutes."""
        with self._lock:
            if self._closed:
                raise BackendError("triton backend closed")
            if not self._problem:
                return
            if self._connecting or time.monotonic() - self._last_attempt < self.retry_s:
                raise BackendError(self._problem)
            self._connecting, self._last_attempt = True, time.monotonic()
            old, self._client = self._client, None
        if old is not None:
            old.close()
        client = None
        try:
            self._headers = self.connection.headers()
            client = self._client_for()
            models, patch = self._discover(client)
        except Exception as exc:
            if client is not None:
                client.close()
            problem = str(exc) if isinstance(exc, BackendError) else \
                f"triton at grpc://{self.url}: {exc.__class__.__name__}: {_first_line(exc)}"
            with self._lock:
                self._problem, self._connecting = problem, False
            raise BackendError(problem) from None
        with self._lock:
            again = self._connected_once
            self._client, self._models, self._vision_patch = client, models, patch
            self._problem, self._connecting, self._connected_once = "", False, True
        if again:
            self.log(f"triton: connected to grpc://{self.url} again")

    def _client_for(self) -> TritonClient:
        """A new gRPC client (channel) for the server, over TLS when the connection names certificates."""
        c = self.connection
        if not c.root_certificates:
            return self._grpc.InferenceServerClient(self.url)
        return self._grpc.InferenceServerClient(self.url, ssl=True, root_certificates=c.root_certificates,
                                                private_key=c.private_key, certificate_chain=c.certificate_chain)

    def problem(self) -> str:
        return self._problem  # one attribute read: never waits for a connection attempt

    # -- the interface ------------------------------------------------------------------------

    def sizes(self) -> list[Size]:
        with self._lock:
            return sorted(self._models)

    def held_sizes(self) -> list[Size]:
        return self.sizes()

    def nearest_size(self, width: int, height: int) -> Size:
        self._ready()
        return super().nearest_size(width, height)

    def describe(self) -> str:
        sizes = ", ".join(f"{w}x{h}" for w, h in self.sizes()) or "none"
        problem = self._problem
        return f"triton (grpc://{self.url}, {self.prefix}, sizes {sizes}{'; ' + problem if problem else ''})"

    def depth(self, inputs, stage: Stage = _no_stage) -> np.ndarray:
        self._ready()
        grid = inputs.image_grid_thw
        _, gh, gw = (int(v) for v in grid[0])
        with self._lock:
            size = (gw * self._vision_patch, gh * self._vision_patch)
            model, client = self._models.get(size), self._client
        if model is None or client is None:
            raise BackendError(f"triton at grpc://{self.url} does not serve {size[0]}x{size[1]}")
        pixels = inputs.pixel_values.numpy() if hasattr(inputs.pixel_values, "numpy") else inputs.pixel_values
        images = np.ascontiguousarray(pixels.reshape(grid.shape[0], -1, pixels.shape[-1]), dtype=model["dtype"])
        kind = "FP16" if images.dtype == np.float16 else "FP32"
        out = []
        with stage("model"):
            for start in range(0, len(images), model["max_batch"]):  # at most the served max_batch_size each
                batch = images[start : start + model["max_batch"]]
                request = self._grpc.InferInput(INPUT_NAME, list(batch.shape), kind)
                request.set_data_from_numpy(batch)
                try:
                    result = client.infer(model["name"], [request], headers=self._headers,
                                          client_timeout=self.timeout_s)
                except Exception as exc:
                    raise self._failed(exc) from None
                out.append(self._checked(result.as_numpy(OUTPUT_NAME), model["name"], (len(batch), size[1], size[0])))
        return np.concatenate(out, axis=0)

    def _checked(self, depth: object, name: str, shape: tuple[int, int, int]) -> np.ndarray:
        """A server's depth output, trusted only as what it must be: float32 of ``shape`` (images, model-grid
        rows and columns), every value finite and positive (metres). Anything else fails the frame."""
        if not isinstance(depth, np.ndarray):
            raise BackendError(f"triton at grpc://{self.url}: {name} returned no {OUTPUT_NAME} output; refused")
        if depth.dtype != np.float32 or depth.shape != shape:
            raise BackendError(f"triton at grpc://{self.url}: {name} returned {depth.dtype} {list(depth.shape)[:4]} "
                               f"where float32 {list(shape)} was due; refused")
        if not np.isfinite(depth).all() or not (depth > 0).all():
            raise BackendError(f"triton at grpc://{self.url}: {name} returned depth that is not finite and positive "
                               "everywhere; refused")
        return depth

    def _failed(self, exc: BaseException) -> BackendError:
        """A failed request's error; a lost server (gRPC UNAVAILABLE, ...) also becomes the problem."""
        status = str(getattr(exc, "status", lambda: "")() or "")
        if any(code in status for code in LOST) or not status:
            message = f"triton server at grpc://{self.url} lost ({_first_line(exc)})"
            with self._lock:
                self._problem, self._last_attempt = message, time.monotonic()
            return BackendError(message)
        return BackendError(f"triton at grpc://{self.url} refused a request ({_first_line(exc)})")

    def close(self) -> None:
        with self._lock:
            client, self._client, self._closed = self._client, None, True
        if client is not None:
            client.close()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]
