"""`ONECARD_REPLICAS=2 make run`: two processes of each gRPC service, each later one on ports a
step above the first, and every caller told all of a service's addresses as one target."""
from __future__ import annotations

import pytest

from devstack.config import REPLICA_PORT_STEP, ConfigError, DevstackConfig
from runtime.targets import channel_target


def test_one_process_of_each_service_unless_told() -> None:
    config = DevstackConfig.from_env(environ={})
    assert config.replicas == 1
    assert config.target_of("ledger") == "127.0.0.1:50053"
    assert [svc.process_name for svc in config.services] == [
        "identity", "codegen", "ledger", "policy", "devicehub", "webhooks", "gateway"]


def test_two_replicas_of_each_grpc_service_behind_one_target() -> None:
    config = DevstackConfig.from_env(environ={"ONECARD_REPLICAS": "2"})
    ledgers = config.replicas_of("ledger")
    assert [(s.process_name, s.port, s.metrics_port) for s in ledgers] == [
        ("ledger", 50053, 9103), ("ledger-2", 50053 + REPLICA_PORT_STEP, 9103 + REPLICA_PORT_STEP)]
    assert config.target_of("ledger") == f"127.0.0.1:50053,127.0.0.1:{50053 + REPLICA_PORT_STEP}"
    assert channel_target(config.target_of("ledger")).startswith("ipv4:")
    assert config.extra_target_of("devicehub") == f"127.0.0.1:50056,127.0.0.1:{50056 + REPLICA_PORT_STEP}"
    assert len(config.replicas_of("gateway")) == 1
    assert config.service("ledger") is ledgers[0]
    # Every port is claimed once, so a busy one is reported by the variable that moves it.
    ports = [claim.port for claim in config.port_claims()]
    assert len(ports) == len(set(ports))


@pytest.mark.parametrize("value", ["0", "5", "two"])
def test_a_replica_count_out_of_range_is_refused_by_name(value: str) -> None:
    with pytest.raises(ConfigError, match="ONECARD_REPLICAS"):
        DevstackConfig.from_env(environ={"ONECARD_REPLICAS": value})
