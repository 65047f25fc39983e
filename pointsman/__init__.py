"""Pointsman: model-aware gRPC routing for fleets of NVIDIA Triton Inference Server.

Packages:
    pointsman   the kernel: errors, TLS, auth, telemetry, clock, the generated router API.
    router      the central router: data layer, scheduling (contracts, plugins, engine), API.
    sidecar     the per-pod proxy that speaks Triton's own gRPC API.
    app, bench  the application: the `pointsman` command, local fleet, benchmarks.
The kernel imports neither component; see the layers in pyproject.toml.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
