"""Reading the few figures routing needs from Triton's Prometheus text, and nothing else.

Triton prints some 20 lines per model version (latencies, compute phases, failure reasons,
cache figures) and the router uses a handful of families. Parsing every line with
prometheus_client's general parser cost about 1.5 ms per scrape: 6 cores for 1000 instances
at 4 scrapes a second. So `parse_triton_metrics` finds the wanted lines with one regular
expression (C speed over the text), reads Triton's own spelling of them from its groups, and
parses any other spelling in full: same figures as the general parser (`_general`, kept as
the reference; tests/router/test_triton_metrics.py checks both on real Triton output and on
generated expositions) for about 0.03 ms a page of three models.

Sample lines follow the text exposition format: `name{label="value",...} value [timestamp]`;
label values may hold `\\\\`, `\\"` and `\\n` escapes. A wanted line that does not parse
raises ValueError, as the general parser does; other lines are never read.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "WANTED_FAMILIES",
    "TritonMetrics",
    "parse_triton_metrics",
    "parse_triton_metrics_general",
]


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
    # Requests answered per (model, version): nv_inference_request_success plus
    # nv_inference_request_failure over every reason. What demand is counted from. Failure
    # lines at 0 are not read: a version with neither success line nor failures is absent.
    requests_by_version: dict[tuple[str, str], float] = field(default_factory=dict)
    # Prompt blocks looked up in, and found in, the model's prefix cache: the custom metrics
    # prefix_cache_lookup_blocks_total and prefix_cache_hit_blocks_total of models that have
    # one (triton_models/README.md), per model (all versions); absent for other models.
    prefix_lookups_by_model: dict[str, float] = field(default_factory=dict)
    prefix_hits_by_model: dict[str, float] = field(default_factory=dict)
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


_PENDING = "nv_inference_pending_request_count"
_COUNT = "nv_inference_count"
_EXEC = "nv_inference_exec_count"
_SUCCESS = "nv_inference_request_success"
_FAILURE = "nv_inference_request_failure"
_GPU_USED = "nv_gpu_memory_used_bytes"
_GPU_TOTAL = "nv_gpu_memory_total_bytes"
_GPU_UTIL = "nv_gpu_utilization"
_PREFIX_LOOKUPS = "prefix_cache_lookup_blocks_total"
_PREFIX_HITS = "prefix_cache_hit_blocks_total"
# The families the router reads; every other line is skipped unread.
WANTED_FAMILIES = (
    _PENDING, _COUNT, _EXEC, _SUCCESS, _FAILURE, _GPU_USED, _GPU_TOTAL, _GPU_UTIL,
    _PREFIX_LOOKUPS, _PREFIX_HITS,
)  # fmt: skip

_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_ESCAPE = re.compile(r"\\(.)")
_ESCAPED = {"\\": "\\", '"': '"', "n": "\n"}


def _unescape(value: str) -> str:
    return _ESCAPE.sub(lambda m: _ESCAPED.get(m.group(1), "\\" + m.group(1)), value)


def _labels(text: str) -> dict[str, str]:
    """`model="a",version="1"` -> {"model": "a", "version": "1"}."""
    labels: dict[str, str] = {}
    position = 0
    while position < len(text):
        match = _LABEL.match(text, position)
        if match is None:
            if text[position:].strip():
                raise ValueError(f"bad label set: {text!r}")
            break
        value = match.group(2)
        labels[match.group(1)] = _unescape(value) if "\\" in value else value
        position = match.end()
    return labels


def _value(text: str) -> float:
    """The sample's value: the first field after the name or label set (a timestamp may
    follow). Go's spellings of the special values are accepted, as Prometheus does."""
    fields = text.split()
    if not fields or len(fields) > 2:
        raise ValueError(f"bad sample value: {text!r}")
    value = fields[0]
    special = {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}.get(value)
    return special if special is not None else float(value)


def _sample(line: str, family: str) -> tuple[dict[str, str], float]:
    """Labels and value of one sample line of `family` (the general, slower path)."""
    rest = line[len(family) :]
    if rest.startswith("{"):
        close = _closing_brace(rest)
        return _labels(rest[1:close]), _value(rest[close + 1 :])
    return {}, _value(rest)


def _closing_brace(text: str) -> int:
    """Index of the `}` closing the label set that `text` opens (quotes respected)."""
    if '"}' in text and "\\" not in text:  # Triton's lines: the first `"}` closes it
        close = text.find('"}') + 1
        if text.count('"', 0, close) % 2 == 0:
            return close
    quoted = escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = quoted
        elif char == '"':
            quoted = not quoted
        elif char == "}" and not quoted:
            return index
    raise ValueError(f"unclosed label set: {text!r}")


