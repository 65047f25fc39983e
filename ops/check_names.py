#!/usr/bin/env python3
"""Checks that every Pointsman metric the ops bundle mentions is one the code exports.

The names come from the code itself, so there is no second list to keep in sync: every call
of a prometheus-client metric class (`Counter`, `Gauge`, `Histogram`, `Summary`, `Info`,
`Enum` and the `*MetricFamily` classes) in router/, sidecar/ and pointsman/ whose first argument
is a literal `pointsman_...` name is a definition. The names Prometheus sees are derived the way
prometheus-client exposes them (a counter `x` is `x_total`, a histogram `x` is `x_bucket`,
`x_sum`, `x_count`), with the label names given at the definition.

Every string in the bundle's files (alert rules, their unit tests, the scrape config, the
Grafana dashboard) is searched for `pointsman_...` names; each must be an exposed series name,
and every label a selector `{...}` on it matches must be one of its labels (or a label
Prometheus adds at scrape time: job, instance; `le` on histogram buckets).

    python ops/check_names.py [FILE ...]    # default: the whole bundle; exit 1 on a mismatch
    python ops/check_names.py --dashboard-rules OUT.yaml
        # writes every dashboard query as a recording rule (Grafana's variables replaced), so
        # `promtool check rules OUT.yaml` checks their PromQL
"""

from __future__ import annotations

import ast
import json
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CODE_DIRS = ("router", "sidecar", "pointsman")
SKIP_DIRS = ("pointsman/router/v1",)  # generated stubs
BUNDLE_GLOBS = ("ops/prometheus/*.yaml", "ops/prometheus/*.yml", "ops/grafana/*.json")

# Series names per metric type, as prometheus-client exposes them (`_created` is only
# exposed when enabled, but a query may name it).
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
}
_CLASSES = {
    "Counter": "counter",
    "CounterMetricFamily": "counter",
    "Gauge": "gauge",
    "GaugeMetricFamily": "gauge",
    "Histogram": "histogram",
    "HistogramMetricFamily": "histogram",
    "Summary": "summary",
    "SummaryMetricFamily": "summary",
    "Info": "info",
    "InfoMetricFamily": "info",
    "Enum": "stateset",
    "StateSetMetricFamily": "stateset",
}
# Labels a scrape adds (job, instance: with honor_labels an exported `instance` wins).
TARGET_LABELS = frozenset({"job", "instance"})
# A series name, optionally followed by a selector's matchers.
_REFERENCE = re.compile(r"\b(pointsman_[A-Za-z0-9_]*)(\{[^}]*\})?")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")


@dataclass(frozen=True)
class Metric:
    name: str  # as defined, e.g. pointsman_sidecar_requests
    kind: str  # counter, gauge, histogram, ...
    labels: frozenset[str]
    defined_in: str

    def series(self) -> dict[str, frozenset[str]]:
        """Exposed series name -> labels it may carry."""
        base = self.name
        if self.kind == "counter":
            base = base.removesuffix("_total")
        if self.kind == "info":
            base = base.removesuffix("_info")
        out = {}
        for suffix in _SUFFIXES[self.kind]:
            extra = {"quantile"} if self.kind == "summary" and not suffix else set()
            if suffix == "_bucket":
                extra = {"le"}
            out[base + suffix] = self.labels | extra
        return out


def _strings(node: ast.AST | None, constants: dict[str, list[str]]) -> list[str] | None:
    """Label names given as a literal list/tuple of strings, or a name bound to one."""
    if isinstance(node, ast.Name):
        return constants.get(node.id)
    if isinstance(node, ast.List | ast.Tuple) and all(
        isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts
    ):
        return [e.value for e in node.elts]  # type: ignore[attr-defined]
    return None


