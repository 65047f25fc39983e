"""Whether the requested model (and pinned version) is ready or loading on a candidate."""

from __future__ import annotations

from router.contracts import Candidate, RoutingRequest

__all__ = ["model_loading_on", "model_ready_on"]


def model_ready_on(candidate: Candidate, request: RoutingRequest) -> bool:
    """Ready to serve now: the pinned version, or any version when none is pinned."""
    model = candidate.instance.model(request.model_name)
    return model is not None and model.serves(request.model_version)


def model_loading_on(candidate: Candidate, request: RoutingRequest) -> bool:
    """Being loaded: the pinned version, or any version when none is pinned."""
    model = candidate.instance.model(request.model_name)
    if model is None:
        return False
    if request.model_version:
        return request.model_version in model.loading_versions
    return model.is_loading