# Lines of the wanted families. Triton prints them as `name{model="m",version="v"} value`
# (failures add reason="r" between the two): those fill groups 2-4 and are read at C speed.
# Failure lines whose value is 0 (most of them: four reasons per version) match nothing and
# cost nothing. Any other spelling (escapes, other labels or order, a timestamp) fills group
# 5 and goes through the general path.
_PLAIN = r'[^"\\\n]*'  # a label value without escapes
_TRITON_LABELS = rf'\{{model="({_PLAIN})",(?:reason="{_PLAIN}",)?version="({_PLAIN})"\}}'
_ZERO_FAILURE = (
    rf'(?<=failure)\{{model="{_PLAIN}",reason="{_PLAIN}",version="{_PLAIN}"\}} 0(?:\n|$)'
)
_WANTED = re.compile(
    r"\n(nv_inference_(?:pending_request_count|count|exec_count|request_success|request_failure)"
    r"|nv_gpu_(?:memory_used_bytes|memory_total_bytes|utilization)"
    r"|prefix_cache_(?:lookup|hit)_blocks_total)"
    r"(?!" + _ZERO_FAILURE + r")"
    r"(?:" + _TRITON_LABELS + r" ([^ \n]+)(?=\n|$)|([{ ][^\n]*))"
)


def parse_triton_metrics(text: str) -> TritonMetrics:
    """The figures routing needs from Triton's /metrics text; other families are skipped."""
    text = "\n" + (text.replace("\r\n", "\n") if "\r" in text else text)
    sums, requests, gpu = _empty_sums()
    for family, model, version, raw, other in _WANTED.findall(text):
        if other:  # not Triton's usual spelling: parse the line in full
            labels, value = _sample(family + other, family)
            model, version = labels.get("model", ""), labels.get("version", "")
        else:
            value = float(raw)  # also reads Go's +Inf, -Inf and NaN
        per_model = sums.get(family)
        if per_model is not None:
            if model:
                per_model[model] += value
                if family == _SUCCESS:
                    requests[(model, version)] += value
        elif family == _FAILURE:
            if model:
                requests[(model, version)] += value
        else:
            gpu[family].append(value)
    return _figures(sums, requests, gpu)


_Sums = tuple[
    dict[str, defaultdict[str, float]],  # per-model families: model -> sum over versions
    defaultdict[tuple[str, str], float],  # (model, version) -> successes + failures
    dict[str, list[float]],  # GPU family -> a value per GPU
]


def _empty_sums() -> _Sums:
    per_model: dict[str, defaultdict[str, float]] = {
        name: defaultdict(float)
        for name in (_PENDING, _COUNT, _EXEC, _SUCCESS, _PREFIX_LOOKUPS, _PREFIX_HITS)
    }
    return per_model, defaultdict(float), {_GPU_USED: [], _GPU_TOTAL: [], _GPU_UTIL: []}


def _figures(
    sums: dict[str, defaultdict[str, float]],
    requests: defaultdict[tuple[str, str], float],
    gpu: dict[str, list[float]],
) -> TritonMetrics:
    """TritonMetrics from the sums a parser gathered."""
    used, total, util = gpu[_GPU_USED], gpu[_GPU_TOTAL], gpu[_GPU_UTIL]
    return TritonMetrics(
        pending_by_model={m: _count(v, _PENDING) for m, v in sums[_PENDING].items()},
        inference_count_by_model=dict(sums[_COUNT]),
        exec_count_by_model=dict(sums[_EXEC]),
        success_by_model=dict(sums[_SUCCESS]),
        requests_by_version=dict(requests),
        prefix_lookups_by_model=dict(sums[_PREFIX_LOOKUPS]),
        prefix_hits_by_model=dict(sums[_PREFIX_HITS]),
        gpu_memory_used_bytes=_count(sum(used), _GPU_USED) if used else None,
        gpu_memory_total_bytes=_count(sum(total), _GPU_TOTAL) if total else None,
        gpu_utilization=sum(util) / len(util) if util else None,
    )


def _count(value: float, family: str) -> int:
    """A gauge read as a whole number; ValueError for infinities and NaN (not a count)."""
    if not math.isfinite(value):
        raise ValueError(f"{family}: {value} is not a count")
    return int(value)


def parse_triton_metrics_general(text: str) -> TritonMetrics:
    """The same figures through prometheus_client's general parser: the reference that tests
    check `parse_triton_metrics` against, and the benchmark's "before" (bench/collector_cost.py).
    Not used when routing."""
    sums, requests, gpu = _empty_sums()
    for family in text_string_to_metric_families(text):
        # Triton's own families by family name: the parser names counter samples with a
        # `_total` suffix that Triton's exposition does not have. The prefix cache's
        # counters by sample name: those do end in `_total`, which the parser takes off
        # the family's name.
        for sample in family.samples:
            name = sample.name if sample.name in (_PREFIX_LOOKUPS, _PREFIX_HITS) else family.name
            model = sample.labels.get("model")
            if name in sums and model:
                sums[name][model] += sample.value
            if name in (_SUCCESS, _FAILURE) and model:
                requests[(model, sample.labels.get("version", ""))] += sample.value
            elif name in gpu:
                gpu[name].append(sample.value)
    return _figures(sums, requests, gpu)
