"""OpsService, which every server carries beside its own API: what the operator needs to know of a
process that health cannot say (protos/onecard/ops/v1/ops.proto). Its allow-list names ``ops``
alone; it reads the service's own schema with the service's own pool and writes nothing."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import asyncpg
import grpc

from onecard.ops.v1 import ops_pb2, ops_pb2_grpc
from runtime import VERSION
from runtime.db import migration_status

SERVICE_NAME = ops_pb2.DESCRIPTOR.services_by_name["OpsService"].full_name

# A backlog is counted up to this many rows (the answer says "at least" by being this number), so a
# huge one cannot make the call slow.
MAX_OUTBOX_COUNTED = 100_000
# Both walk the outbox's partial index of unpublished rows (by id, so the first is the oldest).
_OUTBOX_BACKLOG_SQL = (
    "SELECT (SELECT count(*) FROM (SELECT 1 FROM outbox WHERE published_at IS NULL LIMIT $1) AS waiting)"
    " AS unpublished,"
    " coalesce((SELECT (extract(epoch FROM clock_timestamp() - created_at) * 1000)::bigint FROM outbox"
    " WHERE published_at IS NULL ORDER BY id LIMIT 1), 0) AS oldest_ms")


class OpsServicer(ops_pb2_grpc.OpsServiceServicer):
    def __init__(self, *, service: str, schema: str, migrations_dir: Path, pool: Callable[[], asyncpg.Pool]):
        self._service = service
        self._schema = schema
        self._migrations_dir = migrations_dir
        # A getter: the pool exists only once the process reached PostgreSQL (UNAVAILABLE before).
        self._pool = pool

    async def GetServiceInfo(self, request: ops_pb2.GetServiceInfoRequest,
                             context: grpc.aio.ServicerContext) -> ops_pb2.GetServiceInfoResponse:
        async with self._pool().acquire() as conn:
            migrations = await migration_status(conn, schema=self._schema, migrations_dir=self._migrations_dir)
            backlog = await conn.fetchrow(_OUTBOX_BACKLOG_SQL, MAX_OUTBOX_COUNTED)
        return ops_pb2.GetServiceInfoResponse(
            service=self._service, version=VERSION, schema=self._schema,
            migrations=ops_pb2.MigrationState(applied=len(migrations.applied), known=migrations.known,
                                              pending=migrations.pending, unknown=migrations.unknown),
            outbox=ops_pb2.OutboxState(unpublished=backlog["unpublished"],
                                       oldest_unpublished_age_ms=max(0, backlog["oldest_ms"])))


def add_to_server(server: grpc.aio.Server, servicer: OpsServicer) -> None:
    ops_pb2_grpc.add_OpsServiceServicer_to_server(servicer, server)
