"""OUTPUT0 = INPUT0 + 1: the least work a model can do, so a benchmark measures the proxy."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils
from resident_memory import hold_declared


class TritonPythonModel:
    def initialize(self, args):
        # Holds the declared pointsman.memory_bytes, so placement counts real memory.
        config = json.loads(args["model_config"])
        self.ballast = hold_declared(config, lambda m: pb_utils.Logger.log_warn(f"add_one: {m}"))

    def execute(self, requests):
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            plus_one = (data + np.float32(1)).astype(np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", plus_one)]))
        return responses
