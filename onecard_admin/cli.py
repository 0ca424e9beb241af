"""``onecard-admin <command>``: parse, call the mesh as the operator, print a table or ``--json``.

Exit codes: 0 done; 1 the answer is bad news (a service down, a ledger out of balance); 2 the
command failed (refused, unreachable, bad setting), with one line on stderr and no stack trace.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections.abc import Sequence
from typing import Any, TextIO

import grpc
from pydantic import ValidationError

from onecard.codegen.v1 import codegen_pb2, codegen_pb2_grpc
from onecard.devicehub.v1 import devicehub_pb2, devicehub_pb2_grpc
from onecard.identity.v1 import identity_pb2, identity_pb2_grpc
from onecard.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from onecard.policy.v1 import policy_pb2, policy_pb2_grpc
from onecard_admin import migrations as migrations_mod
from onecard_admin import status as status_mod
from onecard_admin.mesh import AdminSetupError, Mesh, paged
from onecard_admin.output import emit
from onecard_admin.settings import SERVICE_NAMES, AdminSettings
from runtime.grpc_client import error_info
from runtime.logs import drop_known_noise

EXIT_OK, EXIT_BAD_NEWS, EXIT_FAILED = 0, 1, 2
TENANT_KINDS = {"enterprise": identity_pb2.TENANT_KIND_ENTERPRISE, "university": identity_pb2.TENANT_KIND_UNIVERSITY,
                "k12": identity_pb2.TENANT_KIND_K12}
DEFAULT_CLIENT_SCOPES = ("clients:admin",)
# A ceiling on what one listing fetches, so a huge platform cannot make the tool run for ever.
MAX_LIST_ROWS = 10_000
LIST_PAGE_SIZE = 500


class CommandError(RuntimeError):
    pass


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="onecard-admin", description="Operate a onecard mesh as the operator (ops).")
    root.add_argument("--json", action="store_true", help="print JSON instead of a table")
    commands = root.add_subparsers(dest="command", required=True)
    commands.add_parser("status", help="each service's health, version, migrations and outbox; JetStream "
                                       "streams and consumer lag; open alarms")

    tenants = commands.add_parser("tenants", help="create or list tenants").add_subparsers(dest="action", required=True)
    create = tenants.add_parser("create", help="create a tenant (idempotent with --tenant-id)")
    create.add_argument("--name", required=True)
    create.add_argument("--kind", choices=sorted(TENANT_KINDS), default="university")
    create.add_argument("--time-zone", default="Asia/Shanghai")
    create.add_argument("--currency", default="CNY")
    create.add_argument("--tenant-id", help="the tenant's id (a UUID); repeating the command with it is safe")
    tenants.add_parser("list", help="every tenant")

    clients = commands.add_parser("clients", help="API clients").add_subparsers(dest="action", required=True)
    client = clients.add_parser("create", help="a tenant's admin client; its secret is shown once")
    client.add_argument("--tenant", required=True)
    client.add_argument("--name", default="admin")
    client.add_argument("--scope", action="append", dest="scopes",
                        help=f"a scope to hold and grant (repeat it); default {', '.join(DEFAULT_CLIENT_SCOPES)}")
    client.add_argument("--idempotency-key",
                        help="retry an earlier run with the key it printed: the same client, its secret not "
                             "shown again; default a new key per run")

    trial = commands.add_parser("trial-balance", help="a tenant's trial balance (postings sum to zero)")
    trial.add_argument("--tenant", required=True)
    alarms = commands.add_parser("alarms", help="a tenant's open and acknowledged device alarms")
    alarms.add_argument("--tenant", required=True)
    keys = commands.add_parser("keys", help="signing keys").add_subparsers(dest="action", required=True)
    rotate = keys.add_parser("rotate", help="rotate a tenant's code issuer key (codegen, the default) or policy "
                                            "bundle signing key (policy); the old one keeps verifying")
    rotate.add_argument("which", nargs="?", choices=("codegen", "policy"), default="codegen",
                        help="codegen: the issuer key of e-codes; policy: the key that signs rule set bundles")
    rotate.add_argument("--tenant", required=True)
    rotate.add_argument("--idempotency-key",
                        help="retry an earlier run with the key it printed (one rotation however often it is "
                             "repeated); default a new key per run")
    rollouts = commands.add_parser("rollouts", help="a tenant's firmware and config rollouts")
    rollouts.add_argument("--tenant", required=True)
    migrate = commands.add_parser(
        "migrate", help="apply each service's pending migrations as its own database role "
                        "(ONECARD_<SERVICE>_DATABASE_URL); no mesh certificate needed")
    migrate.add_argument("--service", action="append", dest="services", choices=SERVICE_NAMES,
                         help="only this service (repeat it); default every service")
    migrate.add_argument("--dry-run", action="store_true", help="list what is pending and apply nothing")
    return root


async def _migrate(args: argparse.Namespace, out: TextIO) -> int:
    results = await migrations_mod.migrate_all(args.services, dry_run=args.dry_run)
    rows = [{"service": r.service, "schema": r.schema, "already": r.already, "applied": r.applied,
             "pending": r.pending} for r in results]
    if not args.json:
        rows = [{**row, "applied": len(row["applied"]), "pending": " ".join(row["pending"]) or None} for row in rows]
    emit(out, as_json=args.json, extra={"dry_run": args.dry_run},
         sections={"migrations": (rows, ("service", "schema", "already", "applied", "pending"))})
    return EXIT_BAD_NEWS if any(r.pending for r in results) else EXIT_OK


def _service_cells(row: dict[str, Any]) -> dict[str, Any]:
    """A service's JSON row as the table shows it: migrations as applied/known, ages rounded."""
    known = row["migrations_known"]
    cells = dict(row)
    cells["migrations"] = f"{row['migrations_applied']}/{known}" if known is not None else None
    cells["pending"] = len(row["migrations_pending"]) if row["migrations_pending"] is not None else None
    age = row["outbox_oldest_age_s"]
    cells["outbox"] = row["outbox_unpublished"]
    cells["oldest_s"] = f"{age:.1f}" if age else (None if age is None else "0")
    return cells


