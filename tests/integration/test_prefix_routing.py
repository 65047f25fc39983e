"""Prefix routing on real Tritons: repeated prompt prefixes raise the model's own reported
prefix-cache hit ratio only when routing is prefix-aware.

Three Tritons each serve `codegen` (its prefix cache and prefill cost: triton_models/README.md)
behind the router and a sidecar in table mode. The same traffic runs twice, each time with
repositories no cache has seen: six repository contexts of 4 KiB, three short completions each,
in a seeded shuffled order, one at a time. With the policy's prefix routing off, the sidecar's
weighted pick sends a repository's requests to any instance, and each instance that sees it
first pays its prefill; after the policy file turns it on (hot reload, no restart) every
request of a repository goes to its one holder, so only its first request misses. The hit
ratio is read as Triton reports it (`prefix_cache_{hit,lookup}_blocks_total` over the three
instances), and also through the router (ListModels), the sidecar's metrics and PickTarget.
"""

from __future__ import annotations

import random
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as grpcclient

from app.fleet import Fleet, FleetConfig
from bench.calls import codegen_inputs
from pointsman.affinity import rendezvous_order
from pointsman.prefix import PrefixBlocks, prefix_key
from pointsman.prefix_routing import key_text
from pointsman.router.v1 import router_pb2 as pb
from pointsman.router.v1 import router_pb2_grpc as pb_grpc

pytestmark = pytest.mark.triton

OFF = "models:\n  codegen: {min_copies: 3}\n"
ON = (
    "models:\n  codegen:\n    min_copies: 3\n"
    "    prefix_routing: {prompt_input: PROMPT, block_bytes: 64, max_blocks: 16, epsilon: 0.25}\n"
)
REPOSITORIES, COMPLETIONS = 6, 3
CONTEXT_BYTES = 4096  # 64 blocks of the models' 64 bytes


@pytest.fixture(scope="module")
def prefix_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, Path]]:
    run_dir = tmp_path_factory.mktemp("prefix-fleet")
    policy = run_dir / "policy.yaml"
    policy.write_text(OFF)
    config = FleetConfig(
        instances=3,
        placement={f"triton-{i}": ("codegen",) for i in range(3)},
        sidecar_port=0,
        router_port=0,
        run_dir=run_dir,
        policy_file=policy,
        sidecar_args=("--cold-start-wait", "0"),
    )
    with Fleet(config) as fleet:
        yield fleet, policy


def context(phase: str, repository: int) -> bytes:
    """A repository's shared context, CONTEXT_BYTES long, different in every phase."""
    line = b"def %s_%d_helper_%%d(x):\n    return x + %%d\n" % (phase.encode(), repository)
    text = b"".join(line % (i, i) for i in range(400))
    return text[:CONTEXT_BYTES]


