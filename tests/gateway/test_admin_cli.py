"""onecard-admin against the real mesh: every service started here, called over mutual TLS with
the operator's certificate and read from JetStream with the operator's NATS account."""
from __future__ import annotations

from typing import Any

import pytest

from onecard_admin.settings import SERVICE_NAMES, AdminSettings
from runtime import VERSION
from tests.admin.cli import admin, admin_json, admin_settings
from tests.conftest import start_service
from tests.gateway.conftest import ClientCredentials
from tests.mesh import pki


@pytest.fixture
def platform_settings(platform_gateway: Any, identity: Any, codegen_service: Any, ledger_service: Any,
                      policy_service: Any, devicehub_service: Any, webhooks_service: Any, nats_url: str) -> AdminSettings:
    return admin_settings(nats_url, identity=identity.target, codegen=codegen_service.target,
                          ledger=ledger_service.target, policy=policy_service.target,
                          devicehub=devicehub_service.target, webhooks=webhooks_service.target)


async def test_status_lists_every_service_serving_and_the_streams(platform_settings: AdminSettings) -> None:
    code, doc = await admin_json(platform_settings, "status")
    assert code == 0, doc
    assert {row["service"]: row["health"] for row in doc["services"]} == {name: "SERVING" for name in SERVICE_NAMES}
    assert doc["nats"] == "ok"
    assert {"IDENTITY", "LEDGER", "DEVICEHUB"} <= {row["stream"] for row in doc["streams"]}
    # Durable consumers only, each with its lag (the ledger's purse opener follows identity).
    assert ("IDENTITY", "ledger-member-purses") in {(row["stream"], row["consumer"]) for row in doc["consumers"]}
    assert all(row["lag"] == row["pending"] + row["ack_pending"] for row in doc["consumers"])
    # Each service's version, its schema fully migrated, and its outbox (OpsService.GetServiceInfo).
    for row in doc["services"]:
        assert row["version"] == VERSION, row
        assert row["migrations_pending"] == [] and row["migrations_applied"] == row["migrations_known"] > 1, row
        assert row["outbox_unpublished"] >= 0 and row["outbox_oldest_age_s"] >= 0, row
    assert (doc["healthy"], doc["problems"], doc["open_alarms"], doc["alarms"]) == (True, [], 0, [])

    code, text, _ = await admin(platform_settings, "status")
    lines = text.splitlines()
    assert code == 0 and "problems: none" in lines
    header = lines[lines.index("SERVICES") + 1].split()
    assert header == ["SERVICE", "TARGET", "HEALTH", "VERSION", "MIGRATIONS", "PENDING", "OUTBOX", "OLDEST_S",
                      "DETAIL"]


async def test_tenants_create_then_clients_create_gives_a_client_that_logs_in(
        platform_gateway: Any, platform_settings: AdminSettings) -> None:
    code, created = await admin_json(platform_settings, "tenants", "create", "--name", "North Campus",
                                     "--kind", "university")
    assert code == 0
    tenant_id = created["tenants"][0]["tenant_id"]
    # The same id again is the same tenant, not a second one.
    code, again = await admin_json(platform_settings, "tenants", "create", "--name", "North Campus",
                                   "--tenant-id", tenant_id)
    assert (code, again["tenants"][0]["tenant_id"]) == (0, tenant_id)
    code, listed = await admin_json(platform_settings, "tenants", "list")
    assert [t["name"] for t in listed["tenants"] if t["tenant_id"] == tenant_id] == ["North Campus"]

    code, client = await admin_json(platform_settings, "clients", "create", "--tenant", tenant_id,
                                    "--scope", "clients:admin", "--scope", "members:read")
    assert code == 0
    row = client["clients"][0]
    response = await platform_gateway.request_token(
        tenant_id=tenant_id, credentials=ClientCredentials(row["client_id"], row["client_secret"]))
    assert response.status_code == 200, response.text
    assert set(response.json()["scope"].split()) == {"clients:admin", "members:read"}

    # A retry with the key the first run printed is the same client, and the secret is not shown again.
    assert client["secret_already_shown"] is False and client["idempotency_key"]
    code, again = await admin_json(platform_settings, "clients", "create", "--tenant", tenant_id,
                                   "--scope", "clients:admin", "--scope", "members:read",
                                   "--idempotency-key", client["idempotency_key"])
    assert (code, again["secret_already_shown"]) == (0, True)
    assert (again["clients"][0]["client_id"], again["clients"][0]["client_secret"]) == (row["client_id"], "")
    code, out, _ = await admin(platform_settings, "clients", "create", "--tenant", tenant_id,
                               "--scope", "members:read", "--scope", "clients:admin",
                               "--idempotency-key", client["idempotency_key"])
    assert code == 0 and "cannot be read again" in out and row["client_id"] in out
    # ... but with other scopes it is another request: refused, nothing made.
    code, out, err = await admin(platform_settings, "clients", "create", "--tenant", tenant_id,
                                 "--scope", "members:read", "--idempotency-key", client["idempotency_key"])
    assert (code, out) == (2, "") and "ABORTED IDEMPOTENCY_KEY_REUSED" in err


async def test_trial_balance_and_alarms_of_a_new_tenant(platform_settings: AdminSettings) -> None:
    _, created = await admin_json(platform_settings, "tenants", "create", "--name", "East")
    tenant_id = created["tenants"][0]["tenant_id"]
    code, balance = await admin_json(platform_settings, "trial-balance", "--tenant", tenant_id)
    assert (code, balance["balanced"], balance["postings_sum_fen"]) == (0, True, 0)
    code, alarms = await admin_json(platform_settings, "alarms", "--tenant", tenant_id)
    assert (code, alarms["alarms"]) == (0, [])


async def test_a_refused_call_is_one_line_and_exit_2(platform_settings: AdminSettings) -> None:
    code, out, err = await admin(platform_settings, "trial-balance", "--tenant", "not-a-uuid")
    assert (code, out) == (2, "")
    assert err.startswith("onecard-admin: trial-balance: INVALID_ARGUMENT") and "Traceback" not in err


async def test_a_service_down_has_its_row_say_so_and_status_exits_1(identity: Any, nats_url: str) -> None:
    settings = admin_settings(nats_url, identity=identity.target, ledger="127.0.0.1:1")
    code, doc = await admin_json(settings, "status")
    health = {row["service"]: row["health"] for row in doc["services"]}
    assert (code, health["identity"], health["ledger"]) == (1, "SERVING", "DOWN")


async def test_another_identity_than_ops_is_refused(nats_url: str) -> None:
    settings = AdminSettings(tls_dir=pki().tls_dir("gateway"), nats_url=nats_url)
    code, _, err = await admin(settings, "status")
    assert code == 2 and "not of 'ops'" in err


def consumer_lag(doc: dict[str, Any], stream: str, prefix: str) -> int:
    return sum(row["lag"] for row in doc["consumers"] if row["stream"] == stream and row["consumer"].startswith(prefix))


async def test_consumer_lag_grows_while_its_service_is_stopped_and_shrinks_when_it_is_back(
        identity: Any, database_url: str, nats_url: str) -> None:
    from onecard.identity.v1 import identity_pb2 as pb
    from services.ledger.app import build_app
    from services.ledger.consumer import IDENTITY_DURABLE
    from tests.ledger.conftest import ledger_settings

    settings = admin_settings(nats_url, identity=identity.target)
    ledger = await start_service(build_app(ledger_settings(database_url=database_url, nats_url=nats_url)))
    await ledger.stop()

    # The ledger's durable follows member creations (a purse per member): five wait for it.
    tenant = (await identity.stub.CreateTenant(pb.CreateTenantRequest(
        name="T", kind=pb.TENANT_KIND_ENTERPRISE, time_zone="Asia/Shanghai", currency="CNY"))).tenant
    for n in range(5):
        await identity.stub.CreateMember(pb.CreateMemberRequest(tenant_id=tenant.tenant_id, external_number=f"E{n}",
                                                                name=f"Member {n}"))
    # The identity outbox relays on its own time: wait (no clock) until the backlog shows.
    lag = 0
    for _ in range(200):
        _, doc = await admin_json(settings, "status")
        lag = consumer_lag(doc, "IDENTITY", IDENTITY_DURABLE)
        if lag >= 5:
            break
        await _tick()
    assert lag >= 5

    ledger = await start_service(build_app(ledger_settings(database_url=database_url, nats_url=nats_url)))
    try:
        for _ in range(200):
            _, doc = await admin_json(settings, "status")
            lag = consumer_lag(doc, "IDENTITY", IDENTITY_DURABLE)
            if lag == 0:
                break
            await _tick()
        assert lag == 0
    finally:
        await ledger.stop()


async def _tick() -> None:
    import asyncio

    await asyncio.sleep(0.05)


async def test_keys_rotate_twice_leaves_the_first_rotations_key_verifying(platform_settings: AdminSettings) -> None:
    _, created = await admin_json(platform_settings, "tenants", "create", "--name", "West")
    tenant_id = created["tenants"][0]["tenant_id"]
    code, first = await admin_json(platform_settings, "keys", "rotate", "--tenant", tenant_id)
    assert code == 0
    signing = {row["role"]: row for row in first["keys"]}["signing"]
    code, second = await admin_json(platform_settings, "keys", "rotate", "--tenant", tenant_id)
    keys = {row["role"]: row for row in second["keys"]}
    assert code == 0 and keys["previous"]["key_id"] == signing["key_id"]
    assert keys["previous"]["status"] == "verifying" and keys["signing"]["key_id"] != signing["key_id"]
    assert second["trust_list_version"] > first["trust_list_version"]
    # A retry of the second run (its printed key) is that rotation, not a third.
    code, retried = await admin_json(platform_settings, "keys", "rotate", "codegen", "--tenant", tenant_id,
                                     "--idempotency-key", second["idempotency_key"])
    # It answers that rotation's keys as they stand now: the replaced key may have retired since
    # (this tenant has no credentials, so the periodic sweep may retire it at any moment).
    assert (code, retried["replayed"]) == (0, True)
    assert [(k["role"], k["key_id"]) for k in retried["keys"]] == [(k["role"], k["key_id"]) for k in second["keys"]]
    assert retried["trust_list_version"] >= second["trust_list_version"]


async def test_rollouts_of_a_tenant_without_any_is_an_empty_table(platform_settings: AdminSettings) -> None:
    _, created = await admin_json(platform_settings, "tenants", "create", "--name", "South")
    code, text, _ = await admin(platform_settings, "rollouts", "--tenant", created["tenants"][0]["tenant_id"])
    assert (code, text.split()) == (0, ["ROLLOUT_ID", "TARGET", "VERSION", "STATE", "STAGE", "STAGES", "DEVICES",
                                        "DETAIL"])


async def test_nats_unreachable_is_said_and_status_exits_1(identity: Any) -> None:
    settings = admin_settings("nats://127.0.0.1:1", identity=identity.target)
    code, doc = await admin_json(settings, "status")
    assert code == 1 and doc["nats"] != "ok"
    assert {row["service"]: row["health"] for row in doc["services"]}["identity"] == "SERVING"
    assert doc["consumers"] == [] and doc["streams"] == []


async def test_keys_rotate_policy_rotates_once_per_idempotency_key(platform_settings: AdminSettings) -> None:
    _, created = await admin_json(platform_settings, "tenants", "create", "--name", "North-West")
    tenant_id = created["tenants"][0]["tenant_id"]
    code, first = await admin_json(platform_settings, "keys", "rotate", "policy", "--tenant", tenant_id)
    assert code == 0 and first["replayed"] is False and first["idempotency_key"]
    signing = {row["role"]: row for row in first["keys"]}["signing"]
    assert signing["status"] == "signing"

    # A retry with the printed key is the same rotation; a new run rotates again.
    code, retried = await admin_json(platform_settings, "keys", "rotate", "policy", "--tenant", tenant_id,
                                     "--idempotency-key", first["idempotency_key"])
    assert code == 0 and retried["replayed"] is True and retried["keys"] == first["keys"]
    code, second = await admin_json(platform_settings, "keys", "rotate", "policy", "--tenant", tenant_id)
    keys = {row["role"]: row for row in second["keys"]}
    assert code == 0 and second["idempotency_key"] != first["idempotency_key"]
    assert keys["previous"]["key_id"] == signing["key_id"] and keys["previous"]["status"] == "verifying"