SERVICE_COLUMNS = ("service", "target", "health", "version", "migrations", "pending", "outbox", "oldest_s", "detail")


async def _status(mesh: Mesh, args: argparse.Namespace, out: TextIO) -> int:
    report = await status_mod.collect(mesh.settings, mesh)
    doc = report.as_dict()
    problems = [f"{row.service}: {problem}" for row in report.services for problem in row.problems]
    if report.nats_error:
        problems.append(f"nats: {report.nats_error}")
    extra = {"nats": report.nats_error or "ok",
             "healthy": report.healthy if args.json else ("yes" if report.healthy else "no"),
             "problems": problems if args.json else "; ".join(problems) or "none",
             "open_alarms": sum(row.open for row in report.alarms) if report.alarms is not None else None}
    if report.alarms_error:
        extra["alarms_error"] = report.alarms_error
    services = doc["services"] if args.json else [_service_cells(row) for row in doc["services"]]
    emit(out, as_json=args.json, extra=extra, sections={
        "services": (services, SERVICE_COLUMNS),
        "streams": (doc["streams"], ("stream", "messages", "last_seq")),
        "consumers": (doc["consumers"], ("stream", "consumer", "pending", "ack_pending", "lag")),
        "alarms": (doc["alarms"], ("tenant_id", "tenant", "open")),
    })
    return EXIT_OK if report.healthy else EXIT_BAD_NEWS


def _tenant_row(tenant: identity_pb2.Tenant) -> dict[str, Any]:
    return {"tenant_id": tenant.tenant_id, "name": tenant.name,
            "kind": identity_pb2.TenantKind.Name(tenant.kind).removeprefix("TENANT_KIND_").lower(),
            "time_zone": tenant.time_zone, "currency": tenant.currency,
            "created_at": tenant.created_at.ToDatetime().isoformat() + "Z" if tenant.HasField("created_at") else ""}


TENANT_COLUMNS = ("tenant_id", "name", "kind", "time_zone", "currency", "created_at")


async def _tenants(mesh: Mesh, args: argparse.Namespace, out: TextIO) -> int:
    stub = identity_pb2_grpc.IdentityServiceStub(mesh.channel("identity"))
    timeout = mesh.settings.admin_timeout_s
    if args.action == "create":
        tenant_id = args.tenant_id or str(uuid.uuid4())
        answer = await stub.CreateTenant(identity_pb2.CreateTenantRequest(
            name=args.name, kind=TENANT_KINDS[args.kind], time_zone=args.time_zone, currency=args.currency,
            tenant_id=tenant_id), timeout=timeout)
        emit(out, as_json=args.json, sections={"tenants": ([_tenant_row(answer.tenant)], TENANT_COLUMNS)})
        return EXIT_OK
    tenants = await paged(lambda token: stub.ListTenants(identity_pb2.ListTenantsRequest(
        page_size=LIST_PAGE_SIZE, page_token=token), timeout=timeout), "tenants", limit=MAX_LIST_ROWS)
    emit(out, as_json=args.json, sections={"tenants": ([_tenant_row(t) for t in tenants], TENANT_COLUMNS)})
    return EXIT_OK


