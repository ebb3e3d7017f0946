"""The Triton Python-backend model of ``depthvlm serve``: a repository's batched depth graph on ONNX Runtime.

Copied into each served size's version folder as ``model.py`` (:mod:`~depthvlm_ros.backends.triton_repo`)
and run by the Python backend's stub process, never imported by the package itself.

Tensors cross the stub by DLPack: the stub of ``nvidia-pytriton`` 0.7.0 was built against NumPy 1,
and with NumPy 2 (this package's) its ``as_numpy()`` reads wrong strides and ``Tensor(name, array)``
sends empty outputs (measured here). DLPack does not depend on NumPy's C layout. NumPy 2's own
capsule is refused by the stub, PyTorch's is taken: outputs go through ``torch.from_numpy``.

Each execution gets the requests the dynamic batcher joined: their images are stacked, run in one
call of the batched graph, and split back per request.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import to_dlpack

INPUT_NAME, OUTPUT_NAME = "pixel_values", "depth"


class TritonPythonModel:
    """The Python-backend model of one served size: the batched ONNX graph of its version folder on ONNX Runtime
    (CPU), run once per execution on the requests Triton batched together."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.name = config["name"]
        self.max_batch = int(config["max_batch_size"])
        self.dims = [int(d) for d in config["input"][0]["dims"]]
        graph = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        threads = os.environ.get("DEPTHVLM_SERVE_THREADS", "")
        if threads:
            options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.dtype = np.float16 if self.session.get_inputs()[0].type == "tensor(float16)" else np.float32

    def execute(self, requests: list) -> list:
        batches, responses = [], [None] * len(requests)
        for i, request in enumerate(requests):
            pixels = np.array(np.from_dlpack(pb_utils.get_input_tensor_by_name(request, INPUT_NAME)), dtype=self.dtype)
            if list(pixels.shape[1:]) != self.dims:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"{self.name}: pixel_values must be [batch, {', '.join(map(str, self.dims))}], "
                    f"got {list(pixels.shape)}"))
            else:
                batches.append((i, pixels))
        if batches:
            depth = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.concatenate([p for _, p in batches])})[0]
            start = 0
            for i, pixels in batches:
                part = np.ascontiguousarray(depth[start : start + len(pixels)], dtype=np.float32)
                start += len(pixels)
                tensor = pb_utils.Tensor.from_dlpack(OUTPUT_NAME, to_dlpack(torch.from_numpy(part)))
                responses[i] = pb_utils.InferenceResponse(output_tensors=[tensor])
        return responses
