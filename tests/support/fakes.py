"""Fakes shared by the unit tests (pure logic only: a feature's proof runs on real parts)."""

from __future__ import annotations

__all__ = ["FakeClock"]


class FakeClock:
    """Seconds that move only when a test moves them: `clock.now += 5`, or `clock.advance(5)`."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