async def _clients(mesh: Mesh, args: argparse.Namespace, out: TextIO) -> int:
    stub = identity_pb2_grpc.IdentityServiceStub(mesh.channel("identity"))
    scopes = list(dict.fromkeys(args.scopes or DEFAULT_CLIENT_SCOPES))
    key = _idempotency_key(args)
    answer = await stub.CreateApiClient(identity_pb2.CreateApiClientRequest(
        name=args.name, scopes=scopes, grants=[identity_pb2.TenantGrant(tenant_id=args.tenant, scopes=scopes)],
        idempotency_key=key), timeout=mesh.settings.admin_timeout_s)
    row = {"tenant_id": args.tenant, "client_id": answer.client.client_id, "client_secret": answer.client_secret,
           "scopes": " ".join(scopes)}
    emit(out, as_json=args.json, extra={"idempotency_key": key, "secret_already_shown": answer.secret_already_shown},
         sections={"clients": ([row], ("tenant_id", "client_id", "client_secret", "scopes"))})
    if not args.json:
        out.write("The secret was shown by the first run under this key and cannot be read again (if it is lost, "
                  "revoke the client and make another).\n" if answer.secret_already_shown else
                  "The secret is shown once and cannot be read again; keep it now.\n")
    return EXIT_OK


async def _trial_balance(mesh: Mesh, args: argparse.Namespace, out: TextIO) -> int:
    stub = ledger_pb2_grpc.LedgerServiceStub(mesh.channel("ledger"))
    answer = await stub.TrialBalance(ledger_pb2.TrialBalanceRequest(tenant_id=args.tenant),
                                     timeout=mesh.settings.admin_timeout_s)
    rows = [{"purse_kind": ledger_pb2.PurseKind.Name(t.purse_kind).removeprefix("PURSE_KIND_").lower(),
             "accounts": t.accounts, "posted_fen": t.posted_fen, "pending_fen": t.pending_fen} for t in answer.totals]
    emit(out, as_json=args.json,
         extra={"balanced": answer.balanced, "postings_sum_fen": answer.postings_sum_fen,
                "balances_sum_fen": answer.balances_sum_fen},
         sections={"totals": (rows, ("purse_kind", "accounts", "posted_fen", "pending_fen"))})
    return EXIT_OK if answer.balanced else EXIT_BAD_NEWS


async def _alarms(mesh: Mesh, args: argparse.Namespace, out: TextIO) -> int:
    stub = devicehub_pb2_grpc.DeviceAdminServiceStub(mesh.channel("devicehub"))
    alarms = await paged(lambda token: stub.ListAlarms(devicehub_pb2.ListAlarmsRequest(
        tenant_id=args.tenant, page_token=token), timeout=mesh.settings.admin_timeout_s), "alarms", limit=MAX_LIST_ROWS)
    rows = [{"alarm_id": a.alarm_id, "device_id": a.device_id,
             "kind": devicehub_pb2.AlarmKind.Name(a.kind).removeprefix("ALARM_KIND_").lower(),
             "severity": devicehub_pb2.AlarmSeverity.Name(a.severity).removeprefix("ALARM_SEVERITY_").lower(),
             "state": devicehub_pb2.AlarmState.Name(a.state).removeprefix("ALARM_STATE_").lower(),
             "count": a.count, "detail": a.detail} for a in alarms]
    emit(out, as_json=args.json, sections={"alarms": (rows, ("alarm_id", "device_id", "kind", "severity", "state",
                                                             "count", "detail"))})
    return EXIT_OK


def _key_row(role: str, key: codegen_pb2.TrustedKey) -> dict[str, Any]:
    return {"role": role, "key_id": key.key_id,
            "status": codegen_pb2.IssuerKeyStatus.Name(key.status).removeprefix("ISSUER_KEY_STATUS_").lower(),
            "version": key.version}


def _idempotency_key(args: argparse.Namespace) -> str:
    """The key the operator gave to retry a run, or a new one (printed, so the run can be retried)."""
    return args.idempotency_key or f"onecard-admin-{uuid.uuid4()}"


def _bundle_key_row(role: str, key: policy_pb2.BundleKey) -> dict[str, Any]:
    return {"role": role, "key_id": key.key_id, "status": "signing" if key.signing else "verifying",
            "created_at": key.created_at.ToDatetime().isoformat() + "Z" if key.HasField("created_at") else ""}


