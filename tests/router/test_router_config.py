"""Router configuration: valid files parse; every invalid field is named in the error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pointsman.errors import ConfigError
from router.config import load_router_config, parse_router_config

VALID: dict[str, Any] = {
    "listen": "127.0.0.1:9000",
    "refresh_interval_s": 0.05,
    "instances": [
        {"id": "a", "grpc": "127.0.0.1:8001", "metrics_url": "http://127.0.0.1:8002/metrics"},
        {"id": "b", "grpc": "10.0.0.2:8001", "memory_budget_bytes": 1024},
    ],
    "seed": 3,
}


def test_valid_config_parses_into_frozen_objects() -> None:
    config = parse_router_config(VALID)
    assert config.listen == "127.0.0.1:9000"
    assert [i.instance_id for i in config.instances] == ["a", "b"]
    assert config.instances[1].memory_budget_bytes == 1024
    assert config.refresh_interval_s == 0.05
    assert config.metrics_interval_s == 0.25  # default
    with pytest.raises(AttributeError):
        config.listen = "x"  # type: ignore[misc]


def _with(path: list[str | int], value: Any) -> dict[str, Any]:
    import copy

    data = copy.deepcopy(VALID)
    node: Any = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


@pytest.mark.parametrize(
    ("data", "field"),
    [
        pytest.param(_with(["listen"], "nope"), "listen", id="listen-not-host-port"),
        pytest.param(_with(["instances", 1, "grpc"], 8001), "instances[1].grpc", id="grpc"),
        pytest.param(_with(["instances", 0, "id"], ""), "instances[0].id", id="empty-id"),
        pytest.param(
            _with(["instances", 0, "memory_budget_bytes"], -1),
            "instances[0].memory_budget_bytes",
            id="negative-budget",
        ),
        pytest.param(
            _with(["instances", 0, "metrics_url"], "ftp://x"),
            "instances[0].metrics_url",
            id="metrics-url",
        ),
        pytest.param(_with(["instances", 0, "colour"], "red"), "instances[0].colour", id="unk"),
        pytest.param(_with(["refresh_interval_s"], 0), "refresh_interval_s", id="zero-interval"),
        pytest.param(_with(["metrics_interval_s"], "1s"), "metrics_interval_s", id="string-number"),
        pytest.param(_with(["instances"], {"a": 1}), "instances", id="instances-not-list"),
        pytest.param(_with(["seed"], 1.5), "seed", id="seed"),
        pytest.param(_with(["bogus"], 1), "bogus", id="unknown-top-level"),
        pytest.param(_with(["policy_file"], 3), "policy_file", id="policy-file-not-a-path"),
        pytest.param(
            _with(["instances", 1, "id"], "a"), "instances: duplicate id", id="duplicate-id"
        ),
    ],
)
def test_invalid_field_is_named(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_router_config(data)
    assert str(info.value).startswith(field)


def test_load_from_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text("instances:\n  - id: a\n    grpc: 127.0.0.1:1\n")
    assert load_router_config(path).instances[0].grpc_address == "127.0.0.1:1"


def test_broken_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text("instances: [\n")
    with pytest.raises(ConfigError, match=r"router\.yaml"):
        load_router_config(path)


def test_policy_file_is_relative_to_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text("policy_file: policies/main.yaml\n")
    assert load_router_config(path).policy_file == tmp_path / "policies" / "main.yaml"
    path.write_text("policy_file: /etc/pointsman/policy.yaml\n")
    assert load_router_config(path).policy_file == Path("/etc/pointsman/policy.yaml")
    assert parse_router_config({}).policy_file is None


def test_policy_flag_replaces_the_files_policy(tmp_path: Path) -> None:
    import argparse

    from router.main import add_arguments, config_from_args

    config_file = tmp_path / "router.yaml"
    config_file.write_text("policy_file: from-file.yaml\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--config", str(config_file)])
    assert config_from_args(args).policy_file == tmp_path / "from-file.yaml"
    args = parser.parse_args(["--config", str(config_file), "--policy", "flag.yaml"])
    assert config_from_args(args).policy_file == Path("flag.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "refresh_interval_s: .nan\n",
            "refresh_interval_s: must be a finite number > 0, got nan",
            id="nan-interval",  # was accepted; the collector then died converting it
        ),
        pytest.param(
            "route_ttl_ms: .inf\n",
            "route_ttl_ms: must be an integer in (0, 4294967295], got inf",
            id="inf-ttl",  # was an OverflowError
        ),
        pytest.param(
            "route_ttl_ms: 1.5\n",
            "route_ttl_ms: must be an integer in (0, 4294967295], got 1.5",
            id="fractional-ttl",  # was silently 1
        ),
        pytest.param(
            "heartbeat_interval_s: true\n",
            "heartbeat_interval_s: must be a finite number > 0, got True",
            id="bool-number",
        ),
        pytest.param(
            "listen: 127.0.0.1:8101\nseed: 1\nlisten: 127.0.0.1:9000\n",
            "listen: duplicate key (lines 1 and 3)",
            id="duplicate-key",  # YAML kept the last one
        ),
        pytest.param(
            "instances:\n  - id: a\n    grpc: 127.0.0.1:1\n    grpc: 127.0.0.1:2\n",
            "instances[0].grpc: duplicate key (lines 3 and 4)",
            id="duplicate-nested-key",
        ),
        pytest.param(
            "discovery: {kind: dns, service: s, interval_s: .nan}\n",
            "discovery.interval_s: must be a finite number > 0, got nan",
            id="nan-discovery-interval",
        ),
    ],
)
def test_bad_numbers_and_duplicate_keys_are_refused_naming_the_field(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_router_config(path)
    assert str(info.value) == message


def test_flags_go_through_the_same_reader(tmp_path: Path) -> None:
    import argparse

    from router.main import add_arguments, config_from_args

    config_file = tmp_path / "router.yaml"
    config_file.write_text(
        "instances: [{id: a, grpc: '127.0.0.1:1'}]\n"
        "route_ttl_ms: 100\n"
        "tls: {cert_file: certs/r.pem, key_file: certs/r.key, ca_file: ca.pem,"
        " require_client_cert: true}\n"
        "admin_identities: [ops]\n"
    )
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(
        parser.parse_args(
            [
                *("--config", str(config_file), "--listen", "127.0.0.1:0"),
                *("--instance", "b=127.0.0.1:2,http://127.0.0.1:3/metrics,10"),
                *("--admin-identity", "oncall", "--tls-cert", "flag.pem", "--no-placement"),
            ]
        )
    )
    assert config.listen == "127.0.0.1:0" and config.route_ttl_ms == 100
    assert [(i.instance_id, i.memory_budget_bytes) for i in config.instances] == [
        ("a", 0),
        ("b", 10),
    ]
    assert config.admin_identities == ("ops", "oncall")
    # A path from a flag is as given; one from the file is relative to the file.
    assert config.tls.cert_file == "flag.pem"
    assert config.tls.key_file == str(tmp_path / "certs/r.key")
    assert config.placement_writer is False
    for flags, message in (
        (["--listen", "nowhere"], "listen: must be host:port, got 'nowhere'"),
        (["--grace", "nan"], "shutdown_grace_s: must be a finite number >= 0, got nan"),
        (["--max-message-bytes", "0"], "max_message_bytes: must be an integer > 0, got 0"),
        (["--triton-tls-cert", "c.pem"], "triton_tls.key_file: cert_file and key_file go"),
    ):
        with pytest.raises(ConfigError) as info:
            config_from_args(parser.parse_args(flags))
        assert str(info.value).startswith(message), str(info.value)
