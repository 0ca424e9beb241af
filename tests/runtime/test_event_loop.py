"""ONECARD_EVENT_LOOP: services run on uvloop unless told asyncio; anything else stops them."""

from __future__ import annotations

import asyncio

import pytest
import uvloop
from pydantic import ValidationError

from runtime.cli import event_loop_factory
from services.ledger.settings import LedgerSettings
from tests.mesh import service_values


def _settings(**overrides: object) -> LedgerSettings:
    return LedgerSettings(nats_url="nats://127.0.0.1:4222", **service_values("ledger", "postgresql://x/y"),
                          **overrides)


def test_uvloop_is_the_default_and_asyncio_can_be_chosen() -> None:
    assert _settings().event_loop == "uvloop"
    loop = event_loop_factory(_settings().event_loop)()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    loop = event_loop_factory(_settings(event_loop="asyncio").event_loop)()
    try:
        assert isinstance(loop, asyncio.AbstractEventLoop) and not isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


def test_an_unknown_loop_is_refused() -> None:
    with pytest.raises(ValidationError):
        _settings(event_loop="trio")
