"""The prefix cache and prefill of the stand-in models, so prefix-aware routing matters.

An LLM server runs a new prompt through the model once (prefill) before decoding, and keeps
the result (the KV cache) in fixed-size blocks keyed by chained block hashes; a later prompt
that starts with cached blocks skips their prefill (vLLM's automatic prefix caching, SGLang's
radix cache). Here, the same shape for `codegen` and `codegen_stream`:

- a prompt is cut into blocks of `prefix_block_bytes` bytes (bytes stand for tokens, about
  `bytes_per_token` each); block i is keyed by the SHA-256 of the prompt's first i + 1 blocks,
  so a key names the whole prefix up to it (a chain), and only full blocks are cached;
- `PrefixCache` is a per-instance LRU of those keys in a pool of `prefix_cache_blocks` slots
  of `prefix_kv_bytes_per_block` bytes, allocated (resident) at initialize like a paged KV
  cache; a prompt's leading cached blocks are hits, the rest are stored, evicting the least
  recently used, the tail of a chain before its head;
- the prefill of the uncached bytes takes time (a wait that holds the model instance, as a
  prefill holds an accelerator), set against decoding by `prefill_ratio`: the cold prefill
  of the reference prompt over the decode of the reference completion, at `decode_step_ms`
  per token. See triton_models/README.md for the published measurements behind the default.

Outputs never depend on the cache: it changes only how long a request takes. The counters go
to Triton's /metrics as custom metrics (the Python backend's MetricFamily).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# The reference request: the medians of Azure's 2023 code-completion trace (Splitwise, ISCA
# 2024; AzurePublicDataset, AzureLLMInferenceTrace_code.csv, 8,819 requests).
REFERENCE_PROMPT_TOKENS = 1469
REFERENCE_COMPLETION_TOKENS = 13

DEFAULTS = {
    "prefix_block_bytes": "64",  # 16 tokens at 4 bytes per token: vLLM's default block
    "prefix_cache_blocks": "2048",  # 128 KiB of prompt text, about 32k tokens
    "prefix_kv_bytes_per_block": "1024",  # the pool: 2 MiB at the defaults
    "prefill_ratio": "0.26",  # cold prefill of 1469 tokens / decode of 13 tokens
    "bytes_per_token": "4",
    "decode_step_ms": "0.6",  # decode time per token at batch 1 on the development machine
}

METRICS = {
    # name: (description, kind); descriptions are shared by every model and version.
    "prefix_cache_lookup_blocks_total": ("Prompt blocks looked up in the prefix cache", "counter"),
    "prefix_cache_hit_blocks_total": ("Prompt blocks found in the prefix cache", "counter"),
    "prefix_cache_used_blocks": ("Blocks held by the prefix cache", "gauge"),
    "prefix_cache_capacity_blocks": ("Blocks the prefix cache can hold", "gauge"),
    "prefill_seconds_per_block": ("Prefill time of one uncached prompt block", "gauge"),
}


@dataclass(frozen=True)
class PrefixSettings:
    block_bytes: int
    cache_blocks: int
    kv_bytes_per_block: int
    prefill_ratio: float
    bytes_per_token: float
    decode_step_s: float

    @classmethod
    def from_parameters(cls, param: Callable[[str], str]) -> PrefixSettings:
        settings = cls(
            block_bytes=int(param("prefix_block_bytes")),
            cache_blocks=int(param("prefix_cache_blocks")),
            kv_bytes_per_block=int(param("prefix_kv_bytes_per_block")),
            prefill_ratio=float(param("prefill_ratio")),
            bytes_per_token=float(param("bytes_per_token")),
            decode_step_s=float(param("decode_step_ms")) / 1000.0,
        )
        if settings.block_bytes < 1 or settings.kv_bytes_per_block < 32:
            raise ValueError("need prefix_block_bytes >= 1 and prefix_kv_bytes_per_block >= 32")
        if settings.cache_blocks < 0 or settings.prefill_ratio < 0:
            raise ValueError("need prefix_cache_blocks >= 0 and prefill_ratio >= 0")
        if settings.bytes_per_token <= 0 or settings.decode_step_s <= 0:
            raise ValueError("need bytes_per_token > 0 and decode_step_ms > 0")
        return settings

    @property
    def prefill_seconds_per_block(self) -> float:
        """One block's share of the reference prompt's prefill, which lasts `prefill_ratio`
        times the decode of the reference completion."""
        prefill_s = self.prefill_ratio * REFERENCE_COMPLETION_TOKENS * self.decode_step_s
        return prefill_s * (self.block_bytes / self.bytes_per_token) / REFERENCE_PROMPT_TOKENS


def block_keys(prompt: bytes, block_bytes: int) -> list[bytes]:
    """Key of each full block: the SHA-256 of the prompt up to the block's end (a chain)."""
    state = hashlib.sha256()
    view = memoryview(prompt)
    keys = []
    for start in range(0, len(prompt) - block_bytes + 1, block_bytes):
        state.update(view[start : start + block_bytes])
        keys.append(state.copy().digest())
    return keys


