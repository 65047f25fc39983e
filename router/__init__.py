"""The Pointsman router: watches Triton instances and decides where requests go.

Layout (contracts, plugins, engine):
    contracts.py      value types and plugin protocols; no I/O, no behaviour beyond helpers
    plugins/          one module per filter, scorer or picker, registered in plugins/registry.py
    scheduling.py     the engine: filters -> weighted scorers -> picker
    datalayer/        collectors that refresh instance views and publish immutable snapshots
    routes.py         route tables built from snapshots, published to watchers
    service.py        the gRPC RouterService (PickTarget spans)
    metrics.py        Prometheus metrics (names and meanings in README.md here)
    config.py         typed, frozen configuration
"""
