"""The systems of the prefix scenario, on one testbed: Tritons that each serve one streaming
code model with a prefix cache (`codegen_stream`, triton_models/README.md).

- `round-robin` (in this process): per-request round robin over the instances, what a
  Kubernetes Service with a gRPC-aware balancer gives;
- `least-request` (in this process): power of two choices on the client's in-flight counts
  (Envoy LEAST_REQUEST);
- `pointsman` (router + sidecar): the default policy, no prefix routing (the model declares no
  prompt input);
- `pointsman-prefix` (router + sidecar): the policy's `prefix_routing` for the model,
  bounded-load consistent hashing on the prompt prefix;
- `ideal` (in this process): every request finds its prefix: each instance's cache is warmed
  with every repository's context before the window and is large enough to keep everything,
  a session's turns stay on one instance, completions go least-request.

Every system starts the same Tritons fresh (the same repository, model and cache size, except
the ideal's larger cache, which is what makes it the bound), is warmed up by the same workload
before its window, and routes among the same instances; the model's `prefill_ratio` is the
testbed's. The client-side systems pay no proxy hop: that favours them.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import zlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import grpc
import yaml

from app.fleet import Fleet, FleetConfig
from bench.baselines.client_side import ClientSideDeployment, SendTo, started
from bench.baselines.everything_everywhere import RoundRobin
from bench.baselines.static_split import LeastRequest
from bench.calls import Metadata, TritonCalls, codegen_request
from bench.loadgen import Call, Responses
from bench.pointsman_fleet import PointsmanDeployment
from bench.prefix_workload import repository_context
from bench.repository import bench_repository
from bench.testbed import Deployment, Sender, Testbed, TritonGroup

__all__ = [
    "MODEL",
    "PREFIX_SYSTEMS",
    "SESSION_HEADER",
    "PrefixBed",
    "PrefixSystem",
    "prefix_repository",
    "testbed",
]

MODEL = "codegen_stream"
SESSION_HEADER = "x-session-id"


@dataclass(frozen=True, slots=True)
class PrefixBed:
    """The testbed of one prefill ratio: `bed.repository` serves every system but the ideal,
    `ideal_repository` the same model with a cache that keeps everything."""

    bed: Testbed
    ideal_repository: Path
    prefill_ratio: float
    cache_blocks: int
    ideal_cache_blocks: int
    repositories: int  # the workload's: the ideal warms each one's context
    context_bytes: int
    epsilon: float = 0.25

    def describe(self) -> dict[str, object]:
        return {
            **self.bed.describe(),
            "model": MODEL,
            "prefill_ratio": self.prefill_ratio,
            "cache_blocks": self.cache_blocks,
            "ideal_cache_blocks": self.ideal_cache_blocks,
            "epsilon": self.epsilon,
        }


class PrefixSystem(Protocol):
    """A system of this scenario (the `System` of bench.testbed, on a `PrefixBed`)."""

    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...

    def start(self, prefix_bed: PrefixBed, workdir: Path) -> Deployment:
        """Starts fresh on `prefix_bed` with its own processes under `workdir`."""
        ...


def _set_parameter(config: str, key: str, value: str) -> str:
    pattern = rf'(key: "{re.escape(key)}" value: \{{ string_value: )"[^"]*"'
    text, replaced = re.subn(pattern, rf'\1"{value}"', config)
    if replaced != 1:
        raise ValueError(f"the model config has no parameter {key}")
    return text


def prefix_repository(
    root: Path, *, prefill_ratio: float, cache_blocks: int, footprint_bytes: int
) -> Path:
    """A repository with `codegen_stream` (linked to the shipped model) at this prefill ratio
    and cache size, declaring (and allocating) `footprint_bytes`."""
    bench_repository(root, (MODEL,), template=MODEL, footprint_bytes=footprint_bytes)
    config = root / MODEL / "config.pbtxt"
    text = _set_parameter(config.read_text(), "prefill_ratio", f"{prefill_ratio:g}")
    config.write_text(_set_parameter(text, "prefix_cache_blocks", str(cache_blocks)))
    return root


# -- client-side systems -----------------------------------------------------------------------


class IdealDeployment(ClientSideDeployment):
    """The ideal's Tritons: a client-side deployment whose rule also learns each request's
    session (its `x-session-id`), handed over with the model's name (`IdealRoute.send`)."""

    @contextlib.asynccontextmanager
    async def connect(self, timeout_s: float = 60.0) -> AsyncIterator[Sender]:
        async with super().connect(timeout_s) as plain:

            def send(
                model: str, body: bytes, tokens: int | None = None, metadata: Metadata = ()
            ) -> Call:
                session = next((v for k, v in metadata if k == SESSION_HEADER), "")
                return plain(f"{model}{_SESSION_MARK}{session}", body, tokens, metadata)

            yield send


_SESSION_MARK = "\0"


class IdealRoute:
    """A session's turns to one instance (a hash of its id: spread evenly, no state), every
    other request least-request. The session comes after the model's name (`IdealDeployment`;
    the call itself is in the request's bytes)."""

    def __init__(self, addresses: Sequence[str], rng: random.Random) -> None:
        self._addresses = list(addresses)
        self._least = LeastRequest({MODEL: self._addresses}, self._addresses, rng)

    async def send(self, model: str, send_to: SendTo) -> Responses:
        model, _, session = model.partition(_SESSION_MARK)
        if not session:
            return await self._least.send(model, send_to)
        index = zlib.crc32(session.encode()) % len(self._addresses)
        return await send_to(self._addresses[index])()

    def delayed_requests(self) -> int:
        return 0


