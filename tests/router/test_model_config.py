"""The model facts the router reads from a model's (normalized) config: capacity for the
sidecars' flow control, sequence batching, the declared footprint (pure; no Triton). The
same facts read from real Tritons: tests/integration/test_flow_control.py."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from router.contracts import ModelOnInstance
from router.datalayer.model_config import ModelFacts, combined, facts_of, model_facts


def _config(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The shipped codegen: batches of 8, one CPU instance, a queue of 64.
        (
            'name: "codegen" max_batch_size: 8 instance_group [{ kind: KIND_CPU count: 1 }] '
            "dynamic_batching { default_queue_policy { max_queue_size: 64 } } "
            'parameters [{ key: "pointsman.memory_bytes" value: { string_value: "75497472" } }]',
            ModelFacts(
                declared_memory_bytes=75497472,
                max_batch_size=8,
                instance_count=1,
                max_queue_size=64,
            ),
        ),
        # No batching, no dynamic batcher: one request per instance, an unbounded queue.
        (
            'name: "echo" max_batch_size: 0 instance_group [{ kind: KIND_CPU count: 2 }]',
            ModelFacts(instance_count=2),
        ),
        # A dynamic batcher without a queue policy: unbounded.
        (
            "max_batch_size: 4 instance_group [{ count: 1 }] dynamic_batching {}",
            ModelFacts(max_batch_size=4, instance_count=1),
        ),
        # GPU groups count once per GPU they list; groups add up.
        (
            "max_batch_size: 2 instance_group [{ kind: KIND_GPU count: 2 gpus: [0, 1] }, "
            "{ kind: KIND_CPU count: 1 }]",
            ModelFacts(max_batch_size=2, instance_count=5),
        ),
        # No instance group (an unnormalized config): Triton's CPU default, one instance.
        ("max_batch_size: 8", ModelFacts(max_batch_size=8, instance_count=1)),
        # Sequence batching, with and without an idle time (Triton's default: 1 s).
        (
            "max_batch_size: 4 instance_group [{ count: 2 }] "
            "sequence_batching { max_sequence_idle_microseconds: 5000000 }",
            ModelFacts(
                max_batch_size=4, instance_count=2, sequence_batching=True, max_sequence_idle_s=5.0
            ),
        ),
        (
            "sequence_batching {}",
            ModelFacts(instance_count=1, sequence_batching=True, max_sequence_idle_s=1.0),
        ),
        # A footprint that is not a number counts as undeclared.
        (
            'parameters [{ key: "pointsman.memory_bytes" value: { string_value: "lots" } }]',
            ModelFacts(instance_count=1),
        ),
    ],
)
def test_model_facts(text: str, expected: ModelFacts) -> None:
    assert model_facts(_config(text)) == expected


def test_several_versions_take_the_smallest_capacity_and_sum_footprints() -> None:
    v1 = ModelFacts(
        declared_memory_bytes=100,
        max_batch_size=8,
        instance_count=1,
        max_queue_size=64,
        sequence_batching=True,
        max_sequence_idle_s=1.0,
    )
    v2 = ModelFacts(declared_memory_bytes=200, max_batch_size=4, instance_count=1)
    v3 = ModelFacts(
        declared_memory_bytes=300, max_batch_size=8, instance_count=2, max_queue_size=16
    )
    assert combined([v1, v2, v3]) == ModelFacts(
        declared_memory_bytes=600,
        max_batch_size=4,
        instance_count=1,
        max_queue_size=16,
        sequence_batching=True,
        max_sequence_idle_s=1.0,
    )
    assert combined([v2]) == v2
    assert combined([]) == ModelFacts()
    assert combined([ModelFacts()]) == ModelFacts()  # not read yet: unknown


@pytest.mark.parametrize(
    ("max_batch_size", "instance_count", "concurrency"),
    [(8, 1, 8), (8, 3, 24), (0, 2, 2), (1, 4, 4), (8, 0, 0)],
)
def test_concurrency_is_batch_times_instances_at_least_the_instances(
    max_batch_size: int, instance_count: int, concurrency: int
) -> None:
    model = ModelOnInstance("m", max_batch_size=max_batch_size, instance_count=instance_count)
    assert model.concurrency == concurrency


def test_a_model_on_an_instance_carries_its_facts() -> None:
    facts = ModelFacts(max_batch_size=8, instance_count=2, max_queue_size=4, sequence_batching=True)
    model = ModelOnInstance("m", ready_versions=frozenset({"1"}), **facts_of(facts))
    assert facts_of(model) == facts_of(facts) and model.concurrency == 16
