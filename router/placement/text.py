"""Short, stable renderings of figures for the reasons operators read in ListModels."""

from __future__ import annotations

__all__ = ["copies", "format_bytes", "format_rps"]

_UNITS = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def format_bytes(n: int) -> str:
    """3 << 30 -> '3.0 GiB', 512 << 20 -> '512.0 MiB', 100 -> '100 B'."""
    for unit, size in _UNITS:
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def format_rps(value: float) -> str:
    """120.0 -> '120', 2.345 -> '2.35', 0.01 -> '0.01'."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def copies(n: int) -> str:
    """'1 copy', '2 copies'."""
    return f"{n} copy" if n == 1 else f"{n} copies"
