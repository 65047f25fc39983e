"""Prefix routing's policy and its one choice, shared by the router and the sidecars.

A model that declares a prompt input (`models.<name>.prefix_routing` in the router's policy)
has its requests keyed by their prompt's leading blocks (`pointsman.prefix.prefix_key`), and
a key goes to a holder chosen by rendezvous hashing with bounded loads
(`pointsman.affinity.choose_holder`). The sidecars choose in table mode and the router's
`prefix-affinity` scorer chooses for PickTarget, both by `choose_holder` over holders named by
their gRPC address, so a key goes to the same instance whoever routes it, as long as
they see the same holders and similar loads. The policy reaches sidecars in each route table
(`RouteTable.prefix_routing`), so a reload changes every sidecar within one route update.

On the wire a key is text (`PickTargetRequest.affinity_key`, `RoutingRequest.affinity_key`):
a prefix key is its 16 hex digits (`key_text`), read back to the same integer by
`parse_affinity_key`; any other text is a key of its own (hashed as it is).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

from pointsman.affinity import Key
from pointsman.config import non_empty, rule
from pointsman.prefix import PrefixBlocks
from pointsman.router.v1 import router_pb2

__all__ = [
    "MAX_AFFINITY_KEY_CHARS",
    "PrefixRouting",
    "key_text",
    "parse_affinity_key",
]

# The longest affinity key a PickTarget request may carry.
MAX_AFFINITY_KEY_CHARS = 256
_KEY_DIGITS = 16
_HEX = frozenset(string.hexdigits)


@dataclass(frozen=True, slots=True)
class PrefixRouting:
    """One model's prefix routing, as the policy file says it (`models.<name>.prefix_routing`).

    prompt_input: the BYTES input that holds the prompt (`PROMPT` for the codegen models).
    block_bytes, max_blocks, min_blocks: how the prompt is cut into blocks and how many
        leading ones make the key (`pointsman.prefix.PrefixBlocks`); the key covers at most
        block_bytes x max_blocks bytes, so requests that share that much share a holder.
    epsilon: a holder takes a request only while its load stays within
        ceil((1 + epsilon) x mean) over the holders; a hot prefix spills to its next holder.
    """

    prompt_input: str = field(metadata=rule(check=non_empty))
    block_bytes: int = field(default=64, metadata=rule(minimum=1, maximum=1 << 20))
    max_blocks: int = field(default=16, metadata=rule(minimum=1, maximum=4096))
    min_blocks: int = field(default=1, metadata=rule(minimum=1))
    epsilon: float = field(default=0.25, metadata=rule(minimum=0, maximum=100))
    # Built once from the three block fields (not read from the file).
    blocks: PrefixBlocks = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "blocks", PrefixBlocks(self.block_bytes, self.max_blocks, self.min_blocks)
        )

    def to_proto(self) -> router_pb2.PrefixRouting:
        return router_pb2.PrefixRouting(
            prompt_input=self.prompt_input,
            block_bytes=self.block_bytes,
            max_blocks=self.max_blocks,
            min_blocks=self.min_blocks,
            epsilon=self.epsilon,
        )

    @classmethod
    def from_proto(cls, message: router_pb2.PrefixRouting) -> PrefixRouting:
        """Raises ValueError for a message no policy could have produced."""
        if not message.prompt_input:
            raise ValueError("prefix_routing.prompt_input is empty")
        if not 0 <= message.epsilon < float("inf"):
            raise ValueError(f"prefix_routing.epsilon must be >= 0, got {message.epsilon}")
        return cls(
            message.prompt_input,
            message.block_bytes,
            message.max_blocks,
            message.min_blocks,
            message.epsilon,
        )


def key_text(key: int) -> str:
    """A prefix key as PickTarget carries it: 16 hex digits."""
    return f"{key:016x}"


def parse_affinity_key(text: str) -> Key:
    """The key `text` names: the integer of a prefix key's 16 hex digits, else the text."""
    if len(text) == _KEY_DIGITS and _HEX.issuperset(text):
        return int(text, 16)
    return text
