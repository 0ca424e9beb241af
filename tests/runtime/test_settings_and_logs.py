import io
import json
import subprocess
import sys

import pytest
import structlog

from runtime.logs import configure_logging, get_logger
from runtime.settings import MissingSettingError, ServiceSettings, load_settings


def test_a_missing_required_setting_stops_with_its_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONECARD_DATABASE_URL", raising=False)
    monkeypatch.setenv("ONECARD_NATS_URL", "nats://127.0.0.1:4222")
    with pytest.raises(MissingSettingError) as caught:
        load_settings(ServiceSettings)
    assert "ONECARD_DATABASE_URL" in str(caught.value)
    assert "ONECARD_NATS_URL" not in str(caught.value)


def test_a_malformed_setting_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONECARD_DATABASE_URL", "postgresql://x/y")
    monkeypatch.setenv("ONECARD_NATS_URL", "nats://127.0.0.1:4222")
    monkeypatch.setenv("ONECARD_GRPC_PORT", "not-a-port")
    with pytest.raises(MissingSettingError, match="bad setting ONECARD_GRPC_PORT"):
        load_settings(ServiceSettings)


def test_a_service_refuses_to_start_without_tls_unless_told_it_is_insecure_development(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONECARD_DATABASE_URL", "postgresql://x/y")
    monkeypatch.setenv("ONECARD_NATS_URL", "nats://127.0.0.1:4222")
    monkeypatch.delenv("ONECARD_TLS_DIR", raising=False)
    monkeypatch.delenv("ONECARD_INSECURE_DEVELOPMENT", raising=False)
    with pytest.raises(MissingSettingError, match="missing required setting ONECARD_TLS_DIR"):
        load_settings(ServiceSettings)
    monkeypatch.setenv("ONECARD_INSECURE_DEVELOPMENT", "1")
    assert load_settings(ServiceSettings).insecure_development


def test_a_service_process_without_settings_exits_naming_them() -> None:
    env = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c",
                             "from runtime.settings import *; load_settings(ServiceSettings)"],
                            env=env, capture_output=True, text=True, cwd=sys.path[0] or ".")
    assert result.returncode != 0
    assert "missing required setting ONECARD_DATABASE_URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_logs_are_json_with_request_id_and_never_carry_secrets() -> None:
    out = io.StringIO()
    configure_logging(service="logtest", level="info", stream=out)
    try:
        structlog.contextvars.bind_contextvars(request_id="req-123")
        get_logger().info(
            "client authenticated",
            client_secret="s3cr3t-value",
            access_token="eyJhbGciOi",
            code="OC1:ABCDEF",
            dsn="postgresql://app:hunter2@db:5432/onecard",
            detail="connecting to postgresql://app:hunter2@db:5432/onecard",
            member_id="m-1",
        )
        line = json.loads(out.getvalue().strip().splitlines()[-1])
    finally:
        structlog.contextvars.clear_contextvars()
        configure_logging(service="tests", level="warning")
    assert line["request_id"] == "req-123"
    assert line["service"] == "logtest"
    assert line["member_id"] == "m-1"
    text = json.dumps(line)
    for secret in ("s3cr3t-value", "eyJhbGciOi", "OC1:ABCDEF", "hunter2"):
        assert secret not in text


@pytest.mark.parametrize(("module", "cls", "variable"), [
    ("services.codegen.settings", "CodegenSettings", "ONECARD_CODEGEN_MASTER_KEY"),
    ("services.policy.settings", "PolicySettings", "ONECARD_POLICY_MASTER_KEY"),
    ("services.webhooks.settings", "WebhooksSettings", "ONECARD_WEBHOOKS_MASTER_KEY"),
])
def test_a_master_key_must_decode_and_is_never_shown(monkeypatch: pytest.MonkeyPatch, module: str, cls: str,
                                                     variable: str) -> None:
    """Each service that seals secrets at rest reads its master key through one setting type: hex
    or base64 of 32 bytes, refused at start otherwise (named, its value not echoed), and kept out
    of the settings' repr."""
    import base64
    import importlib
    settings_cls = getattr(importlib.import_module(module), cls)
    monkeypatch.setenv("ONECARD_DATABASE_URL", "postgresql://x/y")
    monkeypatch.setenv("ONECARD_NATS_URL", "nats://127.0.0.1:4222")
    monkeypatch.setenv("ONECARD_INSECURE_DEVELOPMENT", "1")
    for name in ("IDENTITY", "LEDGER"):
        monkeypatch.setenv(f"ONECARD_{name}_TARGET", "127.0.0.1:1")
    key = bytes(range(32))
    for text in (key.hex(), base64.b64encode(key).decode(), base64.urlsafe_b64encode(key).decode().rstrip("=")):
        monkeypatch.setenv(variable, text)
        settings = load_settings(settings_cls)
        assert settings.master_key == key
        assert key.hex() not in repr(settings) and text not in repr(settings)
    bad = "ab" * 31
    monkeypatch.setenv(variable, bad)
    with pytest.raises(MissingSettingError, match=f"bad setting {variable}") as caught:
        load_settings(settings_cls)
    assert bad not in str(caught.value)


def test_a_command_line_tool_drops_the_known_asyncio_noise_and_nothing_else(caplog: pytest.LogCaptureFixture) -> None:
    """onecard-admin prints tables, not logs: the TLS-close line asyncio warns at every NATS
    disconnect must not reach its stderr through Python's last-resort handler; other warnings do."""
    import logging

    from runtime.logs import drop_known_noise
    drop_known_noise()
    drop_known_noise()  # twice: one filter
    logger = logging.getLogger("asyncio")
    assert len([f for f in logger.filters if getattr(f, "__name__", "") == "_drop_known_noise"]) == 1
    logger.warning("returning true from eof_received() has no effect when using ssl")
    logger.warning("Task was destroyed but it is pending!")
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == ["Task was destroyed but it is pending!"]
