"""A shared-prefix code-generation workload: repositories, completions and multi-turn sessions.

Code assistants send prompts that share long prefixes: a repository's context (its files, a
system prompt) comes first, then what is particular to the request. This workload has:

- `repositories` repositories with Zipf popularity (`zipf_exponent`; with `hot_share`, one
  repository takes that share and the rest are Zipf over the remainder); each has a context of
  `context_bytes` bytes of code-like text, its own (the first line names it, so two contexts
  share no leading block);
- **completions** (a share 1 - `session_share` of the requests): the repository's context,
  then a snippet of `suffix_bytes` particular to the request, and `completion_tokens` tokens
  to generate (13: the median completion of Azure's code trace, as triton_models/README.md);
- **sessions** (the rest): a conversation about one repository, `turns` turns `turn_gap_s`
  apart; turn k sends the context, the k earlier turns' text (`turn_bytes` each) and its own
  question, and asks for `session_tokens` tokens. Each turn's prompt extends the previous
  one's, as a chat's history does.

`schedule` draws the arrivals of an open loop, seeded: completions and session starts are
Poisson processes whose rates add up, with each session's turns, to `rate_rps` requests per
second. Prompts are built once per arrival (bytes, ready to send), and each arrival keeps its
repository and session, so a result can be broken down by them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from bench.loadgen import poisson_arrivals
from bench.repository import zipf_popularity
from pointsman.prefix import PrefixBlocks, prefix_chain

__all__ = ["Arrival", "PrefixWorkload", "repository_context", "schedule", "shareable_blocks"]

_CODE = (
    "def {name}_{i}(items, key=None):\n    return sorted(items, key=key)[:{i}]\n",
    "class {Name}{i}:\n    def __init__(self, size={i}):\n        self.size = size\n",
    "async def fetch_{name}_{i}(client, url):\n    return await client.get(url, timeout={i})\n",
    "    # {name}: keep the cache bounded at {i} entries\n    cache.trim({i})\n",
)


@dataclass(frozen=True, slots=True)
class PrefixWorkload:
    repositories: int = 24
    zipf_exponent: float = 1.1
    context_bytes: int = 16384  # 256 blocks of 64 B, about 4k tokens at 4 B a token
    suffix_bytes: int = 256
    completion_tokens: int = 13
    session_share: float = 0.3  # of the requests
    turns: int = 4
    turn_gap_s: float = 2.0
    turn_bytes: int = 384
    session_tokens: int = 24
    # When set, repository 0 takes this share of the requests, the others Zipf over the rest.
    hot_share: float | None = None

    def popularity(self) -> list[float]:
        """Each repository's share of the requests."""
        shares = zipf_popularity(self.repositories, self.zipf_exponent)
        if self.hot_share is None or self.repositories == 1:
            return shares
        rest = zipf_popularity(self.repositories - 1, self.zipf_exponent)
        return [self.hot_share, *((1 - self.hot_share) * share for share in rest)]

    def describe(self) -> dict[str, object]:
        return {
            "repositories": self.repositories,
            "zipf_exponent": self.zipf_exponent,
            "hot_share": self.hot_share,
            "popularity": self.popularity(),
            "context_bytes": self.context_bytes,
            "suffix_bytes": self.suffix_bytes,
            "completion_tokens": self.completion_tokens,
            "session_share": self.session_share,
            "turns": self.turns,
            "turn_gap_s": self.turn_gap_s,
            "turn_bytes": self.turn_bytes,
            "session_tokens": self.session_tokens,
        }


@dataclass(frozen=True, slots=True)
class Arrival:
    at_s: float
    prompt: bytes
    tokens: int
    repository: int
    session: int  # -1 for a completion
    turn: int  # 0 for a completion

    @property
    def kind(self) -> str:
        return "completion" if self.session < 0 else "session"


def _text(seed: str, size: int) -> bytes:
    """`size` bytes of code-like text, the same for the same seed."""
    rng = random.Random(seed)
    parts: list[str] = []
    length = 0
    while length < size:
        name = f"{rng.choice(('parse', 'load', 'route', 'score', 'merge'))}{rng.randrange(99)}"
        part = rng.choice(_CODE).format(name=name, Name=name.capitalize(), i=rng.randrange(1000))
        parts.append(part)
        length += len(part)
    return "".join(parts).encode()[:size]


def repository_context(repository: int, size: int) -> bytes:
    """Repository `repository`'s shared context: its name first, `size` bytes in all."""
    head = f"# repository {repository}: project context\n".encode()
    return (head + _text(f"repository-{repository}", size))[:size]


def schedule(
    workload: PrefixWorkload, rate_rps: float, duration_s: float, rng: random.Random
) -> list[Arrival]:
    """The arrivals in [0, duration_s) at `rate_rps` requests per second (session turns
    included), in time order."""
    popularity = workload.popularity()
    repos = range(workload.repositories)
    contexts = [repository_context(r, workload.context_bytes) for r in repos]
    session_rate = rate_rps * workload.session_share / workload.turns
    completion_rate = rate_rps - session_rate * workload.turns
    arrivals: list[Arrival] = []
    if completion_rate > 0:
        for n, at in enumerate(poisson_arrivals(completion_rate, duration_s, rng)):
            repo = rng.choices(repos, weights=popularity)[0]
            suffix = _text(f"completion-{n}-{rng.random()}", workload.suffix_bytes)
            arrivals.append(
                Arrival(at, contexts[repo] + suffix, workload.completion_tokens, repo, -1, 0)
            )
    if session_rate > 0:
        for session, start in enumerate(poisson_arrivals(session_rate, duration_s, rng)):
            repo = rng.choices(repos, weights=popularity)[0]
            history = contexts[repo]
            for turn in range(workload.turns):
                at = start + turn * workload.turn_gap_s
                question = _text(f"session-{session}-{turn}-{rng.random()}", workload.turn_bytes)
                history += question
                if at < duration_s:
                    arrivals.append(
                        Arrival(at, history, workload.session_tokens, repo, session, turn)
                    )
    arrivals.sort(key=lambda a: a.at_s)
    return arrivals


def shareable_blocks(arrivals: Sequence[Arrival], block_bytes: int) -> tuple[int, int]:
    """(blocks looked up, blocks some earlier request had already sent): the hit ratio of one
    cache that never evicts and that every request reaches. Chained keys, as the models'
    caches: a block counts only when every block before it counts too."""
    seen: set[int] = set()
    lookups = hits = 0
    for arrival in sorted(arrivals, key=lambda a: a.at_s):
        count = len(arrival.prompt) // block_bytes
        if count == 0:
            continue
        chain = prefix_chain(arrival.prompt, PrefixBlocks(block_bytes, count))
        lookups += count
        leading = 0
        while leading < count and chain[leading] in seen:
            leading += 1
        hits += leading
        seen.update(chain)
    return lookups, hits
