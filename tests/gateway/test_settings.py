"""Gateway settings: required ones stop the process with a message naming them."""
from __future__ import annotations

import pytest

from gateway.settings import GatewaySettings
from runtime.settings import MissingSettingError, load_settings
from tests.mesh import service_values


def test_missing_settings_are_named(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("ONECARD_IDENTITY_TARGET", raising=False)
    monkeypatch.delenv("ONECARD_TOKEN_SECRET", raising=False)
    monkeypatch.delenv("ONECARD_CODEGEN_TARGET", raising=False)
    with pytest.raises(MissingSettingError) as caught:
        load_settings(GatewaySettings)
    err = str(caught.value)
    assert "ONECARD_IDENTITY_TARGET" in err and "ONECARD_TOKEN_SECRET" in err
    assert "ONECARD_CODEGEN_TARGET" in err


def test_a_short_token_secret_is_refused(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ONECARD_IDENTITY_TARGET", "127.0.0.1:50051")
    monkeypatch.setenv("ONECARD_CODEGEN_TARGET", "127.0.0.1:50052")
    monkeypatch.setenv("ONECARD_TOKEN_SECRET", "too-short")
    with pytest.raises(MissingSettingError) as caught:
        load_settings(GatewaySettings)
    err = str(caught.value)
    assert "ONECARD_TOKEN_SECRET" in err and "too-short" not in err


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONECARD_IDENTITY_TARGET", "10.0.0.5:50051")
    monkeypatch.setenv("ONECARD_CODEGEN_TARGET", "10.0.0.6:50052")
    monkeypatch.setenv("ONECARD_TOKEN_SECRET", "s" * 32)
    monkeypatch.setenv("ONECARD_HTTP_PORT", "9090")
    monkeypatch.setenv("ONECARD_RATE_LIMIT_PER_S", "5")
    monkeypatch.setenv("ONECARD_TLS_DIR", str(service_values("gateway")["tls_dir"]))
    settings = load_settings(GatewaySettings)
    assert settings.identity_target == "10.0.0.5:50051"
    assert settings.codegen_target == "10.0.0.6:50052"
    assert settings.http_port == 9090
    assert settings.rate_limit_per_s == 5.0
    assert settings.token_ttl_s == 900
    # The secret never shows in a repr (and so in no log of the settings).
    assert "s" * 32 not in repr(settings)
