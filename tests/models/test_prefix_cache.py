"""The stand-in models' prefix cache, prefill cost and honest memory, in-process (no Triton).

prefix_cache.py and resident_memory.py live next to codegen's model.py; the Triton tests in
test_triton_models.py check the same through a real server.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

HERE = Path(__file__).resolve().parents[2] / "triton_models" / "codegen" / "1"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_pointsman_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


prefix_cache = _load("prefix_cache")
resident_memory = _load("resident_memory")

CONTEXT = bytes(range(256)) * 16  # 4 KiB: 64 blocks of 64 bytes, no two alike


def cache(capacity: int = 256) -> Any:
    return prefix_cache.PrefixCache(capacity, 64, 64)


def test_block_keys_are_a_chain_of_prefix_hashes() -> None:
    keys = prefix_cache.block_keys(CONTEXT + b"tail", 64)
    assert len(keys) == 64  # the partial block is not cached
    assert keys == prefix_cache.block_keys(CONTEXT, 64)
    other = prefix_cache.block_keys(CONTEXT[:640] + b"x" * 64 + CONTEXT[704:], 64)
    assert other[:10] == keys[:10] and all(
        a != b for a, b in zip(other[10:], keys[10:], strict=True)
    )


@pytest.mark.parametrize(
    ("case", "first", "second", "lookups", "hits"),
    [
        ("the same prompt again", CONTEXT, CONTEXT, 64, 64),
        ("a shared half", CONTEXT, CONTEXT[:2048] + b"y" * 2048, 64, 32),
        ("a longer prompt with the first as its prefix", CONTEXT[:1024], CONTEXT, 64, 16),
        ("the first block differs", CONTEXT, b"z" + CONTEXT[1:], 64, 0),
        ("shorter than a block", b"short", b"short", 0, 0),
    ],
)
def test_leading_cached_blocks_are_hits(
    case: str, first: bytes, second: bytes, lookups: int, hits: int
) -> None:
    c = cache()
    cold = c.admit(first)
    assert cold.hit_blocks == 0 and cold.uncached_bytes == len(first), case
    warm = c.admit(second)
    assert (warm.lookup_blocks, warm.hit_blocks) == (lookups, hits), case
    assert warm.uncached_bytes == len(second) - 64 * hits, case


def test_the_cache_holds_at_most_its_capacity_and_evicts_least_recently_used() -> None:
    c = cache(capacity=100)
    c.admit(CONTEXT)  # 64 blocks
    other = bytes(reversed(CONTEXT))
    c.admit(other)  # 64 more: 28 of the first prompt's go, its tail first
    assert len(c.slots) == 100
    first = prefix_cache.block_keys(CONTEXT, 64)
    assert all(c.holds(k) for k in first[:36]) and not any(c.holds(k) for k in first[36:])
    assert c.admit(CONTEXT).hit_blocks == 36  # its head survived: a useful prefix
    assert c.admit(other).hit_blocks == 36  # and now the other lost its tail


def test_a_prompt_longer_than_the_cache_keeps_its_head() -> None:
    c = cache(capacity=10)
    admitted = c.admit(CONTEXT)
    assert admitted.lookup_blocks == 64 and len(c.slots) == 10
    assert c.admit(CONTEXT).hit_blocks == 10


def test_a_cache_of_no_blocks_prefills_everything() -> None:
    c = cache(capacity=0)
    c.admit(CONTEXT)
    again = c.admit(CONTEXT)
    assert (again.lookup_blocks, again.hit_blocks, again.uncached_bytes) == (64, 0, len(CONTEXT))
    assert c.nbytes == 0


def test_the_pool_is_allocated_up_front() -> None:
    assert cache(capacity=2048).nbytes == 2048 * 64


def settings(**overrides: str) -> Any:
    values = {**prefix_cache.DEFAULTS, **overrides}
    return prefix_cache.PrefixSettings.from_parameters(values.__getitem__)


def test_prefill_cost_follows_the_ratio() -> None:
    # The reference prompt (1469 tokens, 4 bytes each) costs ratio x 13 decode steps.
    s = settings(prefill_ratio="0.26", decode_step_ms="0.6", prefix_block_bytes="64")
    reference_blocks = 1469 * 4 / 64
    reference_s = s.prefill_seconds_per_block * reference_blocks
    assert reference_s == pytest.approx(0.26 * 13 * 0.0006)
    half = settings(prefill_ratio="0.13", decode_step_ms="0.6")
    assert half.prefill_seconds_per_block == pytest.approx(s.prefill_seconds_per_block / 2)


def test_prefill_waits_for_the_uncached_bytes_of_every_prompt() -> None:
    s = settings(prefix_cache_blocks="512")
    prefill = prefix_cache.Prefill(s, None)
    per_byte = s.prefill_seconds_per_block / 64
    cold = prefill.admit([CONTEXT, CONTEXT[:1000] + b"other"])
    # The second prompt's first 15 blocks were just cached by the first.
    assert cold == pytest.approx(per_byte * (len(CONTEXT) + 1005 - 15 * 64))
    assert prefill.admit([CONTEXT + b"!"]) == pytest.approx(per_byte * 1)


@pytest.mark.parametrize(
    "bad",
    [
        {"prefix_block_bytes": "0"},
        {"prefix_cache_blocks": "-1"},
        {"prefix_kv_bytes_per_block": "16"},
        {"prefill_ratio": "-0.1"},
        {"bytes_per_token": "0"},
        {"decode_step_ms": "0"},
    ],
)
def test_bad_settings_fail_the_load(bad: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="need"):
        settings(**bad)


def test_hold_declared_tops_the_process_up_with_resident_memory() -> None:
    before = resident_memory.rss_bytes()
    declared = before + (48 << 20)
    config = {"parameters": {"pointsman.memory_bytes": {"string_value": str(declared)}}}
    ballast = resident_memory.hold_declared(config, working_bytes=8 << 20)
    grown = resident_memory.rss_bytes() - before
    assert len(ballast) == pytest.approx(40 << 20, abs=1 << 20)
    assert grown >= len(ballast) - (1 << 20)  # resident, not just reserved
    del ballast


def test_hold_declared_warns_when_the_process_is_already_larger() -> None:
    heard: list[str] = []
    config = {"parameters": {"pointsman.memory_bytes": {"string_value": str(1 << 20)}}}
    assert len(resident_memory.hold_declared(config, heard.append)) == 0
    assert heard and "raise it" in heard[0]
    assert len(resident_memory.hold_declared({}, heard.append)) == 0  # nothing declared
    assert len(heard) == 1