def inputs(prompt: bytes) -> list[grpcclient.InferInput]:
    return codegen_inputs(prompt.decode(), 2)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        text: str = response.read().decode()
    return text


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{name}\{{([^}}]*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


def cache_counters(fleet: Fleet) -> tuple[float, float]:
    """(lookups, hits) of codegen's prefix caches, all instances and versions."""
    texts = [scrape(spec.metrics_url) for spec in fleet.tritons]
    return (
        sum(sample(t, "prefix_cache_lookup_blocks_total", model="codegen") for t in texts),
        sum(sample(t, "prefix_cache_hit_blocks_total", model="codegen") for t in texts),
    )


def hit_ratio(fleet: Fleet, phase: str) -> float:
    """Runs the phase's traffic through the sidecar; the hit ratio Triton reports for it."""
    order = [(r, n) for r in range(REPOSITORIES) for n in range(COMPLETIONS)]
    random.Random(phase).shuffle(order)
    before = cache_counters(fleet)
    with grpcclient.InferenceServerClient(fleet.sidecar_address) as client:
        for repository, n in order:
            prompt = context(phase, repository) + b"# complete %d" % n
            client.infer("codegen", inputs(prompt), client_timeout=60)
    blocks = REPOSITORIES * COMPLETIONS * (CONTEXT_BYTES // 64)
    deadline = time.monotonic() + 10
    while (after := cache_counters(fleet))[0] - before[0] < blocks:
        assert time.monotonic() < deadline, "Triton did not report every lookup"
        time.sleep(0.1)
    return (after[1] - before[1]) / (after[0] - before[0])


def prefix_outcomes(fleet: Fleet) -> float:
    text = scrape(fleet.sidecar_metrics_url)
    return sample(text, "pointsman_sidecar_prefix_routing_total", model="codegen")


def test_repeated_prefixes_raise_the_hit_ratio_only_when_routing_is_prefix_aware(
    prefix_fleet: tuple[Fleet, Path],
) -> None:
    fleet, policy = prefix_fleet
    off = hit_ratio(fleet, "off")
    assert prefix_outcomes(fleet) == 0

    policy.write_text(ON)  # the router reloads it and sends the tables again
    deadline = time.monotonic() + 15
    with grpcclient.InferenceServerClient(fleet.sidecar_address) as client:
        while prefix_outcomes(fleet) == 0:  # a prompt under one block: counted as no_key
            assert time.monotonic() < deadline, "the sidecar never saw the prefix policy"
            client.infer("codegen", inputs(b"def f(): pass"), client_timeout=60)
            time.sleep(0.2)
    on = hit_ratio(fleet, "on")

    # Prefix-aware: every request after a repository's first finds its context (2 of 3).
    assert on == pytest.approx((COMPLETIONS - 1) / COMPLETIONS, abs=0.02)
    # Spread: a repository's three requests land on about two instances (a third fewer hits).
    assert off < on - 0.15, (off, on)
    text = scrape(fleet.sidecar_metrics_url)
    preferred = sample(
        text, "pointsman_sidecar_prefix_routing_total", model="codegen", outcome="preferred"
    )
    assert preferred == REPOSITORIES * COMPLETIONS

    # The router's collector reads the same counters: ListModels shows a ratio.
    with grpc.insecure_channel(fleet.router_address) as channel:
        stub = pb_grpc.RouterServiceStub(channel)  # type: ignore[no-untyped-call]
        deadline = time.monotonic() + 10
        while True:
            codegen = next(
                m for m in stub.ListModels(pb.ListModelsRequest(), timeout=5).models
                if m.model_name == "codegen"
            )  # fmt: skip
            if codegen.prefix_cache_lookup_blocks > 0 and codegen.prefix_cache_hit_ratio > 0:
                break
            assert time.monotonic() < deadline, "ListModels never showed a hit ratio"
            time.sleep(0.25)


def test_pick_target_with_the_key_names_the_prefix_holder(
    prefix_fleet: tuple[Fleet, Path],
) -> None:
    fleet, policy = prefix_fleet
    policy.write_text(ON)
    addresses = [spec.grpc_address for spec in fleet.tritons]
    key = prefix_key(context("pick", 0), PrefixBlocks(64, 16))
    with grpc.insecure_channel(fleet.router_address) as channel:
        stub = pb_grpc.RouterServiceStub(channel)  # type: ignore[no-untyped-call]
        request = pb.PickTargetRequest(model_name="codegen", affinity_key=key_text(key))
        holder = rendezvous_order(key, addresses)[0]
        deadline = time.monotonic() + 15
        # Each pick counts against its target for two metric intervals (0.5 s): picks spaced
        # wider see an idle fleet, so the key's first holder takes every one of them.
        picks = []
        while len(picks) < 3:
            time.sleep(0.6)
            picks.append(stub.PickTarget(request, timeout=5).target.grpc_address)
            if picks[-1] != holder:  # the reload is not active yet (OFF from elsewhere)
                assert time.monotonic() < deadline
                picks.clear()
        with pytest.raises(grpc.RpcError) as refused:
            stub.PickTarget(
                pb.PickTargetRequest(model_name="codegen", affinity_key="k" * 257), timeout=5
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
