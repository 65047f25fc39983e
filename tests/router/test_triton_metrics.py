"""Parsing Triton's /metrics text (series names and labels as Triton 2.51 prints them)."""

from __future__ import annotations

import pytest

from router.datalayer.triton_metrics import parse_triton_metrics

CPU_ONLY = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="codegen",version="1"} 10
nv_inference_request_success{model="codegen",version="2"} 5
nv_inference_request_success{model="echo",version="1"} 3
# HELP nv_inference_count Number of inferences performed (does not include cached requests)
# TYPE nv_inference_count counter
nv_inference_count{model="codegen",version="1"} 10
nv_inference_count{model="codegen",version="2"} 5
# HELP nv_inference_exec_count Number of model executions performed
# TYPE nv_inference_exec_count counter
nv_inference_exec_count{model="codegen",version="1"} 3
nv_inference_exec_count{model="codegen",version="2"} 2
# HELP nv_inference_pending_request_count Instantaneous number of pending requests
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="codegen",version="1"} 4
nv_inference_pending_request_count{model="codegen",version="2"} 1
# HELP nv_inference_queue_duration_us Cumulative inference queuing duration in microseconds
# TYPE nv_inference_queue_duration_us counter
nv_inference_queue_duration_us{model="codegen",version="1"} 1500
# HELP nv_cpu_memory_used_bytes CPU memory used, bytes
# TYPE nv_cpu_memory_used_bytes gauge
nv_cpu_memory_used_bytes 123456789
"""

GPU = """\
# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{gpu_uuid="GPU-a"} 0.5
nv_gpu_utilization{gpu_uuid="GPU-b"} 0.25
# TYPE nv_gpu_memory_total_bytes gauge
nv_gpu_memory_total_bytes{gpu_uuid="GPU-a"} 1000
nv_gpu_memory_total_bytes{gpu_uuid="GPU-b"} 1000
# TYPE nv_gpu_memory_used_bytes gauge
nv_gpu_memory_used_bytes{gpu_uuid="GPU-a"} 300
nv_gpu_memory_used_bytes{gpu_uuid="GPU-b"} 100
"""


def test_per_model_series_sum_over_versions() -> None:
    m = parse_triton_metrics(CPU_ONLY)
    assert m.pending_by_model == {"codegen": 5}
    assert m.inference_count_by_model == {"codegen": 15}
    assert m.exec_count_by_model == {"codegen": 5}
    assert m.success_by_model == {"codegen": 15, "echo": 3}
    assert m.queue_us_by_model == {"codegen": 1500}
    assert m.pending_requests == 5
    assert m.inference_count == 15


def test_cpu_only_has_no_gpu_figures() -> None:
    m = parse_triton_metrics(CPU_ONLY)
    assert (m.gpu_memory_used_bytes, m.gpu_memory_total_bytes, m.gpu_utilization) == (
        None,
        None,
        None,
    )


def test_gpu_series_sum_memory_and_average_utilisation() -> None:
    m = parse_triton_metrics(GPU)
    assert m.gpu_memory_used_bytes == 400
    assert m.gpu_memory_total_bytes == 2000
    assert m.gpu_utilization == pytest.approx(0.375)


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_exposition(text: str) -> None:
    m = parse_triton_metrics(text)
    assert m.pending_requests == 0 and m.inference_count == 0


def test_garbage_raises_value_error() -> None:
    with pytest.raises(ValueError):
        parse_triton_metrics("this is { not prometheus\n")
