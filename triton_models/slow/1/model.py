"""`slow`: OUTPUT0 = INPUT0 after sleeping, standing in for a slow or hung model.

Each execute() sleeps for the largest `SLEEP_MS` of its batch (the config parameter
`sleep_ms` for requests that send none), in short slices, and stops early once every request
of the batch is cancelled (its caller gave up), so a "hung" model can be freed by cancelling.
"""

from __future__ import annotations

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils
from resident_memory import hold_declared

SLICE_S = 0.02


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        parameters = config.get("parameters", {})
        # Holds the declared pointsman.memory_bytes, so placement counts real memory.
        self.ballast = hold_declared(config, lambda m: pb_utils.Logger.log_warn(f"slow: {m}"))
        self.default_sleep_ms = int(parameters.get("sleep_ms", {}).get("string_value", "1000"))

    def _sleep_ms(self, request: object) -> int:
        tensor = pb_utils.get_input_tensor_by_name(request, "SLEEP_MS")
        if tensor is None:
            return self.default_sleep_ms
        return int(np.max(tensor.as_numpy()))

    def execute(self, requests: list[object]) -> list[object]:
        deadline = time.monotonic() + max(self._sleep_ms(r) for r in requests) / 1000.0
        while (left := deadline - time.monotonic()) > 0:
            if all(r.is_cancelled() for r in requests):
                break
            time.sleep(min(SLICE_S, left))
        responses = []
        for request in requests:
            if request.is_cancelled():
                error = pb_utils.TritonError("cancelled", pb_utils.TritonError.CANCELLED)
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            values = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            output = pb_utils.Tensor("OUTPUT0", values.astype(np.float32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[output]))
        return responses
