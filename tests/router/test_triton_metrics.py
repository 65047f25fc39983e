"""Parsing Triton's /metrics text: the router's targeted parser gives what prometheus_client's
general parser gives, on real Triton 2.51 output (committed, and live from the session fleet)
and on generated expositions (hypothesis)."""

from __future__ import annotations

import math
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from app.fleet import Fleet
from app.workload import codegen_inputs
from router.datalayer.triton_metrics import WANTED_FAMILIES, TritonMetrics, parse_triton_metrics

REAL_CPU_OUTPUT = Path(__file__).parent / "data" / "triton_2.51_cpu_metrics.txt"

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


def reference_parse(text: str) -> TritonMetrics:
    """The same figures through prometheus_client's general parser (what the router used
    before its targeted parser, at about 1.5 ms a scrape)."""
    per_model = {
        "nv_inference_pending_request_count": defaultdict(float),
        "nv_inference_count": defaultdict(float),
        "nv_inference_exec_count": defaultdict(float),
        "nv_inference_request_success": defaultdict(float),
    }
    requests: defaultdict[tuple[str, str], float] = defaultdict(float)
    gpu: defaultdict[str, list[float]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            model = sample.labels.get("model")
            if family.name in per_model and model:
                per_model[family.name][model] += sample.value
            if family.name in ("nv_inference_request_success", "nv_inference_request_failure"):
                if model:
                    requests[(model, sample.labels.get("version", ""))] += sample.value
            elif family.name.startswith("nv_gpu_") and family.name in WANTED_FAMILIES:
                gpu[family.name].append(sample.value)
    used, total = gpu.get("nv_gpu_memory_used_bytes"), gpu.get("nv_gpu_memory_total_bytes")
    util = gpu.get("nv_gpu_utilization")
    return TritonMetrics(
        pending_by_model={
            m: int(v) for m, v in per_model["nv_inference_pending_request_count"].items()
        },
        inference_count_by_model=dict(per_model["nv_inference_count"]),
        exec_count_by_model=dict(per_model["nv_inference_exec_count"]),
        success_by_model=dict(per_model["nv_inference_request_success"]),
        requests_by_version=dict(requests),
        gpu_memory_used_bytes=int(sum(used)) if used else None,
        gpu_memory_total_bytes=int(sum(total)) if total else None,
        gpu_utilization=sum(util) / len(util) if util else None,
    )


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def assert_same(text: str) -> TritonMetrics:
    ours, theirs = parse_triton_metrics(text), reference_parse(text)
    for name in TritonMetrics.__dataclass_fields__:
        assert _same(getattr(ours, name), getattr(theirs, name)), name
    return ours


def test_per_model_series_sum_over_versions() -> None:
    m = parse_triton_metrics(CPU_ONLY)
    assert m.pending_by_model == {"codegen": 5}
    assert m.inference_count_by_model == {"codegen": 15}
    assert m.exec_count_by_model == {"codegen": 5}
    assert m.success_by_model == {"codegen": 15, "echo": 3}
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


@pytest.mark.parametrize(
    "text",
    [
        'nv_inference_count{model="a",version="1"} twelve\n',
        'nv_inference_count{model="a,version="1"} 1\n',
        'nv_inference_count{model=a} 1\n',
    ],
)
def test_a_wanted_line_that_does_not_parse_raises_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        parse_triton_metrics(text)


def test_unwanted_lines_are_not_read() -> None:
    """Lines of other families are skipped unread, however broken (the general parser
    would refuse the whole page)."""
    m = parse_triton_metrics('nv_inference_count{model="a",version="1"} 2\nnv_other {{{ x\n')
    assert m.inference_count_by_model == {"a": 2.0}


@pytest.mark.parametrize("text", [CPU_ONLY, GPU, CPU_ONLY + GPU], ids=["cpu", "gpu", "both"])
def test_same_as_the_general_parser_on_examples(text: str) -> None:
    assert_same(text)


def test_same_as_the_general_parser_on_real_triton_output() -> None:
    m = assert_same(REAL_CPU_OUTPUT.read_text())
    assert m.inference_count_by_model == {"add_one": 20.0, "codegen": 0.0, "echo": 20.0}
    assert m.requests_by_version[("codegen", "2")] == 0.0


# -- generated expositions ---------------------------------------------------------------

_DECOYS = (
    "nv_inference_request_duration_us",
    "nv_inference_count_extra",
    "nv_inference_queue_duration_us",
    "nv_cpu_utilization",
    "nv_gpu_power_usage",
)
_LABEL_VALUES = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=12
)
_NUMBERS = st.one_of(
    st.integers(0, 10**12).map(str),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e15, max_value=1e15).map(repr),
    st.sampled_from(["+Inf", "-Inf", "NaN", "1e3", "2.5E-2", "0"]),
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@st.composite
def _sample_line(draw: st.DrawFn, family: str) -> str:
    labels: dict[str, str] = {}
    if family.startswith("nv_gpu_"):
        if draw(st.booleans()):
            labels["gpu_uuid"] = draw(_LABEL_VALUES)
    else:
        labels["model"] = draw(st.one_of(st.sampled_from(["codegen", "echo", ""]), _LABEL_VALUES))
        labels["version"] = draw(st.sampled_from(["1", "2", "", "10"]))
        if family == "nv_inference_request_failure" or draw(st.booleans()):
            labels["reason"] = draw(st.sampled_from(["REJECTED", "BACKEND", "x"]))
    extra = draw(st.dictionaries(st.sampled_from(["gpu_uuid", "zone", "k"]), _LABEL_VALUES))
    labels |= {k: v for k, v in extra.items() if k not in labels}
    names = draw(st.permutations(sorted(labels)))
    body = ",".join(f'{name}="{_escape(labels[name])}"' for name in names)
    label_set = f"{{{body}}}" if labels or draw(st.booleans()) else ""
    timestamp = f" {draw(st.integers(0, 2**40))}" if draw(st.booleans()) else ""
    return f"{family}{label_set} {draw(_NUMBERS)}{timestamp}"


