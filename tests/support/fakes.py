"""Fakes shared by the unit tests (pure logic only: a feature's proof runs on real parts)."""

from __future__ import annotations

import asyncio

from router.routes import ModelRoutes, RouteUpdate

__all__ = ["FakeClock", "FakeRouteBook"]


class FakeClock:
    """Seconds that move only when a test moves them: `clock.now += 5`, or `clock.advance(5)`."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeRouteBook:
    """The RouteBook's watcher side: `watch()` queues that get a full snapshot, then every
    `publish()` (call it on the event loop's thread)."""

    def __init__(self, *tables: ModelRoutes) -> None:
        self.tables = {t.model_name: t for t in tables}
        self.queues: set[asyncio.Queue[RouteUpdate | None]] = set()
        self.generation = 1

    def watch(self) -> asyncio.Queue[RouteUpdate | None]:
        queue: asyncio.Queue[RouteUpdate | None] = asyncio.Queue()
        full = tuple(self.tables[name] for name in sorted(self.tables))
        queue.put_nowait(RouteUpdate(True, full, (), self.generation))
        self.queues.add(queue)
        return queue

    def unwatch(self, queue: asyncio.Queue[RouteUpdate | None]) -> None:
        self.queues.discard(queue)

    def publish(self, *tables: ModelRoutes, removed: tuple[str, ...] = ()) -> None:
        self.generation += 1
        for table in tables:
            self.tables[table.model_name] = table
        for name in removed:
            del self.tables[name]
        for queue in self.queues:
            queue.put_nowait(RouteUpdate(False, tables, removed, self.generation))
