"""The injected clock: monotonic seconds. Tests pass their own."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["Clock", "monotonic"]

Clock = Callable[[], float]
monotonic: Clock = time.monotonic