async def _warm(addresses: Sequence[str], prefix_bed: PrefixBed) -> None:
    """The ideal's head start: every repository's context in every instance's cache."""
    for address in addresses:
        async with grpc.aio.insecure_channel(address) as channel:
            calls = TritonCalls(channel)
            for repository in range(prefix_bed.repositories):
                context = repository_context(repository, prefix_bed.context_bytes)
                await calls.stream(codegen_request(context.decode(), 1, model=MODEL), 1)()


@dataclass(frozen=True)
class ClientSystem:
    """`round-robin`, `least-request` or `ideal`."""

    name: str
    description: str
    rule: str  # "round-robin", "least-request" or "ideal"
    seed: int = 7

    def start(self, prefix_bed: PrefixBed, workdir: Path) -> Deployment:
        bed = prefix_bed.bed
        if self.rule == "ideal":
            bed = replace(bed, repository=prefix_bed.ideal_repository)
        group = TritonGroup(bed, workdir, [[MODEL]] * bed.instances, prefix=self.rule[:2])
        if self.rule == "round-robin":
            return started(self.name, group, RoundRobin(group.addresses))
        rng = random.Random(self.seed)
        if self.rule == "least-request":
            return started(
                self.name, group, LeastRequest({MODEL: group.addresses}, group.addresses, rng)
            )
        group.start()
        deployment = IdealDeployment(self.name, group, IdealRoute(group.addresses, rng))
        try:
            asyncio.run(_warm(group.addresses, prefix_bed))
        except BaseException:
            deployment.stop()
            raise
        return deployment


# -- Pointsman ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PointsmanPrefixSystem:
    """Router + sidecar with the model on every instance from the start (its copies pinned
    to the instance count), with or without the policy's prefix routing for it."""

    name: str
    description: str
    prefix: bool
    extra_policy: Mapping[str, object] = field(default_factory=dict)

    def policy(self, prefix_bed: PrefixBed) -> dict[str, object]:
        bed = prefix_bed.bed
        model: dict[str, object] = {
            "min_copies": bed.instances,
            "max_copies": bed.instances,
            "memory_bytes": bed.footprint_bytes,
        }
        if self.prefix:
            model["prefix_routing"] = {
                "prompt_input": "PROMPT",
                "block_bytes": 64,
                "max_blocks": 16,
                "epsilon": prefix_bed.epsilon,
            }
        return {"models": {MODEL: model}, **self.extra_policy}

    def start(self, prefix_bed: PrefixBed, workdir: Path) -> Deployment:
        bed = prefix_bed.bed
        workdir.mkdir(parents=True, exist_ok=True)
        policy = workdir / "policy.yaml"
        policy.write_text(yaml.safe_dump(self.policy(prefix_bed), sort_keys=False))
        fleet = Fleet(
            FleetConfig(
                instances=bed.instances,
                placement={f"triton-{i}": (MODEL,) for i in range(bed.instances)},
                models=(MODEL,),
                model_repository=bed.repository,
                sidecar_port=0,
                router_port=0,
                memory_budget_bytes=bed.budget_bytes,
                policy_file=policy,
                run_dir=workdir,
            )
        )
        fleet.start()
        return PointsmanDeployment(self.name, fleet)


PREFIX_SYSTEMS: dict[str, PrefixSystem] = {
    s.name: s
    for s in (
        ClientSystem("round-robin", "per-request round robin over the instances", "round-robin"),
        ClientSystem(
            "least-request",
            "power of two choices on the client's in-flight counts (Envoy LEAST_REQUEST)",
            "least-request",
        ),
        PointsmanPrefixSystem(
            "pointsman", "router + sidecar, default policy (no prefix routing)", prefix=False
        ),
        PointsmanPrefixSystem(
            "pointsman-prefix",
            "router + sidecar, the model's prefix_routing on (bounded-load rendezvous hashing)",
            prefix=True,
        ),
        ClientSystem(
            "ideal",
            "every request finds its prefix: caches warmed with every context and large enough "
            "to keep all, sessions sticky, completions least-request",
            "ideal",
        ),
    )
}


def testbed(
    workdir: Path,
    *,
    instances: int,
    prefill_ratio: float,
    cache_blocks: int,
    ideal_cache_blocks: int,
    repositories: int,
    context_bytes: int,
    epsilon: float,
) -> PrefixBed:
    """Both repositories of one prefill ratio under `workdir`, and the testbed over them. The
    footprint leaves room for the ideal's larger cache pool (1 KiB a block), for every
    system alike."""
    footprint = 72 * 1024**2 + ideal_cache_blocks * 1024
    ratio = f"{prefill_ratio:g}"
    repository = prefix_repository(
        workdir / f"repo-{ratio}", prefill_ratio=prefill_ratio, cache_blocks=cache_blocks,
        footprint_bytes=footprint,
    )  # fmt: skip
    ideal = prefix_repository(
        workdir / f"repo-{ratio}-ideal", prefill_ratio=prefill_ratio,
        cache_blocks=ideal_cache_blocks, footprint_bytes=footprint,
    )  # fmt: skip
    bed = Testbed(
        instances=instances,
        models=(MODEL,),
        repository=repository,
        footprint_bytes=footprint,
        budget_bytes=2 * footprint,
        expected_popularity=(1.0,),
        workdir=workdir,
        streaming=True,
    )
    return PrefixBed(
        bed, ideal, prefill_ratio, cache_blocks, ideal_cache_blocks, repositories, context_bytes,
        epsilon,
    )  # fmt: skip
