"""The running policy: `PolicyStore` holds it, reloads it on request and when its file changes,
and keeps it when a new file is refused.

A file that does not validate is refused and the running policy keeps serving. A file seen
changing is read only once it has held still for a moment, so a writer caught half-way is not
taken for a new policy.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pointsman.clock import Clock
from pointsman.errors import ConfigError
from router.policy.model import Policy
from router.policy.parser import default_policy, parse_policy_file

__all__ = ["PolicyCheck", "PolicyListener", "PolicyStore", "load_policy"]

log = logging.getLogger(__name__)

# A file whose mtime is this recent is read on every poll: a rewrite within the file system's
# timestamp granularity, with the same size, would otherwise look unchanged.
_RACY_S = 2.0
# A file seen changing is read once its size and mtime held still this long.
_SETTLE_S = 0.05


def load_policy(path: Path) -> Policy:
    """The policy in the file at `path`. Raises ConfigError (file errors start with the path)."""
    return parse_policy_file(_read(path)[1], path)


PolicyListener = Callable[[Policy], None]
# Refuses a policy that parses but cannot run here (raises ConfigError naming the field).
PolicyCheck = Callable[[Policy], None]


@dataclass(frozen=True, slots=True)
class _FileState:
    """What the store last read of the file: its stat signature and the hash of its bytes."""

    signature: tuple[int, int, int]  # (mtime_ns, size, inode)
    digest: str


class PolicyStore:
    """The running policy; reloads on `reload()` and, under `watch()`, when the file changes.

    A file that does not validate is refused and the running policy keeps serving: `reload()`
    raises the ConfigError, `watch()` logs it once per content. Listeners run synchronously, in
    subscription order, after each change of version; one that raises is logged and the rest
    still run. Runs on one event loop: no locks.
    """

    def __init__(
        self, path: Path | None, *, clock: Clock = time.time, check: PolicyCheck | None = None
    ) -> None:
        """Loads `path` (the default policy when None); raises ConfigError if it is invalid.

        `clock` gives Unix seconds: `activated_unix_ms` is what GetPolicy shows. `check` is
        applied to every policy read from the file, at start, on `reload()` and under
        `watch()`, after it parses: what it refuses is refused like an invalid file. The
        built-in default is not checked: it must run anywhere.
        """
        self.path = path
        self._clock = clock
        self._check = check
        self._listeners: list[PolicyListener] = []
        self._file: _FileState | None = None
        self._missing_logged = False
        if path is None:
            self._current = default_policy()
        else:
            state, raw = _read(path)
            self._current = self._parse(raw, path)
            self._file = state
        self._activated_at = clock()

    @property
    def current(self) -> Policy:
        return self._current

    @property
    def activated_unix_ms(self) -> int:
        """When the current version became active, Unix milliseconds."""
        return int(self._activated_at * 1000)

    def subscribe(self, listener: PolicyListener) -> Callable[[], None]:
        """Calls `listener(policy)` on each change of version; returns the unsubscriber."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def reload(self) -> tuple[bool, str]:
        """Reads the file now: (whether the version changed, the version now active).

        Raises ConfigError, and keeps the running policy, when the file does not validate or
        cannot be read. Without a file, nothing changes.
        """
        if self.path is None:
            return False, self._current.version
        state, raw = _read(self.path)
        self._file = state
        try:
            policy = self._parse(raw, self.path)
        except ConfigError as exc:
            self._log_refusal(exc)
            raise
        return self._activate(policy), self._current.version

    async def watch(self, interval_s: float = 0.2) -> None:
        """Polls the file every `interval_s` and applies a changed one; never raises, so a bad
        edit is logged and the running policy stays. Returns at once without a file.

        A change is applied within interval_s + _SETTLE_S + the parse (about 0.3 s at the
        default): a file seen changing is read once it has held still for _SETTLE_S, so a
        writer caught half-way is not taken for a new policy.
        """
        if self.path is None:
            return
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self._poll(self.path)
            except Exception:  # the watcher must outlive any surprise
                log.exception("policy watch: checking %s failed", self.path)

    async def _poll(self, path: Path) -> None:
        signature = self._stat_or_log(path)
        if signature is None:
            return
        if self._file is None or self._file.signature != signature:
            await asyncio.sleep(_SETTLE_S)
            if self._stat_or_log(path) != signature:
                return  # still being written: the next poll looks again
        elif time.time() - signature[0] / 1e9 >= _RACY_S:
            return  # unchanged, and old enough for its timestamp to be trusted
        try:
            state, raw = _read(path)
        except ConfigError as exc:
            log.warning("policy file: %s", exc)
            return
        if self._file is not None and self._file.digest == state.digest:
            self._file = state
            return
        self._file = state
        try:
            policy = self._parse(raw, path)
        except ConfigError as exc:
            self._log_refusal(exc)
            return
        self._activate(policy)

    def _parse(self, raw: bytes, path: Path) -> Policy:
        policy = parse_policy_file(raw, path)
        if self._check is not None:
            self._check(policy)
        return policy

    def _stat_or_log(self, path: Path) -> tuple[int, int, int] | None:
        try:
            signature = _signature(path)
        except OSError as exc:
            if not self._missing_logged:
                log.warning(
                    "policy file %s: %s; keeping version %s",
                    path,
                    exc.strerror or exc,
                    self._current.version,
                )
                self._missing_logged = True
            return None
        self._missing_logged = False
        return signature

    def _activate(self, policy: Policy) -> bool:
        if policy.version == self._current.version:
            self._current = policy  # same meaning; keep the text as now written
            return False
        old = self._current.version
        self._current = policy
        self._activated_at = self._clock()
        log.info("policy %s active (was %s), from %s", policy.version, old, policy.source)
        for listener in tuple(self._listeners):
            try:
                listener(policy)
            except Exception:
                log.exception("policy listener %r failed on version %s", listener, policy.version)
        return True

    def _log_refusal(self, error: ConfigError) -> None:
        log.warning(
            "policy file %s refused, keeping version %s: %s",
            self.path,
            self._current.version,
            error,
        )


def _signature(path: Path) -> tuple[int, int, int]:
    stat = os.stat(path)
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


def _read(path: Path) -> tuple[_FileState, bytes]:
    """Stat first, then read: a write between the two shows as a new signature next poll."""
    try:
        signature = _signature(path)
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from exc
    return _FileState(signature, hashlib.blake2b(raw, digest_size=16).hexdigest()), raw
