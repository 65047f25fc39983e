"""Discovery from DNS: a headless Service's SRV or A records, asked again every `interval_s`.

A headless Service (`clusterIP: None`) publishes one A record per ready pod under its name and,
for each named port, SRV records `_<port>._tcp.<service>` whose targets are per-pod names. This
is lighter than watching EndpointSlices (no RBAC, no API server load) but only as fresh as the
cluster DNS cache and `interval_s`, and it cannot tell a terminating pod from a serving one
(Kubernetes removes it from DNS once it is not ready).

- `record: srv`: one instance per SRV target, id = the target's first label (the pod's
  hostname), gRPC on the record's port, metrics on `metrics_port` of the same address.
- `record: a`: one instance per address, id = the address, gRPC on `grpc_port`.

A failed lookup keeps the previous view (a DNS hiccup must not empty the fleet); an answer
with no records (NXDOMAIN, no pods ready) empties it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import dns.exception
import dns.rdatatype
import dns.resolver

from router.config import InstanceConfig
from router.discovery_config import DiscoveryConfig, DnsRecord

__all__ = ["DnsDiscovery", "SrvTarget", "instances_from_a", "instances_from_srv"]

log = logging.getLogger(__name__)

# (target name, port, address)
SrvTarget = tuple[str, int, str]


def _host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _metrics_url(address: str, port: int) -> str:
    return f"http://{_host_port(address, port)}/metrics" if port else ""


def instances_from_srv(
    targets: Sequence[SrvTarget], config: DiscoveryConfig
) -> tuple[InstanceConfig, ...]:
    """One instance per SRV target (sorted by id; a repeated id keeps its first target)."""
    found: dict[str, InstanceConfig] = {}
    for target, port, address in targets:
        instance_id = target.rstrip(".").split(".", 1)[0] or address
        found.setdefault(
            instance_id,
            InstanceConfig(
                instance_id=instance_id,
                grpc_address=_host_port(address, port),
                metrics_url=_metrics_url(address, config.metrics_port),
                memory_budget_bytes=config.memory_budget_bytes,
            ),
        )
    return tuple(found[key] for key in sorted(found))


def instances_from_a(
    addresses: Sequence[str], config: DiscoveryConfig
) -> tuple[InstanceConfig, ...]:
    """One instance per address, id = the address."""
    return tuple(
        InstanceConfig(
            instance_id=address,
            grpc_address=_host_port(address, config.grpc_port),
            metrics_url=_metrics_url(address, config.metrics_port),
            memory_budget_bytes=config.memory_budget_bytes,
        )
        for address in sorted(set(addresses))
    )


def _resolver(config: DiscoveryConfig) -> dns.resolver.Resolver:
    if not config.nameserver:
        return dns.resolver.Resolver()
    host, _, port = config.nameserver.rpartition(":")
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [host.strip("[]")]
    resolver.port = int(port)
    return resolver


class DnsDiscovery:
    """See the module docstring. `start()` begins asking; `stop()` ends the thread."""

    def __init__(self, config: DiscoveryConfig) -> None:
        self._config = config
        self._resolver = _resolver(config)
        self._resolver.lifetime = min(5.0, config.interval_s * 2)
        self._instances: tuple[InstanceConfig, ...] = ()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.synced = threading.Event()

    def instances(self) -> Sequence[InstanceConfig]:
        return self._instances

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pointsman-dns", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.refresh()
            self._stopping.wait(self._config.interval_s)

    def refresh(self) -> None:
        """Asks DNS once and publishes the answer; keeps the old view when DNS fails."""
        try:
            instances = self._lookup()
        except dns.exception.DNSException as exc:
            log.warning("DNS discovery of %s failed: %s", self._config.service, exc)
            return
        if instances != self._instances:
            log.info(
                "DNS %s: %d instance(s): %s",
                self._config.service,
                len(instances),
                ", ".join(i.instance_id for i in instances) or "none",
            )
        self._instances = instances
        self.synced.set()

    def _lookup(self) -> tuple[InstanceConfig, ...]:
        if self._config.record is DnsRecord.A:
            return instances_from_a(self._addresses(self._config.service), self._config)
        name = f"_{self._config.grpc_port_name}._tcp.{self._config.service}"
        try:
            answer = self._resolver.resolve(name, dns.rdatatype.SRV)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return ()
        targets: list[SrvTarget] = []
        for record in answer:
            target = record.target.to_text()
            targets.extend((target, record.port, a) for a in self._addresses(target)[:1])
        return instances_from_srv(targets, self._config)

    def _addresses(self, name: str) -> list[str]:
        try:
            return [record.to_text() for record in self._resolver.resolve(name, "A")]
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
