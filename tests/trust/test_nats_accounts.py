"""NATS accounts per service, against a real nats-server: a service publishes only its own subjects
and the JetStream calls it needs, so a forged event on another service's subject never reaches the
stream or any subscriber; nobody signs in without an nkey the server knows, or without TLS."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats
import pytest
from nats.js.api import ConsumerConfig

from devstack.servers import Nats, start_on_free_port
from runtime.events import ensure_streams
from runtime.nats_access import NkeyVariable, accounts_config, connect_options, permissions, public_key
from runtime.pki import IdentityFiles
from services.identity.app import STREAM as IDENTITY_STREAM
from services.nats_accounts import NATS_ACCOUNTS
from tests.mesh import connect_nats, nats_seed, pki

FORGED = json.dumps({"event_id": "00000000-0000-4000-8000-000000000001", "type": "member.unfrozen",
                     "tenant_id": "t", "occurred_at": "2026-12-03T12:00:00Z",
                     "data": {"member_id": "victim"}}).encode()


async def _errors_of(nc_factory) -> tuple[nats.aio.client.Client, list[str]]:  # noqa: ANN001
    seen: list[str] = []

    async def on_error(exc: Exception) -> None:
        seen.append(str(exc))

    return await nc_factory(on_error), seen


async def test_a_service_cannot_publish_another_services_events(nats_url: str) -> None:
    async def as_(name: str, error_cb=None):  # noqa: ANN001, ANN202
        options = connect_options(name=name, seed=nats_seed(name), tls=pki().tls(name))
        return await nats.connect(nats_url, error_cb=error_cb, **options) if error_cb else \
            await nats.connect(nats_url, **options)

    identity = await as_("identity")
    ledger, ledger_errors = await _errors_of(lambda cb: as_("ledger", cb))
    devicehub = await as_("devicehub")
    try:
        await ensure_streams(identity.jetstream(), [IDENTITY_STREAM])
        heard: list[str] = []

        async def hear(msg: nats.aio.msg.Msg) -> None:
            heard.append(msg.subject)

        await devicehub.subscribe("identity.>", cb=hear)
        await devicehub.flush()

        # The ledger's credentials: refused by the server, through JetStream and plain publish alike.
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.Error)):
            await ledger.jetstream().publish("identity.member.unfrozen", FORGED, timeout=2)
        await ledger.publish("identity.member.unfrozen", FORGED)
        await ledger.flush()
        await asyncio.sleep(0.3)
        assert any('permissions violation for publish to "identity.member.unfrozen"' in e.lower()
                   for e in ledger_errors), ledger_errors
        assert (await identity.jetstream().stream_info("IDENTITY")).state.messages == 0
        assert heard == []

        # Nor can it reach around the subject: purge or delete the stream, read another's replies.
        for api in ("$JS.API.STREAM.PURGE.IDENTITY", "$JS.API.STREAM.DELETE.IDENTITY",
                    "$JS.API.STREAM.MSG.DELETE.IDENTITY"):
            await ledger.publish(api, b"{}")
        await ledger.subscribe("_INBOX_identity.>")
        await ledger.flush()
        await asyncio.sleep(0.3)
        assert any("permissions violation for subscription" in e.lower() for e in ledger_errors), ledger_errors
        assert (await identity.jetstream().stream_info("IDENTITY")).config.name == "IDENTITY"

        # Identity's own credentials publish the same subject (the control).
        await identity.jetstream().publish("identity.member.unfrozen", FORGED, timeout=5)
        assert (await identity.jetstream().stream_info("IDENTITY")).state.messages == 1
        await asyncio.sleep(0.3)
        assert heard == ["identity.member.unfrozen"]
    finally:
        for nc in (identity, ledger, devicehub):
            await nc.close()


async def test_a_service_reads_only_the_streams_it_consumes(nats_url: str) -> None:
    identity = await connect_nats(nats_url, as_="identity")
    policy = await connect_nats(nats_url, as_="policy")
    try:
        await ensure_streams(identity.jetstream(), [IDENTITY_STREAM])
        # Policy follows the ledger's stream, not identity's: no consumer on IDENTITY for it.
        with pytest.raises((nats.errors.TimeoutError, nats.js.errors.Error)):
            await policy.jetstream().add_consumer("IDENTITY", ConsumerConfig(durable_name="sneak"), timeout=2)
        assert (await identity.jetstream().stream_info("IDENTITY")).state.consumer_count == 0
    finally:
        await identity.close()
        await policy.close()


async def test_the_gateway_follows_identitys_grant_events_and_can_forge_none(nats_url: str) -> None:
    """A forged identity.api_client.granted from the gateway's credentials (to revive a revoked
    token) is refused by the server; following identity's stream is all it may do."""
    identity = await connect_nats(nats_url, as_="identity")
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    gateway = await nats.connect(nats_url, error_cb=on_error,
                                 **connect_options(name="gateway", seed=nats_seed("gateway"), tls=pki().tls("gateway")))
    try:
        await ensure_streams(identity.jetstream(), [IDENTITY_STREAM])
        heard: list[str] = []
        sub = await gateway.jetstream().subscribe("identity.api_client.>", stream="IDENTITY", ordered_consumer=True)
        await gateway.publish("identity.api_client.granted", FORGED)
        await gateway.flush()
        await asyncio.sleep(0.3)
        assert any('permissions violation for publish to "identity.api_client.granted"' in e.lower()
                   for e in errors), errors
        await identity.jetstream().publish("identity.api_client.revoked", FORGED, timeout=5)
        heard.append((await sub.next_msg(timeout=5)).subject)
        assert heard == ["identity.api_client.revoked"]
        assert (await identity.jetstream().stream_info("IDENTITY")).state.messages == 1
        with pytest.raises((nats.errors.TimeoutError, nats.js.errors.Error)):
            await gateway.jetstream().add_consumer("IDENTITY", ConsumerConfig(durable_name="sneak"), timeout=2)
    finally:
        await gateway.close()
        await identity.close()


