"""The sidecar's configuration through the one reader: defects of the old hand-written one
(duplicate keys kept, NaN taken, 1.5 taken as an integer), one message style, and flags laid
over the file."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest

from pointsman.errors import ConfigError
from sidecar.config import SidecarConfig, config_from_mapping, load_config
from sidecar.main import add_arguments, build_config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "listen: 127.0.0.1:1\nmax_attempts: 2\nlisten: 127.0.0.1:2\n",
            "listen: duplicate key (lines 1 and 3)",
            id="duplicate-key",  # YAML kept the last one
        ),
        pytest.param(
            "static_routes:\n  echo: [t1:8001]\n  echo: [t2:8001]\n",
            "static_routes.echo: duplicate key (lines 2 and 3)",
            id="duplicate-nested-key",
        ),
        pytest.param(
            "reconnect_max_s: .nan\n",
            "reconnect_max_s: must be a finite number > 0, got nan",
            id="nan",
        ),
        pytest.param(
            "idempotency_ttl_s: .inf\n",
            "idempotency_ttl_s: must be a finite number >= 0, got inf",
            id="inf",
        ),
        pytest.param(
            "max_attempts: 1.5\n", "max_attempts: must be an integer >= 1, got 1.5", id="1.5"
        ),
        pytest.param(
            "max_in_flight: true\n",
            "max_in_flight: must be an integer >= 1, got True",
            id="bool-number",
        ),
        pytest.param(
            "retry_unavailable: 1\n", "retry_unavailable: must be true or false, got 1", id="bool"
        ),
        pytest.param(
            "routers: [r1:50051, r2:0]\n",
            "routers[1]: must be host:port with a port > 0, got 'r2:0'",
            id="dialled-port-0",
        ),
        pytest.param(
            "pick_mode: sometimes\n",
            "pick_mode: must be one of table, per-request, got 'sometimes'",
            id="literal",
        ),
        pytest.param(
            "router_tls: {ca_file: 3}\n", "router_tls.ca_file: must be a string, got 3", id="tls"
        ),
    ],
)
def test_bad_values_are_refused_in_one_style(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == message


def test_a_config_built_in_code_meets_the_same_rules() -> None:
    with pytest.raises(ConfigError, match=r"^pick_timeout_s: must be a finite number > 0, got nan"):
        SidecarConfig(pick_timeout_s=math.nan)
    assert SidecarConfig(routers=["r:1"]).routers == ("r:1",)  # type: ignore[arg-type]
    assert config_from_mapping({"cpus": 2}).cpus == (2,)


def test_flags_override_the_file_through_the_same_reader(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        "routers: [r1:1]\nmax_attempts: 2\ntriton_tls: {ca_file: ca.pem}\nmax_queued: 10\n"
    )
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = build_config(
        parser.parse_args(
            [
                *("--config", str(path), "--max-queued", "5", "--cpus", "0,1"),
                *("--router-tls-ca", "flag-ca.pem", "--no-deadline-queue-timeout"),
            ]
        )
    )
    assert config.routers == ("r1:1",) and config.max_attempts == 2
    assert config.max_queued == 5 and config.cpus == (0, 1)
    assert config.deadline_queue_timeout is False
    assert config.triton_tls.ca_file == str(tmp_path / "ca.pem")  # the file's, relative to it
    assert config.router_tls.ca_file == "flag-ca.pem"  # the flag's, as given
    with pytest.raises(ConfigError, match=r"^max_queued: must be an integer >= 0, got -1$"):
        build_config(parser.parse_args(["--config", str(path), "--max-queued", "-1"]))
