"""Prompt-prefix block hashes that every sidecar and the router compute alike.

An LLM server keeps the KV state of prompt prefixes in fixed-size blocks, keyed by chained
block hashes: a block's hash covers every block before it, so equal hashes mean equal
prefixes (vLLM, SGLang). To send a request where its prefix is cached, each sidecar (and the
router's scorer) must name the prefix the same way, without talking to the others. Here a
prompt's leading full blocks of `block_bytes` bytes (the stand-in models have no tokenizer;
bytes stand for tokens) are hashed as a chain: element i identifies the first i + 1 blocks.
Only the first `max_blocks` blocks count: past that, a longer prefix no longer changes where a
request should go, and reading it would cost time on the request path.

Element i is the first 8 bytes of the SHA-256 of the prompt's first (i + 1) x block_bytes
bytes, as an unsigned little-endian 64-bit integer: deterministic across processes, machines
and Python versions (unlike `hash()`), chained by construction, and computable in one pass (a
hash state can be copied at each block boundary). SHA-256 because CPUs with SHA extensions
hash 1 KiB in about 1 us, faster than BLAKE2b here. `prefix_key` computes only the last
element, in one hash call: the key routing needs on the hot path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = ["PrefixBlocks", "prefix_chain", "prefix_key"]

_KEY_BYTES = 8


@dataclass(frozen=True)
class PrefixBlocks:
    """How a prompt prefix is cut into blocks for routing.

    block_bytes: bytes per block (64: about 16 tokens, vLLM's default block, at ~4 bytes per
        token of code).
    max_blocks: leading blocks that count at most; a prompt longer than that is keyed by its
        first `max_blocks` blocks.
    min_blocks: fewer full blocks than this and the prompt has no key (too short for a cached
        prefix to matter).
    """

    block_bytes: int = 64
    max_blocks: int = 16
    min_blocks: int = 1

    def __post_init__(self) -> None:
        if self.block_bytes < 1:
            raise ValueError(f"block_bytes must be >= 1, got {self.block_bytes}")
        if self.max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1, got {self.max_blocks}")
        if not 1 <= self.min_blocks <= self.max_blocks:
            raise ValueError(
                f"min_blocks must be in [1, max_blocks={self.max_blocks}], got {self.min_blocks}"
            )

    @property
    def span_bytes(self) -> int:
        """The most prompt bytes that can matter: what a caller needs to read."""
        return self.block_bytes * self.max_blocks

    def full_blocks(self, prompt_bytes: int) -> int:
        """How many leading blocks of a prompt of that length are hashed."""
        return min(prompt_bytes // self.block_bytes, self.max_blocks)


def prefix_chain(prompt: bytes | memoryview, blocks: PrefixBlocks) -> tuple[int, ...]:
    """The chain of hashes of `prompt`'s leading full blocks: element i names blocks 0..i.

    Empty when the prompt has fewer than `blocks.min_blocks` full blocks.
    """
    count = blocks.full_blocks(len(prompt))
    if count < blocks.min_blocks:
        return ()
    view = memoryview(prompt)
    state = hashlib.sha256()
    size = blocks.block_bytes
    chain = []
    for start in range(0, count * size, size):
        state.update(view[start : start + size])
        chain.append(int.from_bytes(state.copy().digest()[:_KEY_BYTES], "little"))
    return tuple(chain)


def prefix_key(prompt: bytes | memoryview, blocks: PrefixBlocks) -> int | None:
    """The last element of `prefix_chain(prompt, blocks)`, in one hash call; None when the
    chain is empty. This is the key prefix-affinity routing uses."""
    count = blocks.full_blocks(len(prompt))
    if count < blocks.min_blocks:
        return None
    digest = hashlib.sha256(memoryview(prompt)[: count * blocks.block_bytes]).digest()
    return int.from_bytes(digest[:_KEY_BYTES], "little")
