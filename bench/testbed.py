"""What every compared system runs on, and what a running system offers the benchmark.

A `Testbed` fixes the fleet (instance count, model repository, each model's footprint, the
per-instance memory budget) and what is known in advance (the expected popularity, which a
static placement plans with). Every `System` (Pointsman and each baseline in bench/baselines/)
starts on the same testbed and returns a `Deployment`: real Triton processes, whatever the
system adds (a router and a sidecar, or client-side routing in this process), a `Sender` that
turns (model, request bytes) into a call, and its count of requests that waited for a load.
Loads themselves are counted for every system alike, from the Tritons' repository indexes
(bench.placement_watch), never from the systems' own accounts.

Two kinds of unary testbed. On the **CPU** testbed each request's work is real decoding on
this machine's cores, which every copy of every instance shares: a second copy of a model adds
no capacity (the cores are the limit, whoever holds the model), so placement cannot matter
much there. On the **emulated accelerator** testbed (`EmulatedAccelerator`) each request's
work is a prefill that holds its model copy (a wait, as a prefill holds a GPU) and uses
little of the host's CPU: every copy is its own capacity, as on a fleet with one accelerator
per instance, and where the copies of a hot model are is what decides how much is served.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import tritonclient.grpc as grpcclient

from app.processes import ManagedProcess, stop_all
from app.triton import TritonSpec, prepare_installation, triton_process, wait_until_ready
from bench.calls import Metadata
from bench.loadgen import Call

__all__ = [
    "Deployment",
    "EmulatedAccelerator",
    "Sender",
    "System",
    "Testbed",
    "TritonGroup",
    "check_budget",
    "popularity_order",
    "server_version",
]

MiB = 1024**2

# The shipped codegen's prefill model (triton_models/codegen/1/prefix_cache.py): a prompt of
# the reference length takes PREFILL_RATIO x REFERENCE_COMPLETION_TOKENS decode steps.
_PREFILL_RATIO = 0.26
_REFERENCE_COMPLETION_TOKENS = 13
_REFERENCE_PROMPT_TOKENS = 1469
_BYTES_PER_TOKEN = 4


@dataclass(frozen=True, slots=True)
class EmulatedAccelerator:
    """Model copies whose work holds the copy rather than this machine's cores.

    Each request carries a prompt of the reference length (1469 tokens: the median prompt of
    Azure's 2023 code-completion trace), the prefix cache is off so every prompt is prefilled,
    and the decode step is set so that one prefill lasts `prefill_ms`. The model prefills a
    batch's prompts one after another (compute-bound), so one copy serves at most
    1000 / `prefill_ms` requests per second whatever the batch. Decoding stays on the CPU with
    a small hidden state, so the host's cores are not what limits.
    """

    prefill_ms: float = 40.0
    hidden_size: int = 256
    # What Pointsman's policy is told one copy serves: this share of its ceiling, the
    # utilisation an operator sizes copies for.
    sizing_utilisation: float = 0.8

    @property
    def prompt_bytes(self) -> int:
        return _REFERENCE_PROMPT_TOKENS * _BYTES_PER_TOKEN

    @property
    def copy_ceiling_rps(self) -> float:
        return 1000.0 / self.prefill_ms

    @property
    def per_copy_capacity_rps(self) -> float:
        return self.sizing_utilisation * self.copy_ceiling_rps

    def model_parameters(self) -> dict[str, str]:
        """The config parameters of every model copy (bench.repository)."""
        decode_step_ms = self.prefill_ms / (_PREFILL_RATIO * _REFERENCE_COMPLETION_TOKENS)
        return {
            "hidden_size": str(self.hidden_size),
            "prefix_cache_blocks": "0",
            "prefill_ratio": str(_PREFILL_RATIO),
            "bytes_per_token": str(_BYTES_PER_TOKEN),
            "decode_step_ms": repr(decode_step_ms),
        }

    def describe(self) -> dict[str, object]:
        return {
            "prefill_ms": self.prefill_ms,
            "prompt_bytes": self.prompt_bytes,
            "copy_ceiling_rps": self.copy_ceiling_rps,
            "model_parameters": self.model_parameters(),
        }


@dataclass(frozen=True, slots=True)
class Testbed:
    instances: int
    models: tuple[str, ...]  # in the repository, most popular first (by expectation)
    repository: Path
    footprint_bytes: int  # every model's declared (and allocated) footprint
    budget_bytes: int  # per instance
    expected_popularity: tuple[float, ...]  # per model, what a static placement plans with
    workdir: Path
    # Requests per second one copy serves: Pointsman's policy sizes copies with it.
    per_copy_capacity_rps: float = 20.0
    streaming: bool = False  # the models are decoupled (codegen_stream copies)
    # Set: the emulated accelerator testbed (its copies' parameters are in the repository).
    accelerator: EmulatedAccelerator | None = None

    @property
    def prompt_bytes(self) -> int:
        """Each request's prompt length; 0: the short prompts of bench.calls."""
        return self.accelerator.prompt_bytes if self.accelerator else 0

    @property
    def slots_per_instance(self) -> int:
        """How many models fit in one instance's budget."""
        return self.budget_bytes // self.footprint_bytes

    @property
    def constrained(self) -> bool:
        """Whether the budget makes the choice real: not every model fits on an instance."""
        return self.slots_per_instance < len(self.models)

    def describe(self) -> dict[str, object]:
        return {
            "instances": self.instances,
            "models": list(self.models),
            "footprint_mib": self.footprint_bytes / MiB,
            "budget_mib_per_instance": self.budget_bytes / MiB,
            "models_per_instance": self.slots_per_instance,
            "constrained": self.constrained,
            "expected_popularity": list(self.expected_popularity),
            "per_copy_capacity_rps": self.per_copy_capacity_rps,
            "streaming": self.streaming,
            "accelerator": self.accelerator.describe() if self.accelerator else None,
        }


class Sender(Protocol):
    """Turns a request into a call: unary when `tokens` is None, else a stream read for
    `tokens` responses."""

    def __call__(
        self, model: str, body: bytes, tokens: int | None = None, metadata: Metadata = ()
    ) -> Call: ...


class Deployment(Protocol):
    @property
    def system(self) -> str: ...

    @property
    def tritons(self) -> Sequence[TritonSpec]: ...

    @property
    def triton_pids(self) -> Sequence[int]: ...

    def component_pids(self) -> Mapping[str, int]:
        """Processes the system adds beside Triton ({"router": pid, "sidecar": pid})."""
        ...

    def connect(self, timeout_s: float = 60.0) -> contextlib.AbstractAsyncContextManager[Sender]:
        """A sender for the running event loop (channels are opened and closed with it);
        every call has the deadline `timeout_s`."""
        ...

    def delayed_requests(self) -> int:
        """Requests so far that waited for a model load before they were served."""
        ...

    def stop(self) -> None: ...


class System(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...

    def start(self, bed: Testbed, workdir: Path) -> Deployment:
        """Starts on `bed` with its own processes under `workdir`; ready for traffic."""
        ...


def server_version(address: str) -> str:
    """The Triton server's version, from its metadata."""
    with grpcclient.InferenceServerClient(address) as client:
        return str(client.get_server_metadata().version)


class TritonGroup:
    """`bed.instances` real Tritons on the testbed's repository, each loading its `preload`
    models at start (explicit model control). For the client-side baselines."""

    def __init__(
        self, bed: Testbed, workdir: Path, preload: Sequence[Sequence[str]] = (), prefix: str = "t"
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.specs = [
            TritonSpec.on_free_ports(
                f"{prefix}-{i}",
                model_repository=bed.repository,
                load_models=tuple(preload[i]) if i < len(preload) else (),
                log_path=workdir / f"{prefix}-{i}.log",
            )
            for i in range(bed.instances)
        ]
        installation = prepare_installation()
        self.processes: list[ManagedProcess] = [triton_process(s, installation) for s in self.specs]

    def start(self, timeout_s: float = 120.0) -> None:
        try:
            for process in self.processes:
                process.start()
            with ThreadPoolExecutor(max_workers=len(self.specs)) as pool:
                waits = [
                    pool.submit(wait_until_ready, s.grpc_address, s.load_models, timeout_s, p)
                    for s, p in zip(self.specs, self.processes, strict=True)
                ]
                for wait in waits:
                    wait.result()
        except BaseException:
            self.stop()
            raise

    @property
    def addresses(self) -> list[str]:
        return [s.grpc_address for s in self.specs]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None]

    def stop(self) -> None:
        stop_all(self.processes)


def popularity_order(bed: Testbed) -> list[str]:
    """The models, most popular first by expectation (ties: repository order)."""
    ranked = sorted(range(len(bed.models)), key=lambda i: (-bed.expected_popularity[i], i))
    return [bed.models[i] for i in ranked]


def check_budget(bed: Testbed) -> None:
    if bed.slots_per_instance < 1 or not math.isfinite(bed.footprint_bytes):
        raise ValueError(f"budget {bed.budget_bytes} B holds no model of {bed.footprint_bytes} B")