@dataclass
class Admission:
    """What one prompt found: its full blocks, the leading ones cached, the bytes to prefill."""

    lookup_blocks: int = 0
    hit_blocks: int = 0
    uncached_bytes: int = 0

    def add(self, other: Admission) -> None:
        self.lookup_blocks += other.lookup_blocks
        self.hit_blocks += other.hit_blocks
        self.uncached_bytes += other.uncached_bytes


class PrefixCache:
    """An LRU of prompt-prefix blocks over a preallocated pool, like a paged KV cache."""

    def __init__(self, capacity_blocks: int, kv_bytes_per_block: int, block_bytes: int) -> None:
        self.capacity = capacity_blocks
        self.block_bytes = block_bytes
        self.kv_bytes = kv_bytes_per_block
        # bytearray(n) is zero-filled with memset: every page is resident from the start.
        self.pool = bytearray(capacity_blocks * kv_bytes_per_block)
        self.slots: OrderedDict[bytes, int] = OrderedDict()  # least recently used first
        self.free = list(range(capacity_blocks))

    @property
    def nbytes(self) -> int:
        return len(self.pool)

    def admit(self, prompt: bytes) -> Admission:
        """Looks the prompt's blocks up, stores the missing ones, and says what was cached."""
        keys = block_keys(prompt, self.block_bytes)
        cacheable = keys[: self.capacity]  # a chain longer than the cache keeps its head
        hits = 0
        for key in cacheable:
            if key not in self.slots:
                break
            self.slots.move_to_end(key)
            hits += 1
        for key in cacheable[hits:]:
            slot = self.free.pop() if self.free else self.slots.popitem(last=False)[1]
            self.slots[key] = slot
            at = slot * self.kv_bytes
            self.pool[at : at + len(key)] = key  # "writes the KV" of the block
        for key in reversed(cacheable):  # the chain's head most recent: tails evict first
            self.slots.move_to_end(key)
        return Admission(len(keys), hits, len(prompt) - hits * self.block_bytes)

    def holds(self, key: bytes) -> bool:
        slot = self.slots.get(key)
        if slot is None:
            return False
        at = slot * self.kv_bytes
        return self.pool[at : at + len(key)] == key


class CacheMetrics:
    """The cache's counters as Triton custom metrics, labelled with model and version."""

    def __init__(self, pb_utils: object, model: str, version: int) -> None:
        family = pb_utils.MetricFamily  # type: ignore[attr-defined]
        kinds = {"counter": family.COUNTER, "gauge": family.GAUGE}
        # The families must outlive their metrics: keep them.
        self.families = {
            name: family(name=name, description=description, kind=kinds[kind])
            for name, (description, kind) in METRICS.items()
        }
        labels = {"model": model, "version": str(version)}
        self.metrics = {name: f.Metric(labels=labels) for name, f in self.families.items()}

    def set(self, name: str, value: float) -> None:
        self.metrics[name].set(value)

    def record(self, admission: Admission, used_blocks: int) -> None:
        self.metrics["prefix_cache_lookup_blocks_total"].increment(admission.lookup_blocks)
        self.metrics["prefix_cache_hit_blocks_total"].increment(admission.hit_blocks)
        self.metrics["prefix_cache_used_blocks"].set(used_blocks)


class Prefill:
    """The prefix cache and the prefill cost of one model instance."""

    def __init__(self, settings: PrefixSettings, metrics: CacheMetrics | None) -> None:
        self.cache = PrefixCache(
            settings.cache_blocks, settings.kv_bytes_per_block, settings.block_bytes
        )
        self.seconds_per_block = settings.prefill_seconds_per_block
        self.block_bytes = settings.block_bytes
        self.metrics = metrics
        if metrics is not None:
            metrics.set("prefix_cache_capacity_blocks", settings.cache_blocks)
            metrics.set("prefill_seconds_per_block", self.seconds_per_block)

    def admit(self, prompts: list[bytes]) -> float:
        """Admits a batch's prompts to the cache; returns how long their prefill takes (the
        prompts run one after another: prefill is compute-bound, batching does not hide it)."""
        total = Admission()
        for prompt in prompts:
            total.add(self.cache.admit(prompt))
        if self.metrics is not None:
            self.metrics.record(total, len(self.cache.slots))
        return self.seconds_per_block * total.uncached_bytes / self.block_bytes
