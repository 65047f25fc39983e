"""Pointsman's tests: a folder per component (router, sidecar, app, kernel, models) and
integration. Shared helpers and fakes live in tests/support."""
