"""pointsman/prefix.py: chained prompt-prefix block hashes, the same in every process
(with pointsman/affinity.py's holder order, checked across processes here)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pointsman.affinity import rendezvous_order
from pointsman.prefix import PrefixBlocks, prefix_chain, prefix_key

CONTEXT = bytes(range(256)) * 8  # 2 KiB, no two 64-byte blocks alike


@pytest.mark.parametrize(
    ("case", "blocks", "length", "expected_blocks"),
    [
        ("shorter than a block", PrefixBlocks(64, 16), 63, 0),
        ("exactly one block", PrefixBlocks(64, 16), 64, 1),
        ("a partial block is left out", PrefixBlocks(64, 16), 64 * 3 + 10, 3),
        ("capped at max_blocks", PrefixBlocks(64, 4), 2048, 4),
        ("under min_blocks: nothing", PrefixBlocks(64, 16, min_blocks=4), 64 * 3, 0),
        ("at min_blocks", PrefixBlocks(64, 16, min_blocks=4), 64 * 4, 4),
        ("one-byte blocks", PrefixBlocks(1, 5), 3, 3),
    ],
)
def test_chain_length(case: str, blocks: PrefixBlocks, length: int, expected_blocks: int) -> None:
    prompt = CONTEXT[:length]
    chain = prefix_chain(prompt, blocks)
    assert len(chain) == expected_blocks, case
    key = prefix_key(prompt, blocks)
    assert key == (chain[-1] if chain else None), case


def test_each_element_names_the_prefix_up_to_its_block() -> None:
    blocks = PrefixBlocks(64, 16)
    chain = prefix_chain(CONTEXT, blocks)
    for i, element in enumerate(chain):
        prefix = CONTEXT[: 64 * (i + 1)]
        assert prefix_key(prefix, blocks) == element
        assert prefix_chain(prefix + b"anything after", blocks)[: i + 1] == chain[: i + 1]
    assert len(set(chain)) == len(chain)


def test_prompts_share_elements_exactly_up_to_their_first_different_block() -> None:
    blocks = PrefixBlocks(64, 16)
    changed = bytearray(CONTEXT)
    changed[64 * 5 + 7] ^= 0xFF  # a byte in block 5
    a, b = prefix_chain(CONTEXT, blocks), prefix_chain(bytes(changed), blocks)
    assert a[:5] == b[:5]
    assert all(x != y for x, y in zip(a[5:], b[5:], strict=True))


def test_memoryview_and_bytes_hash_alike() -> None:
    blocks = PrefixBlocks(32, 8)
    assert prefix_chain(memoryview(CONTEXT), blocks) == prefix_chain(CONTEXT, blocks)
    assert prefix_key(memoryview(CONTEXT)[:300], blocks) == prefix_key(CONTEXT[:300], blocks)


def test_every_process_computes_the_same_keys_and_orders() -> None:
    # Sidecars and the router agree without talking: nothing may depend on PYTHONHASHSEED.
    code = (
        "from pointsman.affinity import rendezvous_order;"
        "from pointsman.prefix import PrefixBlocks, prefix_chain, prefix_key;"
        "p = bytes(range(256)) * 8;"
        "print(prefix_chain(p, PrefixBlocks(64, 16)), prefix_key(p, PrefixBlocks(64, 5)),"
        " [rendezvous_order(k, ['a', 'b', 'c', 'd']) for k in ('s1', b'p', 7)])"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("0", "1", "12345")
    }
    here = (
        prefix_chain(CONTEXT, PrefixBlocks(64, 16)),
        prefix_key(CONTEXT, PrefixBlocks(64, 5)),
        [rendezvous_order(k, ["a", "b", "c", "d"]) for k in ("s1", b"p", 7)],
    )
    assert outputs == {"{} {} {}\n".format(*here)}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block_bytes": 0}, "block_bytes"),
        ({"max_blocks": 0}, "max_blocks"),
        ({"max_blocks": 4, "min_blocks": 5}, "min_blocks"),
        ({"min_blocks": 0}, "min_blocks"),
    ],
)
def test_bad_block_settings_are_refused(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PrefixBlocks(**kwargs)


def test_span_is_what_a_caller_must_read() -> None:
    blocks = PrefixBlocks(64, 16)
    assert blocks.span_bytes == 1024
    assert prefix_key(CONTEXT, blocks) == prefix_key(CONTEXT[: blocks.span_bytes], blocks)
