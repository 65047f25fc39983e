"""Parsing Triton's Prometheus metrics into the few figures routing needs."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["TritonMetrics", "parse_triton_metrics"]


@dataclass(frozen=True, slots=True)
class TritonMetrics:
    """One scrape of one instance. Counters are cumulative; rates come from deltas."""

    # Requests queued in Triton per model (all versions), nv_inference_pending_request_count.
    pending_by_model: dict[str, int] = field(default_factory=dict)
    # Inferences (batch items) per model, nv_inference_count.
    inference_count_by_model: dict[str, float] = field(default_factory=dict)
    # Model executions (batches) per model, nv_inference_exec_count.
    exec_count_by_model: dict[str, float] = field(default_factory=dict)
    # Successful requests per model, nv_inference_request_success.
    success_by_model: dict[str, float] = field(default_factory=dict)
    # Cumulative queue time per model in microseconds, nv_inference_queue_duration_us.
    queue_us_by_model: dict[str, float] = field(default_factory=dict)
    # Requests answered per (model, version): nv_inference_request_success plus
    # nv_inference_request_failure over every reason. What demand is counted from.
    requests_by_version: dict[tuple[str, str], float] = field(default_factory=dict)
    # GPU figures, present only when Triton runs with GPUs (the nv_gpu_* series).
    gpu_memory_used_bytes: int | None = None
    gpu_memory_total_bytes: int | None = None
    gpu_utilization: float | None = None

    @property
    def inference_count(self) -> float:
        return sum(self.inference_count_by_model.values())

    @property
    def pending_requests(self) -> int:
        return sum(self.pending_by_model.values())


_PER_MODEL = {
    "nv_inference_pending_request_count": "pending",
    "nv_inference_count": "count",
    "nv_inference_exec_count": "exec",
    "nv_inference_queue_duration_us": "queue",
    "nv_inference_request_success": "success",
}
# Requests answered, summed into `requests_by_version` (failures over every `reason`).
_REQUESTS = {"nv_inference_request_success", "nv_inference_request_failure"}
_GPU = {"nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes", "nv_gpu_utilization"}


def parse_triton_metrics(text: str) -> TritonMetrics:
    """Parses the text exposition of Triton's /metrics; unknown series are ignored."""
    per_model: dict[str, defaultdict[str, float]] = {
        k: defaultdict(float) for k in _PER_MODEL.values()
    }
    gpu: dict[str, list[float]] = defaultdict(list)
    requests: defaultdict[tuple[str, str], float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        # Match by family: the parser names counter samples with a `_total` suffix that
        # Triton's exposition does not have.
        kind = _PER_MODEL.get(family.name)
        for sample in family.samples:
            model = sample.labels.get("model")
            if kind is not None and model:
                per_model[kind][model] += sample.value
            if family.name in _REQUESTS and model:
                requests[(model, sample.labels.get("version", ""))] += sample.value
            elif family.name in _GPU:
                gpu[family.name].append(sample.value)
    used = gpu.get("nv_gpu_memory_used_bytes")
    total = gpu.get("nv_gpu_memory_total_bytes")
    util = gpu.get("nv_gpu_utilization")
    return TritonMetrics(
        pending_by_model={m: int(v) for m, v in per_model["pending"].items()},
        inference_count_by_model=dict(per_model["count"]),
        exec_count_by_model=dict(per_model["exec"]),
        queue_us_by_model=dict(per_model["queue"]),
        success_by_model=dict(per_model["success"]),
        requests_by_version=dict(requests),
        gpu_memory_used_bytes=int(sum(used)) if used else None,
        gpu_memory_total_bytes=int(sum(total)) if total else None,
        gpu_utilization=sum(util) / len(util) if util else None,
    )
