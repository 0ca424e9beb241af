"""Ports for the servers a test starts, safe when the suite runs spread over pytest-xdist workers:
free_port picks outside the kernel's ephemeral range, from this worker's own slice, never the same
port twice in a row; a server whose port was taken all the same says so (PortInUse) instead of
taking someone else's listener for its own, and start_on_free_port moves it to another port."""
from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack import servers
from devstack.servers import Nats, PortInUse, Postgres, free_port, start_on_free_port


@pytest.fixture
def listener() -> Iterator[int]:
    """A port some other program listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))
        s.listen()
        yield s.getsockname()[1]


def ephemeral_range() -> range:
    low, high = (int(part) for part in servers.EPHEMERAL_RANGE_PATH.read_text().split())
    return range(low, high + 1)


def test_free_port_stays_outside_the_kernels_ephemeral_range_and_does_not_repeat() -> None:
    if servers._pick_span() is None:
        pytest.skip("this kernel leaves no span outside its ephemeral range")
    picked = [free_port() for _ in range(200)]
    assert len(set(picked)) == len(picked)
    assert not set(picked) & set(ephemeral_range())
    assert all(port >= servers.LOWEST_PICKED_PORT for port in picked)


def test_free_port_skips_a_port_in_use(listener: int) -> None:
    picker = servers._PortPicker()
    picker.ports = range(listener, listener + 2)
    assert picker.pick("127.0.0.1") == listener + 1


@pytest.mark.parametrize("count", [2, 3, 8])
def test_each_xdist_worker_has_its_own_slice_of_ports(count: int, monkeypatch: pytest.MonkeyPatch) -> None:
    span = range(20_000, 32_768)
    slices = []
    for index in range(count):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{index}")
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", str(count))
        slices.append(servers._worker_slice(span))
    assert all(len(s) >= len(span) // count for s in slices)
    for index, one in enumerate(slices):
        for other in slices[index + 1:]:
            assert not set(one) & set(other)


def test_outside_xdist_the_whole_span_is_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    assert servers._worker_slice(range(20_000, 32_768)) == range(20_000, 32_768)


def test_nats_on_a_taken_port_says_so_and_does_not_pass_the_other_listener_off_as_itself(
        listener: int, tmp_path: Path) -> None:
    server = Nats(tmp_path / "nats", listener)
    try:
        with pytest.raises(PortInUse):
            server.start(timeout_s=30)
    finally:
        server.stop()


def test_postgres_on_a_taken_port_says_so(listener: int, tmp_path: Path) -> None:
    server = Postgres(tmp_path / "pg", listener, fsync=False, password="a-password")
    try:
        with pytest.raises(PortInUse):
            server.start(timeout_s=60)
    finally:
        server.stop()


def test_start_on_free_port_moves_a_server_whose_port_was_taken(listener: int, tmp_path: Path) -> None:
    ports: list[int] = []

    def make(port: int) -> Nats:
        # The first pick loses its port to another program before the server binds it.
        ports.append(listener if not ports else port)
        return Nats(tmp_path / "nats", ports[-1], tls=None)

    server = start_on_free_port(make)
    try:
        assert ports[0] == listener and len(ports) == 2
        assert server.port == ports[1] != listener
        assert server.process is not None and server.process.poll() is None
    finally:
        server.stop()
