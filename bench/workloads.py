"""Workloads shaped like code-generation traffic, all seeded.

- **steady**: Zipf popularity over the models (a few hot, a long cold tail), fixed.
- **shift**: the same, until the popularity ranking reverses at a given moment: yesterday's
  coldest model becomes today's hottest (`ModelChooser` with `shift_at_s`).
- **bursts**: on/off arrivals (`on_off_arrivals`): `peak` times the mean rate for `on_s`,
  then a trickle for `off_s`, with the same mean rate as a steady run.
- **streaming**: the models are decoupled; each request streams its tokens, measured for time
  to first token and inter-token latency (bench.calls.TritonCalls.stream).
- **accelerator** (`-acc` in the name): the same shapes on the emulated accelerator testbed
  (bench.testbed.EmulatedAccelerator), where each copy is its own capacity, with prompts of
  the reference length (`long_prompt`).

Open loop at a fraction of measured capacity or closed loop with N clients: `WORKLOADS` names
every cell the comparison scenario can run.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from bench.loadgen import poisson_arrivals

__all__ = [
    "WORKLOADS",
    "ModelChooser",
    "Workload",
    "long_prompt",
    "on_off_arrivals",
    "shifted",
]

Loop = Literal["closed", "open"]


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    loop: Loop
    load_factor: float = 1.0  # open loop: offered mean rate / measured capacity
    shift_at: float | None = None  # fraction of the measured window when popularity reverses
    bursts: bool = False
    streaming: bool = False
    accelerator: bool = False  # on the emulated accelerator testbed

    @property
    def testbed(self) -> str:
        """Which testbed it runs on: "streaming", "accelerator" or "unary" (the CPU one)."""
        if self.streaming:
            return "streaming"
        return "accelerator" if self.accelerator else "unary"

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "loop": self.loop,
            "load_factor": self.load_factor if self.loop == "open" else None,
            "shift_at": self.shift_at,
            "bursts": self.bursts,
            "streaming": self.streaming,
            "accelerator": self.accelerator,
        }


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("steady-closed", "closed"),
        Workload("steady-open-50", "open", 0.5),
        Workload("steady-open-80", "open", 0.8),
        Workload("steady-open-100", "open", 1.0),
        Workload("steady-open-120", "open", 1.2),
        Workload("shift-open-80", "open", 0.8, shift_at=0.5),
        Workload("shift-closed", "closed", shift_at=0.5),
        Workload("bursts-open-80", "open", 0.8, bursts=True),
        Workload("streaming-closed", "closed", streaming=True),
        Workload("steady-acc-closed", "closed", accelerator=True),
        Workload("shift-acc-closed", "closed", shift_at=0.5, accelerator=True),
        Workload("shift-acc-open-80", "open", 0.8, shift_at=0.5, accelerator=True),
    )
}

# Code-ish filler that pads a prompt to a given length (a source file's worth of context).
_FILLER = (
    "    for index, item in enumerate(items):\n"
    "        if item is None:\n"
    "            continue\n"
    "        result.append(transform(item, index))\n"
    "    return result\n\n"
    "def transform(value, position):\n"
    "    return value * 2 + position\n\n"
)


def long_prompt(prompt: str, size_bytes: int) -> str:
    """`prompt` preceded by filler code up to `size_bytes` bytes in all (ASCII); `prompt`
    itself when it is already that long or `size_bytes` is 0. The prompt's own text comes
    last, as a completion request's cursor does."""
    missing = size_bytes - len(prompt.encode())
    if missing <= 0:
        return prompt
    filler = (_FILLER * (missing // len(_FILLER) + 1))[:missing]
    return filler + prompt


def shifted(popularity: Sequence[float]) -> list[float]:
    """The popularity after the shift: the ranking reversed (the coldest model is the hottest)."""
    return list(reversed(popularity))


class ModelChooser:
    """Which model each request asks for: drawn from the popularity in force at its time, from
    `streams` seeded random streams (one per closed-loop worker; one for an open loop, whose
    arrivals are drawn in order)."""

    def __init__(
        self,
        models: Sequence[str],
        popularity: Sequence[float],
        *,
        seed: int,
        streams: int = 1,
        shift_at_s: float | None = None,
    ) -> None:
        if len(models) != len(popularity):
            raise ValueError("one popularity share per model")
        self.models = list(models)
        self.before = list(popularity)
        self.after = shifted(popularity)
        self.shift_at_s = shift_at_s
        self._rngs = [random.Random(seed * 7919 + stream) for stream in range(max(1, streams))]

    def popularity_at(self, at_s: float) -> list[float]:
        shifted_now = self.shift_at_s is not None and at_s >= self.shift_at_s
        return self.after if shifted_now else self.before

    def rng(self, key: int) -> random.Random:
        return self._rngs[key % len(self._rngs)]

    def choose(self, key: int, at_s: float) -> str:
        return self.rng(key).choices(self.models, weights=self.popularity_at(at_s))[0]


def on_off_arrivals(
    mean_rate_rps: float,
    duration_s: float,
    rng: random.Random,
    *,
    on_s: float = 2.0,
    off_s: float = 4.0,
    peak: float = 2.5,
) -> list[float]:
    """Poisson arrivals at `peak` x the mean rate during each `on_s`, and at the rate that keeps
    the mean during each `off_s` after it; offsets in [0, duration_s)."""
    period = on_s + off_s
    low = (period - peak * on_s) / off_s
    if low < 0:
        raise ValueError(f"peak {peak} x {on_s} s exceeds the mean over a {period} s period")
    arrivals: list[float] = []
    start = 0.0
    while start < duration_s:
        for offset, length, factor in ((0.0, on_s, peak), (on_s, off_s, low)):
            begin = start + offset
            span = min(length, duration_s - begin)
            if span > 0 and factor > 0:
                arrivals += [begin + t for t in poisson_arrivals(mean_rate_rps * factor, span, rng)]
        start += period
    return arrivals
