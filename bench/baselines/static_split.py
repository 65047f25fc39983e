"""Baseline `static-split`: models placed once by expected popularity, least-request routing.

The strongest simple alternative: an operator who knows the expected popularity places
copies once, within the budget, and routes by model name with power-of-two-choices on the
client's own in-flight counts among the model's holders (Envoy's LEAST_REQUEST). Nothing
moves afterwards: when popularity shifts, the placement stays where it was planned.

Placement (`plan_static_split`): every model gets one copy while slots remain (most popular
first); the remaining slots go to the models with the largest popularity per copy (D'Hondt),
never two copies of a model on one instance; each copy goes to the instance with the most free
slots. A model with no copy is sent round robin and fails with Triton's own error.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.baselines.client_side import ClientSideDeployment, SendTo, started
from bench.loadgen import Responses
from bench.testbed import Testbed, TritonGroup, popularity_order

__all__ = ["LeastRequest", "StaticSplit", "plan_static_split"]


def plan_static_split(bed: Testbed) -> list[list[str]]:
    """Per instance, the models it loads (see the module docstring for the rule)."""
    slots = bed.slots_per_instance
    free = [slots] * bed.instances
    placed: list[list[str]] = [[] for _ in range(bed.instances)]
    share = dict(zip(bed.models, bed.expected_popularity, strict=True))
    copies: Counter[str] = Counter()

    def place(model: str) -> bool:
        options = [i for i in range(bed.instances) if free[i] > 0 and model not in placed[i]]
        if not options:
            return False
        target = max(options, key=lambda i: (free[i], -i))
        placed[target].append(model)
        free[target] -= 1
        copies[model] += 1
        return True

    for model in popularity_order(bed):
        place(model)
    while sum(free) > 0:
        wanted = sorted(
            (m for m in bed.models if 0 < copies[m] < bed.instances),
            key=lambda m: (-share[m] / (copies[m] + 1), bed.models.index(m)),
        )
        if not any(place(m) for m in wanted):
            break
    return placed


class LeastRequest:
    """Power of two choices on in-flight requests among a model's holders."""

    def __init__(
        self, holders: Mapping[str, Sequence[str]], addresses: Sequence[str], rng: random.Random
    ) -> None:
        self._holders = {m: list(a) for m, a in holders.items()}
        self._in_flight: Counter[str] = Counter()
        self._rng = rng
        self._elsewhere = itertools.cycle(addresses)

    def choose(self, model: str) -> str:
        holders = self._holders.get(model)
        if not holders:
            return next(self._elsewhere)
        if len(holders) == 1:
            return holders[0]
        a, b = self._rng.sample(holders, 2)
        return a if self._in_flight[a] <= self._in_flight[b] else b

    async def send(self, model: str, send_to: SendTo) -> Responses:
        address = self.choose(model)
        self._in_flight[address] += 1
        try:
            return await send_to(address)()
        finally:
            self._in_flight[address] -= 1

    def delayed_requests(self) -> int:
        return 0


@dataclass(frozen=True, slots=True)
class StaticSplit:
    seed: int = 7
    name: str = "static-split"
    description: str = (
        "models placed once by expected popularity within the budget; per model, power of "
        "two choices on in-flight requests among its holders (Envoy LEAST_REQUEST)"
    )

    def start(self, bed: Testbed, workdir: Path) -> ClientSideDeployment:
        plan = plan_static_split(bed)
        group = TritonGroup(bed, workdir, plan, prefix="ss")
        holders: dict[str, list[str]] = {}
        for address, models in zip(group.addresses, plan, strict=True):
            for model in models:
                holders.setdefault(model, []).append(address)
        router = LeastRequest(holders, group.addresses, random.Random(self.seed))
        return started(self.name, group, router)
