"""Parsing Triton's /metrics text: the router's targeted parser gives what prometheus_client's
general parser gives, on real Triton 2.51 output (committed, and live from the session fleet)
and on generated expositions (hypothesis)."""

from __future__ import annotations

import math
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from hypothesis import given, settings
from hypothesis import strategies as st

from app.fleet import Fleet
from bench.calls import codegen_inputs
from router.datalayer.triton_metrics import (
    WANTED_FAMILIES,
    TritonMetrics,
    parse_triton_metrics,
    parse_triton_metrics_general,
)

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


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _nonzero(requests: dict[tuple[str, str], float]) -> dict[tuple[str, str], float]:
    return {key: value for key, value in requests.items() if value != 0}


def assert_same(text: str, *, exact: bool = False) -> TritonMetrics:
    """Same figures from both parsers. Failure lines at 0 are skipped unread, so a version
    with no success line has no requests entry where the general parser has a 0 (`exact`:
    not even those; Triton prints a success line for every loaded version, but keeps the
    failure series of a version it unloaded)."""
    ours, theirs = parse_triton_metrics(text), parse_triton_metrics_general(text)
    for name in TritonMetrics.__dataclass_fields__:
        mine, reference = getattr(ours, name), getattr(theirs, name)
        if name == "requests_by_version" and not exact:
            mine, reference = _nonzero(mine), _nonzero(reference)
        assert _same(mine, reference), (name, text)
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
        "nv_inference_count{model=a} 1\n",
    ],
)
def test_a_wanted_line_that_does_not_parse_raises_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        parse_triton_metrics(text)


def test_other_spellings_take_the_general_path_and_zero_failures_are_skipped() -> None:
    text = (
        'nv_inference_count{version="1",model="a\\"b"} 3 1700000000\n'
        'nv_inference_request_failure{model="a",reason="X",version="1"} 0\n'
        'nv_inference_request_failure{model="a",reason="Y",version="1"} 2\n'
    )
    m = parse_triton_metrics(text)
    assert m.inference_count_by_model == {'a"b': 3.0}
    assert m.requests_by_version == {("a", "1"): 2.0}


def test_unwanted_lines_are_not_read() -> None:
    """Lines of other families are skipped unread, however broken (the general parser
    would refuse the whole page)."""
    m = parse_triton_metrics('nv_inference_count{model="a",version="1"} 2\nnv_other {{{ x\n')
    assert m.inference_count_by_model == {"a": 2.0}


@pytest.mark.parametrize("text", [CPU_ONLY, GPU, CPU_ONLY + GPU], ids=["cpu", "gpu", "both"])
def test_same_as_the_general_parser_on_examples(text: str) -> None:
    assert_same(text, exact=True)


def test_same_as_the_general_parser_on_real_triton_output() -> None:
    m = assert_same(REAL_CPU_OUTPUT.read_text(), exact=True)
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
    families = draw(st.lists(st.sampled_from(WANTED_FAMILIES + _DECOYS), unique=True, max_size=10))
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
        parse_triton_metrics_general(text)
    except ValueError:  # the general parser refuses it (e.g. an infinite count): no claim
        return
    assert_same(text)


@pytest.mark.triton
def test_same_as_the_general_parser_on_live_triton_output(fleet: Fleet) -> None:
    with grpcclient.InferenceServerClient(fleet.sidecar_address) as client:
        for _ in range(3):
            client.infer("codegen", codegen_inputs("def f():", 4), client_timeout=60)
    busy = 0
    for spec in fleet.tritons:
        with urllib.request.urlopen(spec.metrics_url, timeout=5) as response:
            # Not exact: Triton keeps the failure series (at 0) of an unloaded version.
            m = assert_same(response.read().decode())
        busy += m.inference_count_by_model.get("codegen", 0) > 0
    assert busy >= 1
