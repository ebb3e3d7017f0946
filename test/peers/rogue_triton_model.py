"""A Triton Python-backend model that misbehaves on purpose, for test_faults.py (never part of the package).

Its config's parameter ``mode`` says how: ``shape`` (a 2x2 depth per image), ``nan`` (the right shape, all
NaN), ``empty`` (a response with no output), ``stall`` (creates the file named by ``marker``, then waits
``stall_s`` before answering). Tensors cross the stub by DLPack, as in depthvlm_ros/backends/
triton_python_model.py (this stub reads NumPy 2 arrays wrongly).
"""

import json
import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import to_dlpack


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.mode, self.marker = params["mode"], params.get("marker", "")
        self.stall_s = float(params.get("stall_s", "30"))
        self.size = [int(params["depthvlm.height"]), int(params["depthvlm.width"])]

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            images = int(np.from_dlpack(pb_utils.get_input_tensor_by_name(request, "pixel_values")).shape[0])
            if self.mode == "stall":
                open(self.marker, "w").close()
                time.sleep(self.stall_s)
            if self.mode == "empty":
                responses.append(pb_utils.InferenceResponse(output_tensors=[]))
                continue
            shape = [images, 2, 2] if self.mode == "shape" else [images, *self.size]
            depth = np.full(shape, np.nan if self.mode == "nan" else 2.0, dtype=np.float32)
            tensor = pb_utils.Tensor.from_dlpack("depth", to_dlpack(torch.from_numpy(depth)))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses
