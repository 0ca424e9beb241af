"""The whole mesh on the test's own database and NATS, each service with its plaintext health port
open too (as in Kubernetes, where probes carry no certificate): ``mesh`` maps a service's name to
its RunningService. The device hub's fixtures (``devicehub`` and what it stands on) come from
tests/devicehub."""
from __future__ import annotations

from typing import Any

import pytest

from services.codegen.app import build_app as build_codegen
from services.devicehub.app import build_app as build_devicehub
from services.identity.app import IdentitySettings
from services.identity.app import build_app as build_identity
from services.ledger.app import build_app as build_ledger
from services.policy.app import build_app as build_policy
from services.webhooks.app import build_app as build_webhooks
from tests.codegen.conftest import codegen_settings
from tests.conftest import Launch, RunningService
from tests.devicehub.conftest import (  # noqa: F401 - fixtures, shared
    codegen,
    devicehub,
    devicehub_settings,
    ledger,
    policy,
    start_devicehub,
)
from tests.ledger.conftest import ledger_settings
from tests.mesh import service_values
from tests.policy_service.conftest import policy_settings
from tests.webhooks.conftest import webhooks_settings

HEALTH_PORT = {"health_port": 0}  # a free port of the system's choosing


@pytest.fixture
async def mesh(launch: Launch, database_url: str, nats_url: str) -> dict[str, RunningService]:
    where: dict[str, Any] = {"database_url": database_url, "nats_url": nats_url}
    running: dict[str, RunningService] = {}
    running["identity"] = await launch(build_identity(IdentitySettings(
        nats_url=nats_url, health_interval_s=0.2, **HEALTH_PORT, **service_values("identity", database_url))))
    running["codegen"] = await launch(build_codegen(codegen_settings(
        **where, identity_target=running["identity"].target, **HEALTH_PORT)))
    running["ledger"] = await launch(build_ledger(ledger_settings(**where, **HEALTH_PORT)))
    running["policy"] = await launch(build_policy(policy_settings(
        **where, ledger_target=running["ledger"].target, **HEALTH_PORT)))
    running["devicehub"] = await launch(build_devicehub(devicehub_settings(
        **where, identity_target=running["identity"].target, codegen_target=running["codegen"].target,
        policy_target=running["policy"].target, ledger_target=running["ledger"].target, **HEALTH_PORT)))
    running["webhooks"] = await launch(build_webhooks(webhooks_settings(
        **where, ledger_target=running["ledger"].target, **HEALTH_PORT)))
    return running
