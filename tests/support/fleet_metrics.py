"""Reading a running fleet's Prometheus figures in tests."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from app.fleet import Fleet


def sidecar_counter(fleet: Fleet, family_name: str, model: str | None = None) -> float:
    """The sidecar's counter `family_name` (its _total samples), for one model or all."""
    with urllib.request.urlopen(fleet.sidecar_metrics_url, timeout=5) as response:
        families = text_string_to_metric_families(response.read().decode())
        return sum(
            sample.value
            for family in families
            if family.name == family_name
            for sample in family.samples
            if sample.name.endswith("_total")
            and (model is None or sample.labels.get("model") == model)
        )


def sidecar_cold_starts(fleet: Fleet, model: str | None = None) -> float:
    """pointsman_sidecar_cold_starts_total, for one model or summed over all."""
    return sidecar_counter(fleet, "pointsman_sidecar_cold_starts", model)
