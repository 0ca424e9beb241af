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
from runtime.events import MAX_OUTBOX_COUNTED, outbox_backlog

SERVICE_NAME = ops_pb2.DESCRIPTOR.services_by_name["OpsService"].full_name

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
            unpublished, oldest_ms = await outbox_backlog(conn, limit=MAX_OUTBOX_COUNTED)
        return ops_pb2.GetServiceInfoResponse(
            service=self._service, version=VERSION, schema=self._schema,
            migrations=ops_pb2.MigrationState(applied=len(migrations.applied), known=migrations.known,
                                              pending=migrations.pending, unknown=migrations.unknown),
            outbox=ops_pb2.OutboxState(unpublished=unpublished, oldest_unpublished_age_ms=oldest_ms))


def add_to_server(server: grpc.aio.Server, servicer: OpsServicer) -> None:
    ops_pb2_grpc.add_OpsServiceServicer_to_server(servicer, server)
