"""DNS discovery: the pure record reading (a table), and `DnsDiscovery` asking a real DNS
server (a minimal in-test UDP server built on dnspython) shaped like a headless Service:
SRV records `_grpc._tcp.<service>` with per-pod targets, and A records."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from pointsman.errors import ConfigError
from router.discovery_config import (
    DiscoveryConfig,
    DiscoveryKind,
    DnsRecord,
    parse_discovery_config,
)
from router.discovery_dns import DnsDiscovery, instances_from_a, instances_from_srv

SERVICE = "triton.pointsman.svc.cluster.local"


def test_instances_from_srv_and_a() -> None:
    config = DiscoveryConfig(kind=DiscoveryKind.DNS, service=SERVICE, metrics_port=8002)
    found = instances_from_srv(
        [
            (f"triton-1.triton.{SERVICE}.", 9001, "10.0.0.2"),
            (f"triton-0.triton.{SERVICE}.", 9001, "10.0.0.1"),
            (f"triton-0.triton.{SERVICE}.", 9001, "10.0.0.9"),  # same pod twice: first wins
        ],
        config,
    )
    assert [(i.instance_id, i.grpc_address, i.metrics_url) for i in found] == [
        ("triton-0", "10.0.0.1:9001", "http://10.0.0.1:8002/metrics"),
        ("triton-1", "10.0.0.2:9001", "http://10.0.0.2:8002/metrics"),
    ]
    no_metrics = DiscoveryConfig(kind=DiscoveryKind.DNS, service=SERVICE, metrics_port=0)
    assert [
        (i.instance_id, i.grpc_address, i.metrics_url)
        for i in instances_from_a(["10.0.0.2", "10.0.0.1", "10.0.0.2"], no_metrics)
    ] == [("10.0.0.1", "10.0.0.1:8001", ""), ("10.0.0.2", "10.0.0.2:8001", "")]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"kind": "dns"}, "discovery.service: required"),
        ({"kind": "consul"}, "discovery.kind: must be one of dns, kubernetes, static"),
        (
            {"kind": "dns", "service": "s", "record": "aaaa"},
            "discovery.record: must be one of a, srv",
        ),
        ({"kind": "dns", "service": "s", "nameserver": "1.1.1.1"}, "discovery.nameserver"),
        ({"kind": "dns", "service": "s", "interval_s": 0}, "discovery.interval_s"),
        ({"kind": "kubernetes", "watch_timeout_s": 0}, "discovery.watch_timeout_s"),
        ({"kind": "kubernetes", "api_server": "localhost:1"}, "discovery.api_server"),
        ({"kind": "kubernetes", "address_type": "FQDN"}, "discovery.address_type"),
        ({"kind": "kubernetes", "grpc_port": "x"}, "discovery.grpc_port"),
        ({"kind": "kubernetes", "selector": "x"}, "discovery.selector: unknown field"),
        ("kubernetes", "discovery: must be a mapping"),
    ],
)
def test_bad_discovery_config_names_the_field(data: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        parse_discovery_config(data)


class FakeDns:
    """Answers SRV and A questions over UDP from `records`; anything else is NXDOMAIN."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, int], list[str]] = {}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                continue
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            question = query.question[0]
            answers = self.records.get((question.name.to_text().lower(), question.rdtype))
            if answers:
                response.answer.append(
                    dns.rrset.from_text_list(
                        question.name, 5, dns.rdataclass.IN, question.rdtype, answers
                    )
                )
            else:
                response.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(response.to_wire(), peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def fake_dns() -> Iterator[FakeDns]:
    server = FakeDns()
    yield server
    server.close()


@pytest.mark.timeout(30)
def test_srv_discovery_follows_the_headless_service(fake_dns: FakeDns) -> None:
    srv = (f"_grpc._tcp.{SERVICE}.", dns.rdatatype.SRV)
    fake_dns.records[srv] = [
        f"0 50 8001 triton-0.triton.{SERVICE}.",
        f"0 50 8001 triton-1.triton.{SERVICE}.",
    ]
    fake_dns.records[(f"triton-0.triton.{SERVICE}.", dns.rdatatype.A)] = ["10.1.0.10"]
    fake_dns.records[(f"triton-1.triton.{SERVICE}.", dns.rdatatype.A)] = ["10.1.0.11"]
    config = parse_discovery_config(
        {
            "kind": "dns",
            "service": SERVICE,
            "nameserver": f"127.0.0.1:{fake_dns.port}",
            "interval_s": 0.1,
        }
    )
    discovery = DnsDiscovery(config)
    discovery.refresh()
    assert [(i.instance_id, i.grpc_address) for i in discovery.instances()] == [
        ("triton-0", "10.1.0.10:8001"),
        ("triton-1", "10.1.0.11:8001"),
    ]
    # A pod goes (not ready: Kubernetes takes it out of DNS).
    fake_dns.records[srv] = [f"0 50 8001 triton-1.triton.{SERVICE}."]
    discovery.refresh()
    assert [i.instance_id for i in discovery.instances()] == ["triton-1"]
    # DNS unreachable: the last view stays.
    fake_dns.close()
    discovery.refresh()
    assert [i.instance_id for i in discovery.instances()] == ["triton-1"]


@pytest.mark.timeout(30)
def test_a_record_discovery_runs_in_its_thread(fake_dns: FakeDns) -> None:
    fake_dns.records[(f"{SERVICE}.", dns.rdatatype.A)] = ["10.1.0.10", "10.1.0.11"]
    config = DiscoveryConfig(
        kind=DiscoveryKind.DNS,
        service=SERVICE,
        record=DnsRecord.A,
        grpc_port=9001,
        nameserver=f"127.0.0.1:{fake_dns.port}",
        interval_s=0.05,
    )
    discovery = DnsDiscovery(config)
    discovery.start()
    try:
        assert discovery.synced.wait(5)
        assert [i.grpc_address for i in discovery.instances()] == [
            "10.1.0.10:9001",
            "10.1.0.11:9001",
        ]
        # No pod ready at all: NXDOMAIN empties the fleet.
        del fake_dns.records[(f"{SERVICE}.", dns.rdatatype.A)]
        deadline = threading.Event()
        for _ in range(100):
            if not discovery.instances():
                break
            deadline.wait(0.05)
        assert discovery.instances() == ()
    finally:
        discovery.stop()


def test_router_config_picks_the_discovery() -> None:
    from router.config import parse_router_config
    from router.discovery import StaticDiscovery, discovery_for
    from router.discovery_kubernetes import KubernetesDiscovery

    static = parse_router_config({"instances": [{"id": "a", "grpc": "127.0.0.1:1"}]})
    assert isinstance(discovery_for(static), StaticDiscovery)
    dns_config = parse_router_config({"discovery": {"kind": "dns", "service": SERVICE}})
    assert isinstance(discovery_for(dns_config), DnsDiscovery)
    kube = parse_router_config({"discovery": {"kind": "kubernetes", "namespace": "x"}})
    assert isinstance(discovery_for(kube), KubernetesDiscovery)
    with pytest.raises(ConfigError, match=r"instances: must be empty when discovery\.kind is dns"):
        parse_router_config(
            {
                "instances": [{"id": "a", "grpc": "127.0.0.1:1"}],
                "discovery": {"kind": "dns", "service": SERVICE},
            }
        )