async def test_nobody_signs_in_without_a_known_nkey_or_without_tls(nats_url: str) -> None:
    from runtime.nats_access import new_seed

    with pytest.raises(Exception):  # noqa: B017,PT011 - refused at connect, however nats-py words it
        await nats.connect(nats_url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False,
                           tls=connect_options(name="ops", seed=None, tls=pki().tls("ops"))["tls"],
                           tls_hostname="nats")
    stranger = new_seed()
    with pytest.raises(Exception):  # noqa: B017,PT011
        await nats.connect(nats_url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False,
                           **connect_options(name="ops", seed=stranger, tls=pki().tls("ops")))
    with pytest.raises(Exception):  # noqa: B017,PT011 - plaintext to a TLS-only server
        await nats.connect(nats_url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False,
                           nkeys_seed_str=nats_seed("ops"))
    nc = await connect_nats(nats_url)
    await nc.close()


def test_every_account_is_derived_and_none_can_publish_everything() -> None:
    for name, access in NATS_ACCOUNTS.items():
        granted = permissions(name, access)
        publish, subscribe = granted["publish"]["allow"], granted["subscribe"]["allow"]
        assert ">" not in publish and "*" not in publish and ">" not in subscribe, name
        assert not any(subject.startswith(("$JS.API.STREAM.DELETE", "$JS.API.STREAM.PURGE", "$JS.API.STREAM.MSG"))
                       for subject in publish), name
        for stream in access.owns:
            assert set(stream.subjects) <= set(publish)
        # A service publishes only under its own name (the operator publishes no events at all).
        events = [s for s in publish if not s.startswith("$")]
        assert all(s.startswith(f"{name}.") for s in events), (name, events)
    assert NATS_ACCOUNTS["ops"].owns == ()


async def test_a_server_that_reads_the_public_keys_from_its_environment_signs_each_process_in(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Kubernetes form of the configuration: the same text in every cluster, each nkey a
    variable (``nkey: $LEDGER_NKEY``) the server fills from its environment."""
    users = {}
    for name, access in NATS_ACCOUNTS.items():
        variable = NkeyVariable(f"{name.upper()}_NKEY")
        monkeypatch.setenv(variable.name, public_key(nats_seed(name)))
        users[name] = (variable, access)
    assert "$LEDGER_NKEY" in accounts_config(users) and '"$LEDGER_NKEY"' not in accounts_config(users)
    tls = IdentityFiles(pki().tls_dir("nats"))
    server = start_on_free_port(lambda port: Nats(tmp_path / "nats", port, tls=tls, users=users))
    try:
        ledger, ledger_errors = await _errors_of(lambda cb: nats.connect(
            server.url, error_cb=cb, **connect_options(name="ledger", seed=nats_seed("ledger"), tls=pki().tls("ledger"))))
        try:
            await ledger.publish("ledger.transfer.booked", b"{}")
            await ledger.publish("identity.member.unfrozen", FORGED)
            await ledger.flush()
            await asyncio.sleep(0.3)
            refused = [e for e in ledger_errors if "permissions violation" in e.lower()]
            assert len(refused) == 1 and "identity.member.unfrozen" in refused[0], ledger_errors
        finally:
            await ledger.close()
    finally:
        server.stop()


def test_a_variable_names_an_environment_variable_and_nothing_else() -> None:
    with pytest.raises(ValueError):
        NkeyVariable("LEDGER_NKEY }\nauthorization {")
    with pytest.raises(ValueError):
        NkeyVariable("ledger")