def _definitions(path: Path) -> Iterator[Metric]:
    tree = ast.parse(path.read_text(), filename=str(path))
    constants: dict[str, list[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            values = _strings(node.value, {})
            if isinstance(target, ast.Name) and values is not None:
                constants[target.id] = values
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        cls = ""
        if isinstance(func, ast.Name):
            cls = func.id
        elif isinstance(func, ast.Attribute):
            cls = func.attr
        if cls not in _CLASSES or not node.args:
            continue
        first = node.args[0]
        if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
            continue
        if not first.value.startswith("pointsman_"):
            continue
        label_node = node.args[2] if len(node.args) > 2 else None
        for keyword in node.keywords:
            if keyword.arg in ("labelnames", "labels"):
                label_node = keyword.value
        labels = _strings(label_node, constants) if label_node is not None else []
        if labels is None:
            raise SystemExit(
                f"{path}:{node.lineno}: labels of {first.value} are not a literal list of "
                "strings; ops/check_names.py cannot read them"
            )
        yield Metric(first.value, _CLASSES[cls], frozenset(labels), f"{path.relative_to(ROOT)}")


def known_metrics(root: Path = ROOT) -> dict[str, Metric]:
    """Every metric the code defines, by defined name."""
    found: dict[str, Metric] = {}
    for directory in CODE_DIRS:
        for path in sorted((root / directory).rglob("*.py")):
            relative = path.relative_to(root).as_posix()
            if any(relative.startswith(skip) for skip in SKIP_DIRS):
                continue
            for metric in _definitions(path):
                found[metric.name] = metric
    return found


def known_series(metrics: dict[str, Metric]) -> dict[str, frozenset[str]]:
    """Exposed series name -> labels, over every metric."""
    out: dict[str, frozenset[str]] = {}
    for metric in metrics.values():
        out.update(metric.series())
    return out


def _walk_strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _walk_strings(key)
            yield from _walk_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk_strings(item)


def _load(path: Path) -> Any:
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return yaml.safe_load(path.read_text())


def problems_in(path: Path, series: dict[str, frozenset[str]]) -> tuple[int, list[str]]:
    """(references checked, one line per unknown name or label) for one bundle file."""
    try:
        document = _load(path)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        return 0, [f"{path}: does not parse: {exc}"]
    checked, problems = 0, []
    for text in _walk_strings(document):
        for match in _REFERENCE.finditer(text):
            name, selector = match.group(1), match.group(2) or ""
            checked += 1
            if name not in series:
                problems.append(f"{path}: unknown metric {name}")
                continue
            allowed = series[name] | TARGET_LABELS
            for label in _MATCHER.findall(selector):
                if label not in allowed and label != "__name__":
                    problems.append(
                        f"{path}: {name} has no label {label!r} "
                        f"(labels: {', '.join(sorted(series[name])) or 'none'})"
                    )
    return checked, problems


def bundle_files(root: Path = ROOT) -> list[Path]:
    return sorted(p for pattern in BUNDLE_GLOBS for p in root.glob(pattern))


# Grafana's variables, replaced by values that make a query plain PromQL.
_GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$model": ".*",
    "$instance": ".*",
}


def _queries(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        if isinstance(value.get("expr"), str):
            yield value["expr"]
        for item in value.values():
            yield from _queries(item)
    elif isinstance(value, list):
        for item in value:
            yield from _queries(item)


def dashboard_rules(paths: Sequence[Path]) -> dict[str, Any]:
    """A rules document with one recording rule per dashboard query."""
    rules: list[dict[str, str]] = []
    for path in paths:
        for expr in _queries(json.loads(path.read_text())):
            for variable, value in _GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            rules.append({"record": f"dashboard:query_{len(rules)}", "expr": expr})
    return {"groups": [{"name": "dashboard-queries", "rules": rules}]}


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["--dashboard-rules"] and len(argv) == 2:
        dashboards = sorted(ROOT.glob("ops/grafana/*.json"))
        Path(argv[1]).write_text(yaml.safe_dump(dashboard_rules(dashboards), sort_keys=False))
        return 0
    metrics = known_metrics()
    if not metrics:
        print("ops/check_names.py: no pointsman_ metric definitions found in the code")
        return 1
    series = known_series(metrics)
    files = [Path(a) for a in argv] or bundle_files()
    total, problems = 0, []
    for path in files:
        checked, found = problems_in(path, series)
        total += checked
        problems += found
    for line in problems:
        print(line)
    if problems:
        print(
            f"ops: {len(problems)} unknown metric names or labels (known: {len(metrics)} "
            "metrics defined in router/, sidecar/, pointsman/)"
        )
        return 1
    print(f"ops: {total} metric references in {len(files)} files, all exported by the code")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
