"""Which router replica places models: a Kubernetes Lease elects one, the others only route.

Two placement controllers over one fleet would fight (each can unload a different copy in the
same round), so with several replicas exactly one may write. `placement_lease` in the router's
config names a `coordination.k8s.io/v1` Lease in the discovery namespace; every replica runs
for it with the official client's leader election (`kubernetes.leaderelection`, the same
acquire/renew protocol as client-go), and only the holder's controller ticks and serves the
cold path. A leader that cannot renew within the renew deadline stops placing at once; another
replica takes the Lease when it expires. Routing never depends on the election.

The library runs in threads and cannot be stopped from outside; `LeaseElection.stop` makes
its next API round raise, which ends the thread.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from pointsman.config import or_empty, rule

__all__ = ["LeaseElection", "LeaseSettings"]

log = logging.getLogger(__name__)


_KUBERNETES_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def kubernetes_name(value: str) -> None:
    if not _KUBERNETES_NAME.fullmatch(value):
        raise ValueError("must be a Kubernetes object name")


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    """The Lease and its timing (client-go's defaults: 15 s, 10 s, 2 s)."""

    name: str = field(metadata=rule(check=kubernetes_name))
    # "" in the router's config: the discovery namespace.
    namespace: str = field(default="", metadata=rule(check=or_empty(kubernetes_name)))
    # How long a Lease not renewed stays the holder's.
    duration_s: int = field(default=15, metadata=rule(minimum=1))
    # A leader that fails to renew for this long stops leading.
    renew_deadline_s: int = field(default=10, metadata=rule(minimum=1))
    # Between tries to acquire or renew.
    retry_period_s: int = field(default=2, metadata=rule(minimum=1))

    def __post_init__(self) -> None:
        # The library's own rules (it would sys.exit on them).
        if self.retry_period_s < 1:
            raise ValueError("retry_period_s must be >= 1")
        if self.renew_deadline_s <= 1.2 * self.retry_period_s:
            raise ValueError("renew_deadline_s must be > 1.2 x retry_period_s")
        if self.duration_s <= self.renew_deadline_s:
            raise ValueError("duration_s must be > renew_deadline_s")


class _Stopped(Exception):
    """Raised into the library's loop to end its thread."""


class LeaseElection:
    """Runs for the Lease in a daemon thread; `is_leader` says whether this replica holds it."""

    def __init__(self, settings: LeaseSettings, identity: str, api_client: Any) -> None:
        self.settings = settings
        self.identity = identity
        self._api_client = api_client
        self._leading = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="placement-lease", daemon=True)

    def is_leader(self) -> bool:
        return self._leading.is_set()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float | None = None) -> None:
        """Stops running (the Lease is left to expire) and waits for the thread to end."""
        self._stopped.set()
        self._leading.clear()
        if timeout_s is None:
            timeout_s = self.settings.renew_deadline_s + 1.0
        self._thread.join(timeout_s)

    def _run(self) -> None:
        from kubernetes import client
        from kubernetes.leaderelection import electionconfig, leaderelection
        from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

        stopped = self._stopped

        class StoppableElection(leaderelection.LeaderElection):
            def try_acquire_or_renew(self) -> bool:
                if stopped.is_set():
                    raise _Stopped
                return bool(super().try_acquire_or_renew())  # type: ignore[no-untyped-call]

        # The library is untyped: its calls below are checked by tests/test_election.py.
        lock = LeaseLock(  # type: ignore[no-untyped-call]
            self.settings.name, self.settings.namespace, self.identity
        )
        lock.api_instance = client.CoordinationV1Api(self._api_client)
        config = electionconfig.Config(  # type: ignore[no-untyped-call]
            lock,
            lease_duration=self.settings.duration_s,
            renew_deadline=self.settings.renew_deadline_s,
            retry_period=self.settings.retry_period_s,
            onstarted_leading=self._started,
            onstopped_leading=self._stopped_leading,
        )
        while not stopped.is_set():
            try:
                election = StoppableElection(config)  # type: ignore[no-untyped-call]
                election.run()  # type: ignore[no-untyped-call]  # returns once leadership is lost
            except _Stopped:
                break
            except Exception:  # an API server answer the library did not expect
                log.exception("placement lease: election round failed; retrying")
                stopped.wait(self.settings.retry_period_s)
        self._leading.clear()

    def _started(self) -> None:
        log.info("placement lease %s/%s: %s places models now",
                 self.settings.namespace, self.settings.name, self.identity)  # fmt: skip
        self._leading.set()

    def _stopped_leading(self) -> None:
        if self._leading.is_set():
            log.warning("placement lease %s/%s: lost; %s stops placing",
                        self.settings.namespace, self.settings.name, self.identity)  # fmt: skip
        self._leading.clear()
