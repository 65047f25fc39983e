"""Pointsman: model-aware gRPC routing for fleets of NVIDIA Triton Inference Server.

Packages:
    pointsman   shared pieces: CLI, local fleet, error hierarchy, generated router API.
    router      the central router: data layer, scheduling (contracts, plugins, engine), API.
    sidecar     the per-pod proxy that speaks Triton's own gRPC API.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