async def _policy_keys(mesh: Mesh, args: argparse.Namespace, out: TextIO) -> int:
    stub = policy_pb2_grpc.PolicyServiceStub(mesh.channel("policy"))
    key = _idempotency_key(args)
    answer = await stub.RotateBundleKey(policy_pb2.RotateBundleKeyRequest(tenant_id=args.tenant, idempotency_key=key),
                                        timeout=mesh.settings.admin_timeout_s)
    rows = [_bundle_key_row("signing", answer.signing_key)]
    if answer.HasField("previous_key"):
        rows.append(_bundle_key_row("previous", answer.previous_key))
    emit(out, as_json=args.json, extra={"idempotency_key": key, "replayed": answer.replayed},
         sections={"keys": (rows, ("role", "key_id", "status", "created_at"))})
    return EXIT_OK


async def _keys(mesh: Mesh, args: argparse.Namespace, out: TextIO) -> int:
    if args.which == "policy":
        return await _policy_keys(mesh, args, out)
    stub = codegen_pb2_grpc.CodegenServiceStub(mesh.channel("codegen"))
    key = _idempotency_key(args)
    answer = await stub.RotateIssuerKey(codegen_pb2.RotateIssuerKeyRequest(tenant_id=args.tenant, idempotency_key=key),
                                        timeout=mesh.settings.admin_timeout_s)
    rows = [_key_row("signing", answer.signing_key)]
    if answer.HasField("previous_key"):
        rows.append(_key_row("previous", answer.previous_key))
    emit(out, as_json=args.json, extra={"trust_list_version": answer.trust_list_version, "idempotency_key": key,
                                        "replayed": answer.replayed},
         sections={"keys": (rows, ("role", "key_id", "status", "version"))})
    return EXIT_OK


async def _rollouts(mesh: Mesh, args: argparse.Namespace, out: TextIO) -> int:
    stub = devicehub_pb2_grpc.DeviceAdminServiceStub(mesh.channel("devicehub"))
    rollouts = await paged(lambda token: stub.ListRollouts(devicehub_pb2.ListRolloutsRequest(
        tenant_id=args.tenant, page_token=token), timeout=mesh.settings.admin_timeout_s), "rollouts",
        limit=MAX_LIST_ROWS)
    rows = [{"rollout_id": r.rollout_id,
             "target": devicehub_pb2.RolloutTarget.Name(r.target).removeprefix("ROLLOUT_TARGET_").lower(),
             "version": r.version,
             "state": devicehub_pb2.RolloutState.Name(r.state).removeprefix("ROLLOUT_STATE_").lower(),
             "stage": r.current_stage, "stages": len(r.stage_sizes),
             "devices": len(r.devices), "detail": r.detail} for r in rollouts]
    emit(out, as_json=args.json, sections={"rollouts": (rows, ("rollout_id", "target", "version", "state", "stage",
                                                               "stages", "devices", "detail"))})
    return EXIT_OK


COMMANDS = {"status": _status, "tenants": _tenants, "clients": _clients, "trial-balance": _trial_balance,
            "alarms": _alarms, "keys": _keys, "rollouts": _rollouts}


async def run(argv: Sequence[str], *, settings: AdminSettings | None = None, out: TextIO | None = None,
              err: TextIO | None = None) -> int:
    """One command; answers its exit code. Tests call this with their own settings."""
    out, err = out or sys.stdout, err or sys.stderr
    args = parser().parse_args(list(argv))
    if args.command == "migrate":
        try:
            return await _migrate(args, out)
        except migrations_mod.MigrateSetupError as exc:
            err.write(f"onecard-admin: migrate: {exc}\n")
            return EXIT_FAILED
    try:
        settings = settings or AdminSettings()
        mesh = Mesh(settings)
    except (ValidationError, AdminSetupError) as exc:
        errors = exc.errors() if isinstance(exc, ValidationError) else None
        message = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in errors) if errors else str(exc)
        err.write(f"onecard-admin: {message}\n")
        return EXIT_FAILED
    try:
        return await COMMANDS[args.command](mesh, args, out)
    except grpc.aio.AioRpcError as exc:
        reason, _ = error_info(exc)
        err.write(f"onecard-admin: {args.command}: {exc.code().name}"
                  f"{f' {reason}' if reason else ''}: {exc.details() or ''}\n")
        return EXIT_FAILED
    finally:
        await mesh.close()


def main(argv: Sequence[str] | None = None) -> None:
    drop_known_noise()
    sys.exit(asyncio.run(run(sys.argv[1:] if argv is None else argv)))
