"""Baseline `round-robin-load-on-miss`: a WORST CASE, built by the benchmark itself.

Round robin over the instances whatever the model; a request that lands where its model is not
loaded loads it there first, unloading least recently used models that have no request in
flight until the new one fits the budget; requests for a model being loaded wait for the load.
Triton never loads a model because a request asked for it, so the load-on-miss (and its
per-instance lock) is this client's own code: it shows what a model-blind balancer costs when
something does load on demand, not what any product does. Kept as the floor, never the headline.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tritonclient.grpc.aio as grpcclient_aio

from bench.baselines.client_side import ClientSideDeployment, SendTo, started
from bench.loadgen import Responses
from bench.testbed import Testbed, TritonGroup

__all__ = ["LoadOnMiss", "RoundRobinLoadOnMiss"]


class LoadOnMiss:
    """The routing rule: round robin, load on a miss, LRU eviction within the budget."""

    def __init__(self, addresses: Sequence[str], footprint_bytes: int, budget_bytes: int) -> None:
        self.addresses = list(addresses)
        self.footprint_bytes = footprint_bytes
        self.budget_bytes = budget_bytes
        self.loaded: dict[str, OrderedDict[str, None]] = {a: OrderedDict() for a in addresses}
        self.in_flight: Counter[tuple[str, str]] = Counter()
        self.loads = 0
        self.delayed = 0
        self._locks = {a: asyncio.Lock() for a in addresses}
        self._next = itertools.cycle(self.addresses)

    def used_bytes(self, address: str) -> int:
        return self.footprint_bytes * len(self.loaded[address])

    async def send(self, model: str, send_to: SendTo) -> Responses:
        address = next(self._next)
        loaded = self.loaded[address]
        if model in loaded:
            loaded.move_to_end(model)
        else:
            self.delayed += 1
            await self._load(address, model)
        # No await between the check above and this count, so no eviction can slip in.
        self.in_flight[(address, model)] += 1
        try:
            return await send_to(address)()
        finally:
            self.in_flight[(address, model)] -= 1

    async def _load(self, address: str, model: str) -> None:
        async with self._locks[address]:
            loaded = self.loaded[address]
            if model in loaded:  # loaded while this request waited for the lock
                return
            client = grpcclient_aio.InferenceServerClient(address)
            try:
                while self.used_bytes(address) + self.footprint_bytes > self.budget_bytes:
                    idle = [m for m in loaded if self.in_flight[(address, m)] == 0]
                    if not idle:
                        await asyncio.sleep(0.005)  # every copy busy: wait for one to finish
                        continue
                    del loaded[idle[0]]
                    await client.unload_model(idle[0])
                await client.load_model(model)
            finally:
                await client.close()
            loaded[model] = None
            self.loads += 1

    def delayed_requests(self) -> int:
        return self.delayed


@dataclass(frozen=True, slots=True)
class RoundRobinLoadOnMiss:
    name: str = "round-robin-load-on-miss"
    description: str = (
        "WORST CASE: round robin whatever the model, loading a missing model where the request "
        "lands (LRU eviction within the budget); the load-on-miss is this benchmark's own code"
    )

    def start(self, bed: Testbed, workdir: Path) -> ClientSideDeployment:
        group = TritonGroup(bed, workdir, prefix="rr")
        rule = LoadOnMiss(group.addresses, bed.footprint_bytes, bed.budget_bytes)
        return started(self.name, group, rule)
