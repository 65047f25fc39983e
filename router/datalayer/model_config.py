"""What the router reads from a model's configuration, once per ready model version.

Triton's ModelConfig RPC answers the normalized config (defaults filled in: the instance
groups Triton made, the sequence batcher's idle timeout). From it the collector keeps:

- the declared memory footprint (the `pointsman.memory_bytes` parameter), for placement;
- the capacity, for flow control in the sidecars: `max_batch_size`, the number of model
  instances (`instance_group` counts; a GPU group counts once per GPU it lists) and the
  dynamic batcher's queue bound, `default_queue_policy.max_queue_size` (0: unbounded; a
  request beyond it is refused at once with UNAVAILABLE "Exceeds maximum queue size");
- sequence batching and its `max_sequence_idle_microseconds`, for sequence affinity.

Each version of a model has its own instances and its own queue. A model with several
versions ready on one instance is described by `combined`: the smallest capacity of its
versions (the sidecar counts the model's requests there without telling versions apart, so
one version's queue is what it may rely on), the declared footprints summed, and the longest
sequence idle time (a sequence is kept where it is for as long as any version may remember it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import fields
from typing import Any

from tritonclient.grpc import model_config_pb2

from router.contracts import ModelFacts

__all__ = ["DECLARED_MEMORY_PARAMETER", "ModelFacts", "combined", "facts_of", "model_facts"]

log = logging.getLogger(__name__)

# The model config parameter that declares a model's memory footprint in bytes.
DECLARED_MEMORY_PARAMETER = "pointsman.memory_bytes"
# Triton's max_sequence_idle_microseconds when a config leaves it 0.
_DEFAULT_SEQUENCE_IDLE_S = 1.0
_KIND_GPU = model_config_pb2.ModelInstanceGroup.KIND_GPU


def _instance_count(config: model_config_pb2.ModelConfig) -> int:
    """Model instances of all groups; one when there is no group (Triton's default on a
    machine without GPUs; the normalized config Triton answers always lists its groups)."""
    total = 0
    for group in config.instance_group:
        copies = max(1, group.count)
        total += copies * len(group.gpus) if group.kind == _KIND_GPU and group.gpus else copies
    return total or 1


def _declared_memory(config: model_config_pb2.ModelConfig) -> int:
    declared = config.parameters.get(DECLARED_MEMORY_PARAMETER)
    if declared is None:
        return 0
    try:
        return max(0, int(declared.string_value))
    except ValueError:
        log.warning("%s: %s is not an integer", config.name, DECLARED_MEMORY_PARAMETER)
        return 0


def model_facts(config: model_config_pb2.ModelConfig) -> ModelFacts:
    """The facts of one model version's (normalized) configuration."""
    sequence = config.HasField("sequence_batching")
    idle_us = config.sequence_batching.max_sequence_idle_microseconds
    queue_size = (
        config.dynamic_batching.default_queue_policy.max_queue_size
        if config.HasField("dynamic_batching")
        else 0
    )
    return ModelFacts(
        declared_memory_bytes=_declared_memory(config),
        max_batch_size=max(0, config.max_batch_size),
        instance_count=_instance_count(config),
        max_queue_size=queue_size,
        sequence_batching=sequence,
        max_sequence_idle_s=(idle_us / 1e6 if idle_us else _DEFAULT_SEQUENCE_IDLE_S)
        if sequence
        else 0.0,
    )


def combined(versions: Iterable[ModelFacts]) -> ModelFacts:
    """The facts of a model whose `versions` are ready on one instance (see the module
    docstring); empty facts when none is known."""
    known = [f for f in versions if f.instance_count]
    if not known:
        return ModelFacts()
    smallest = min(known, key=lambda f: f.concurrency)
    bounded = [f.max_queue_size for f in known if f.max_queue_size]
    return ModelFacts(
        declared_memory_bytes=sum(f.declared_memory_bytes for f in known),
        max_batch_size=smallest.max_batch_size,
        instance_count=smallest.instance_count,
        # Unbounded only when every version's queue is.
        max_queue_size=min(bounded) if bounded else 0,
        sequence_batching=any(f.sequence_batching for f in known),
        max_sequence_idle_s=max(f.max_sequence_idle_s for f in known),
    )


def facts_of(model: ModelFacts) -> dict[str, Any]:
    """The facts alone, as keyword arguments (to build a ModelOnInstance around them)."""
    return {f.name: getattr(model, f.name) for f in fields(ModelFacts)}
