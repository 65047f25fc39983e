"""Identity model: OUTPUT0 is INPUT0, unchanged. For measuring proxy overhead."""

import json

import triton_python_backend_utils as pb_utils
from resident_memory import hold_declared


class TritonPythonModel:
    def initialize(self, args):
        # Holds the declared pointsman.memory_bytes, so placement counts real memory.
        config = json.loads(args["model_config"])
        self.ballast = hold_declared(config, lambda m: pb_utils.Logger.log_warn(f"echo: {m}"))

    def execute(self, requests):
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", data)]))
        return responses
