"""`accumulate`: OUTPUT = the sum of INPUT over the requests of one sequence so far.

Triton's sequence batcher gives every request its control tensors: START (1 on a sequence's
first request), END (1 on its last), READY (0 for a batch slot with no request) and CORRID
(the correlation id). The sums are kept here, keyed by correlation id: a sequence whose steps
reach another instance finds no sum there (Triton refuses a step without START for a sequence
it does not know before the model sees it). A sequence's sum is dropped at END, or when
Triton's `max_sequence_idle_microseconds` passes and Triton ends it (its next step then needs
START again); sums of sequences Triton dropped without telling the model are cleared after the
same idle time.
"""

from __future__ import annotations

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils
from resident_memory import hold_declared


def _flag(request: object, name: str) -> bool:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return tensor is not None and bool(tensor.as_numpy().reshape(-1)[0])


def _value(request: object, name: str) -> int:
    return int(pb_utils.get_input_tensor_by_name(request, name).as_numpy().flat[0])


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        # Holds the declared pointsman.memory_bytes, so placement counts real memory.
        self.ballast = hold_declared(config, lambda m: pb_utils.Logger.log_warn(f"accumulate: {m}"))
        idle_us = int(config["sequence_batching"].get("max_sequence_idle_microseconds", 1000000))
        self.idle_s = idle_us / 1e6
        # correlation id -> (running sum, monotonic time of its last step)
        self.sums: dict[int, tuple[int, float]] = {}

    def execute(self, requests: list[object]) -> list[object]:
        now = time.monotonic()
        responses = []
        for request in requests:
            value = 0
            if _flag(request, "READY"):
                corrid = _value(request, "CORRID")
                step = _value(request, "INPUT")
                start = _flag(request, "START")
                before = 0 if start else self.sums.get(corrid, (0, now))[0]
                value = before + step
                if _flag(request, "END"):
                    self.sums.pop(corrid, None)
                else:
                    self.sums[corrid] = (value, now)
            out = pb_utils.Tensor("OUTPUT", np.array([[value]], dtype=np.int32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        self._forget_idle(now)
        return responses

    def _forget_idle(self, now: float) -> None:
        stale = [c for c, (_, at) in self.sums.items() if now - at > 2 * self.idle_s]
        for corrid in stale:
            del self.sums[corrid]
