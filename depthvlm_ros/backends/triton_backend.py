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

import threading
import time
from collections.abc import Callable

import numpy as np

from depthvlm_ros.backends.base import INPUT_NAME, OUTPUT_NAME, BackendError, DepthBackend, Stage, _no_stage
from depthvlm_ros.backends.triton_repo import DEFAULT_PREFIX, parse_served_name

DEFAULT_URL = "localhost:8001"
#: Seconds between connection attempts while the server is unreachable (frames meanwhile fail at once).
RETRY_S = 1.0
#: Seconds one request (a frame) may take before it counts as failed.
REQUEST_TIMEOUT_S = 30.0
Size = tuple[int, int]


class TritonBackend(DepthBackend):
    """Depth from the models a Triton server serves under ``prefix``; see the module docstring."""

    name = "triton"

    def __init__(self, url: str = DEFAULT_URL, prefix: str = DEFAULT_PREFIX, expected_fingerprint: str | None = None,
                 connect_now: bool = True, retry_s: float = RETRY_S, timeout_s: float = REQUEST_TIMEOUT_S,
                 log: Callable[[str], None] = print) -> None:
        try:
            import tritonclient.grpc as grpcclient
        except ImportError:
            raise BackendError("tritonclient is not installed (pip install 'tritonclient[grpc]')") from None
        self._grpc = grpcclient
        self.url, self.prefix = url.removeprefix("grpc://"), prefix
        self.expected_fingerprint = expected_fingerprint
        self.retry_s, self.timeout_s, self.log = retry_s, timeout_s, log
        self._lock = threading.Lock()
        self._client = None
        self._models: dict[Size, dict] = {}  # served size -> {"name", "dtype", "patch"}
        self._problem = ""
        self._last_attempt = -float("inf")
        self._vision_patch = 16
        try:
            self._connect()
        except BackendError as exc:
            if connect_now:
                raise
            self.log(f"{exc}; retrying as frames arrive")

    # -- connection ---------------------------------------------------------------------------

    def _connect(self) -> None:
        """Read the served sizes and check their fingerprints; BackendError (kept as the problem) if not."""
        self._last_attempt = time.monotonic()
        try:
            client = self._client or self._grpc.InferenceServerClient(self.url)
            client.is_server_live(client_timeout=self.timeout_s)
            index = client.get_model_repository_index(as_json=True, client_timeout=self.timeout_s)
            models: dict[Size, dict] = {}
            for entry in index.get("models", []):
                size = parse_served_name(entry.get("name", ""), self.prefix)
                if size is None or entry.get("state", "READY") != "READY":
                    continue
                config = client.get_model_config(entry["name"], as_json=True, client_timeout=self.timeout_s)["config"]
                params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
                fingerprint = params.get("depthvlm.model_fingerprint", "")
                if self.expected_fingerprint and fingerprint != self.expected_fingerprint:
                    raise BackendError(
                        f"triton at grpc://{self.url}: {entry['name']} was exported from other weights (model "
                        f"{fingerprint or 'unknown'}, this model {self.expected_fingerprint}); refused: serve this "
                        "model's repository (depthvlm export --triton-repo, or depthvlm serve --model)")
                dtype = config["input"][0].get("data_type", "TYPE_FP32")
                models[size] = {"name": entry["name"], "dtype": np.float16 if dtype == "TYPE_FP16" else np.float32}
                self._vision_patch = int(params.get("depthvlm.vision_patch", self._vision_patch))
        except BackendError as exc:
            self._problem = str(exc)
            raise
        except Exception as exc:  # tritonclient's InferenceServerException, grpc errors
            self._problem = f"triton server at grpc://{self.url} unreachable ({_first_line(exc)})"
            raise BackendError(self._problem) from None
        if not models:
            have = ", ".join(sorted(m.get("name", "?") for m in index.get("models", []))) or "none"
            self._problem = (f"triton at grpc://{self.url} serves no ready model named {self.prefix}_WxH "
                             f"(models: {have})")
            raise BackendError(self._problem)
        if self._problem:
            self.log(f"triton: connected to grpc://{self.url} again")
        self._client, self._models, self._problem = client, models, ""

    def _ready(self) -> None:
        """Connected, or connect now (at most every retry_s); BackendError while that fails."""
        with self._lock:
            if not self._problem:
                return
            if time.monotonic() - self._last_attempt < self.retry_s:
                raise BackendError(self._problem)
            self._connect()

    def problem(self) -> str:
        with self._lock:
            return self._problem

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
        state = f"; {self._problem}" if self._problem else ""
        return f"triton (grpc://{self.url}, {self.prefix}, sizes {sizes}{state})"

    def depth(self, inputs, stage: Stage = _no_stage) -> np.ndarray:
        self._ready()
        grid = inputs.image_grid_thw
        _, gh, gw = (int(v) for v in grid[0])
        size = (gw * self._vision_patch, gh * self._vision_patch)
        model = self._models.get(size)
        if model is None:
            raise BackendError(f"triton at grpc://{self.url} does not serve {size[0]}x{size[1]}")
        pixels = inputs.pixel_values.numpy() if hasattr(inputs.pixel_values, "numpy") else inputs.pixel_values
        batch = np.ascontiguousarray(pixels.reshape(grid.shape[0], -1, pixels.shape[-1]), dtype=model["dtype"])
        request = self._grpc.InferInput(INPUT_NAME, list(batch.shape), "FP16" if batch.dtype == np.float16 else "FP32")
        request.set_data_from_numpy(batch)
        with stage("model"):
            try:
                result = self._client.infer(model["name"], [request], client_timeout=self.timeout_s)
            except Exception as exc:  # the server went away, or refused the request
                message = f"triton server at grpc://{self.url} failed a request ({_first_line(exc)})"
                with self._lock:
                    self._problem, self._last_attempt = message, time.monotonic()
                raise BackendError(message) from None
        return result.as_numpy(OUTPUT_NAME).astype(np.float32, copy=False)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]