@st.composite
def _exposition(draw: st.DrawFn) -> str:
    families = draw(
        st.lists(st.sampled_from(WANTED_FAMILIES + _DECOYS), unique=True, max_size=10)
    )
    lines: list[str] = []
    for family in families:
        if draw(st.booleans()):
            lines.append(f"# HELP {family} some help text")
        if draw(st.booleans()):
            kind = draw(st.sampled_from(["counter", "gauge", "untyped"]))
            lines.append(f"# TYPE {family} {kind}")
        lines += draw(st.lists(_sample_line(family), min_size=0, max_size=6, unique=True))
    return "\n".join(lines) + ("\n" if draw(st.booleans()) else "")


@settings(max_examples=150, deadline=None)
@given(_exposition())
def test_same_as_the_general_parser_on_generated_expositions(text: str) -> None:
    try:
        reference = reference_parse(text)
    except (ValueError, OverflowError):  # refused (or an infinite count): so must we
        with pytest.raises(ValueError):
            parse_triton_metrics(text)
        return
    ours = parse_triton_metrics(text)
    for name in TritonMetrics.__dataclass_fields__:
        assert _same(getattr(ours, name), getattr(reference, name)), (name, text)


@pytest.mark.triton
def test_same_as_the_general_parser_on_live_triton_output(fleet: Fleet) -> None:
    with grpcclient.InferenceServerClient(fleet.sidecar_address) as client:
        for _ in range(3):
            client.infer("codegen", codegen_inputs("def f():", 4), client_timeout=60)
    busy = 0
    for spec in fleet.tritons:
        with urllib.request.urlopen(spec.metrics_url, timeout=5) as response:
            m = assert_same(response.read().decode())
        busy += m.inference_count_by_model.get("codegen", 0) > 0
    assert busy >= 1
