#!/usr/bin/env python3
"""Writes deploy/monitoring/prometheusrule.yaml from ops/prometheus/alerts.yaml.

The alert rules have one source, ops/prometheus/alerts.yaml (commented, promtool-tested);
the Prometheus Operator wants them wrapped in a PrometheusRule. Run after editing them:

    .venv/bin/python deploy/monitoring/generate_prometheusrule.py [--check]

`--check` writes nothing and exits 1 when the checked-in file is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "ops" / "prometheus" / "alerts.yaml"
TARGET = ROOT / "deploy" / "monitoring" / "prometheusrule.yaml"
HEADER = """\
# GENERATED from ops/prometheus/alerts.yaml (the commented source, tested with promtool):
# edit that file, then regenerate this one with
#   .venv/bin/python deploy/monitoring/generate_prometheusrule.py
# tests/test_manifests.py fails when the two differ.
"""


class _Dumper(yaml.SafeDumper):
    pass


def _text(dumper: yaml.SafeDumper, value: str) -> Any:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def render() -> str:
    alerts = yaml.safe_load(SOURCE.read_text())
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "pointsman", "labels": {"release": "kube-prometheus-stack"}},
        "spec": {"groups": alerts["groups"]},
    }
    return HEADER + yaml.dump(rule, Dumper=_Dumper, sort_keys=False, width=100)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if TARGET.read_text() != text:
            print(f"{TARGET} is stale: run {Path(__file__).relative_to(ROOT)}")
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
