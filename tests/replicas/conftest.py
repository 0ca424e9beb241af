"""``replica_stack(replicas)``: the mesh as real processes, ``replicas`` of each service behind one
multi-address target (tests.replicas.stack), on a database and a NATS of its own; stopped, every
process, at the end of the test."""
from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from devstack.servers import Postgres
from tests.replicas.stack import ReplicaStack

StartStack = Callable[[int], Awaitable[ReplicaStack]]
_stacks = itertools.count(1)


@pytest.fixture
async def replica_stack(postgres: Postgres, tmp_path: Path) -> AsyncIterator[StartStack]:
    started: list[ReplicaStack] = []

    async def start(replicas: int) -> ReplicaStack:
        number = next(_stacks)
        stack = ReplicaStack(replicas=replicas, root=tmp_path / f"stack-{number}", postgres=postgres)
        started.append(stack)
        await stack.start(database=f"r{os.getpid()}_{number}")
        return stack

    yield start
    for stack in reversed(started):
        await stack.stop()
