"""pointsman/prefix_routing.py: the policy both components read, its proto form, and the key's
text form on PickTarget."""

from __future__ import annotations

import math

import pytest

from pointsman.prefix import PrefixBlocks
from pointsman.prefix_routing import PrefixRouting, key_text, parse_affinity_key
from pointsman.router.v1 import router_pb2 as pb


def test_the_proto_round_trips_and_the_blocks_follow_the_fields() -> None:
    policy = PrefixRouting("PROMPT", block_bytes=32, max_blocks=8, min_blocks=2, epsilon=0.5)
    assert PrefixRouting.from_proto(policy.to_proto()) == policy
    assert policy.blocks == PrefixBlocks(32, 8, 2)


@pytest.mark.parametrize(
    "message",
    [
        pb.PrefixRouting(block_bytes=64, max_blocks=16, min_blocks=1),  # no prompt input
        pb.PrefixRouting(prompt_input="P", block_bytes=0, max_blocks=16, min_blocks=1),
        pb.PrefixRouting(prompt_input="P", block_bytes=64, max_blocks=2, min_blocks=3),
        pb.PrefixRouting(prompt_input="P", block_bytes=64, max_blocks=16, min_blocks=1, epsilon=-1),
        pb.PrefixRouting(
            prompt_input="P", block_bytes=64, max_blocks=16, min_blocks=1, epsilon=math.inf
        ),
    ],
)
def test_a_message_no_policy_could_make_is_refused(message: pb.PrefixRouting) -> None:
    with pytest.raises(ValueError):
        PrefixRouting.from_proto(message)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (key_text(0), 0),
        (key_text(0xFFFF_FFFF_FFFF_FFFF), 0xFFFF_FFFF_FFFF_FFFF),
        (key_text(0xAB), 0xAB),
        ("00000000000000ab", 0xAB),
        ("user-7", "user-7"),  # any other text is a key of its own
        ("ab", "ab"),
        ("0000000000000zab", "0000000000000zab"),
        ("", ""),
    ],
)
def test_key_text_is_read_back_to_the_same_key(text: str, key: int | str) -> None:
    assert parse_affinity_key(text) == key


def test_key_text_is_sixteen_hex_digits() -> None:
    assert key_text(0xAB) == "00000000000000ab"
