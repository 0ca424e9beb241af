"""The demo campus: one university, a few thousand members, a bank partner and an admin client.

Seeding is idempotent, so every ``make run`` can call it: the tenant has a fixed id, the members are
a deterministic CSV imported through identity's own import path (an upsert by student number), and
the API clients' one-time secrets are kept in the data folder and checked against identity before
they are reused.
"""
from __future__ import annotations

import asyncio
import csv
import io
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc

from devstack.private import read_private_json, write_private_json
from onecard.identity.v1 import identity_pb2 as pb
from onecard.identity.v1 import identity_pb2_grpc
from runtime.grpc_client import open_channel
from runtime.mesh import MeshTLS

DEMO_TENANT_ID = "0c0ffee0-0000-4000-8000-000000000001"
DEMO_TENANT_NAME = "Demo University"
DEMO_TIME_ZONE = "Asia/Shanghai"
DEMO_CURRENCY = "CNY"
# Fixed so the same CSV comes out of every run, which is what makes re-importing it a no-op.
DEMO_RANDOM_SEED = 20250901
BANK_CLIENT_NAME = "Demo Bank"
ADMIN_CLIENT_NAME = "Demo University Admin"
# The bank is also the demo's mini-program backend (bindings, self-service), opens the member code page
# and receives webhooks.
BANK_SCOPES = ("members:read", "members:write", "codes:issue", "wallets:read", "wallets:topup", "payments:create",
               "webhooks:manage", "members:bind", "members:self-service", "members:code-page")
ADMIN_SCOPES = ("members:read", "members:write", "clients:admin", "codes:issue", "devices:sync", "codes:admin",
                "wallets:read", "wallets:topup", "ledger:admin", "statements:read", "policy:admin", "devices:admin",
                "data:read", "webhooks:manage")
CLIENT_ORDER = ("bank", "admin")
CALL_TIMEOUT_S = 30.0
IMPORT_POLL_S = 0.25
IMPORT_TIMEOUT_S = 600.0
SEARCH_PAGE_SIZE = 200
# Bounds the member count walk: 50k members / 200 per page, with room to spare.
MAX_SEARCH_PAGES = 1000
STAFF_SHARE = 0.06
CARD_SHARE = 0.6
FROZEN_SHARE = 0.005

# Common surnames, most frequent first, in pinyin (Wang 王, Li 李, Zhang 张 ...).
SURNAMES = (
    "Wang", "Li", "Zhang", "Liu", "Chen", "Yang", "Huang", "Zhao", "Wu", "Zhou", "Xu", "Sun", "Ma",
    "Zhu", "Hu", "Guo", "He", "Gao", "Lin", "Luo", "Zheng", "Liang", "Xie", "Song", "Tang", "Han",
    "Feng", "Deng", "Cao", "Peng", "Zeng", "Xiao", "Tian", "Dong", "Yuan", "Pan", "Yu", "Jiang",
    "Cai", "Du", "Ye", "Cheng", "Su", "Wei", "Lyu", "Ding", "Ren", "Shen", "Yao", "Lu", "Cui",
    "Zhong", "Tan", "Fan", "Jin", "Shi", "Liao", "Jia", "Xia", "Fu", "Fang", "Bai", "Zou", "Meng",
    "Xiong", "Qin", "Qiu", "Yin", "Xue", "Yan", "Duan", "Lei", "Hou", "Long", "Tao", "Gu", "Mao",
    "Hao", "Gong", "Shao", "Qian", "Dai", "Kong", "Ouyang", "Sima",
)
# Given-name syllables. None starts with a vowel, so two of them join without an apostrophe.
GIVEN_SYLLABLES = (
    "wei", "fang", "min", "jing", "li", "qiang", "lei", "jun", "yang", "yong", "yan", "jie", "tao",
    "ming", "chao", "xia", "ping", "gang", "hua", "hui", "xin", "yu", "hao", "yi", "zi", "han",
    "xuan", "ran", "tong", "ruo", "xi", "jia", "si", "hang", "yuan", "chen", "rui", "ze", "kai",
    "bo", "wen", "qing", "shu", "lan", "ting", "meng", "jian", "feng", "bin", "lin", "xiao", "zhi",
    "long", "peng", "fei", "dong", "ning", "qi", "yue", "zhen", "shan", "tian", "le", "xue", "nan",
    "shuang", "jin", "mei", "lu", "zhuo", "yao", "chun", "xiu", "ying",
)
# (group value, two-digit code used in student numbers)
DEPARTMENTS = (
    ("computer_science", 1), ("mathematics", 2), ("physics", 3), ("chemistry", 4),
    ("life_sciences", 5), ("economics", 6), ("law", 7), ("chinese_literature", 8),
    ("foreign_languages", 9), ("mechanical_engineering", 10), ("medicine", 11), ("architecture", 12),
)
GRADES = ("2022", "2023", "2024", "2025")
CLASSES_PER_GRADE = 4
CSV_COLUMNS = ("external_number", "name", "department", "grade", "class", "role", "status", "card_uid")


class SeedError(RuntimeError):
    pass


@dataclass(frozen=True)
class DemoClient:
    key: str
    name: str
    client_id: str
    client_secret: str
    scopes: tuple[str, ...]


@dataclass(frozen=True)
class SeedResult:
    tenant_id: str
    tenant_created: bool
    member_count: int
    members_imported: int
    clients: dict[str, DemoClient]
    clients_created: bool


def demo_rows(*, count: int) -> list[dict[str, str]]:
    """``count`` members, the same every time: students by grade, department and class, plus staff.

    Each row depends only on the rows before it, so a smaller demo is the start of a larger one and
    raising ONECARD_DEMO_MEMBERS later only adds members.
    """
    rng = random.Random(DEMO_RANDOM_SEED)
    # Frequent surnames come up more often, roughly as they do in a real roll (Zipf-like).
    surname_weights = [1.0 / (rank + 4) for rank in range(len(SURNAMES))]
    rows: list[dict[str, str]] = []
    sequence_by_prefix: dict[str, int] = {}
    card_uids: set[str] = set()

    def next_number(prefix: str) -> str:
        sequence_by_prefix[prefix] = sequence_by_prefix.get(prefix, 0) + 1
        return f"{prefix}{sequence_by_prefix[prefix]:04d}"

    def card_uid() -> str:
        # Mostly 4-byte UIDs (MIFARE Classic), some 7-byte ones (DESFire), as a campus really has.
        while True:
            width_bytes = 7 if rng.random() < 0.2 else 4
            uid = f"{rng.getrandbits(width_bytes * 8):0{width_bytes * 2}X}"
            if uid not in card_uids:
                card_uids.add(uid)
                return uid

    for _ in range(count):
        department, code = rng.choice(DEPARTMENTS)
        if rng.random() < STAFF_SHARE:
            number, grade, klass, role = next_number(f"T{code:02d}"), "", "", "staff"
        else:
            grade = rng.choice(GRADES)
            number, klass, role = next_number(f"{grade}{code:02d}"), str(rng.randint(1, CLASSES_PER_GRADE)), "student"
        given = "".join(rng.choice(GIVEN_SYLLABLES) for _ in range(rng.choice((1, 2, 2, 2))))
        rows.append({
            "external_number": number,
            "name": f"{rng.choices(SURNAMES, weights=surname_weights)[0]} {given.capitalize()}",
            "department": department,
            "grade": grade,
            "class": klass,
            "role": role,
            "status": "frozen" if rng.random() < FROZEN_SHARE else "active",
            "card_uid": card_uid() if rng.random() < CARD_SHARE else "",
        })
    return rows


def demo_csv(rows: list[dict[str, str]]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


class Progress(Protocol):
    """Reports the import as it goes; ``final`` marks a line to keep rather than overwrite."""

    def __call__(self, text: str, *, final: bool) -> None: ...


async def seed_demo(*, identity_target: str, tls: MeshTLS | None, credentials_path: Path, member_count: int,
                    progress: Progress) -> SeedResult:
    """Create or find the demo campus, reporting the member import through ``progress``; calls
    identity as ``tls`` names (devstack's certificate)."""
    async with open_channel(identity_target, tls=tls, server_name="identity") as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)
        try:
            tenant_created = await _ensure_tenant(stub)
            imported = await _ensure_members(stub, member_count=member_count, progress=progress)
            clients, clients_created = await _ensure_clients(stub, credentials_path=credentials_path)
            total = await count_members(stub, tenant_id=DEMO_TENANT_ID)
        except grpc.aio.AioRpcError as exc:
            raise SeedError(f"identity refused a seed call: {exc.code().name}: {exc.details()}") from exc
    return SeedResult(DEMO_TENANT_ID, tenant_created, total, imported, clients, clients_created)


async def _ensure_tenant(stub: Any) -> bool:
    try:
        await stub.GetTenant(pb.GetTenantRequest(tenant_id=DEMO_TENANT_ID), timeout=CALL_TIMEOUT_S)
        return False
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
    await stub.CreateTenant(
        pb.CreateTenantRequest(
            tenant_id=DEMO_TENANT_ID,
            name=DEMO_TENANT_NAME,
            kind=pb.TENANT_KIND_UNIVERSITY,
            time_zone=DEMO_TIME_ZONE,
            currency=DEMO_CURRENCY,
        ),
        timeout=CALL_TIMEOUT_S,
    )
    return True


async def _member_exists(stub: Any, *, external_number: str) -> bool:
    response = await stub.SearchMembers(
        pb.SearchMembersRequest(tenant_id=DEMO_TENANT_ID, query=external_number, page_size=1),
        timeout=CALL_TIMEOUT_S,
    )
    return any(m.external_number == external_number for m in response.members)


async def _ensure_members(stub: Any, *, member_count: int, progress: Progress) -> int:
    """Import the demo CSV unless its last row is already there. Answers the rows created."""
    if member_count == 0:
        return 0
    rows = demo_rows(count=member_count)
    # The import upserts in file order, so the last row present means an earlier run finished;
    # a run stopped halfway imports again and only the missing rows are created.
    if await _member_exists(stub, external_number=rows[-1]["external_number"]):
        return 0
    started = time.monotonic()
    response = await stub.StartMemberImport(
        pb.StartMemberImportRequest(tenant_id=DEMO_TENANT_ID, csv=demo_csv(rows)), timeout=CALL_TIMEOUT_S
    )
    # The field is named ``import``, a Python keyword, so protobuf exposes it only through getattr.
    job = getattr(response, "import")
    deadline = started + IMPORT_TIMEOUT_S
    while job.state == pb.IMPORT_STATE_RUNNING:
        progress(f"importing members {job.rows_done}/{job.rows_total or len(rows)}", final=False)
        if time.monotonic() > deadline:
            raise SeedError(f"member import {job.import_id} still running after {IMPORT_TIMEOUT_S:.0f}s")
        await asyncio.sleep(IMPORT_POLL_S)
        polled = await stub.GetMemberImport(
            pb.GetMemberImportRequest(tenant_id=DEMO_TENANT_ID, import_id=job.import_id), timeout=CALL_TIMEOUT_S
        )
        job = getattr(polled, "import")
    if job.state != pb.IMPORT_STATE_DONE:
        raise SeedError(f"member import failed: {job.failure or pb.ImportState.Name(job.state)}")
    elapsed_s = time.monotonic() - started
    progress(
        f"imported {job.rows_total} members in {elapsed_s:.1f}s "
        f"({job.rows_created} created, {job.rows_updated} updated, {job.rows_unchanged} unchanged, "
        f"{job.rows_failed} failed)",
        final=True,
    )
    for error in list(job.errors)[:5]:
        progress(f"  line {error.line} ({error.external_number}): {error.reason}", final=True)
    return job.rows_created


async def count_members(stub: Any, *, tenant_id: str) -> int:
    """Every member of the tenant, counted page by page (there is no count call)."""
    total, token = 0, ""
    for _ in range(MAX_SEARCH_PAGES):
        page = await stub.SearchMembers(
            pb.SearchMembersRequest(tenant_id=tenant_id, page_size=SEARCH_PAGE_SIZE, page_token=token),
            timeout=CALL_TIMEOUT_S,
        )
        total += len(page.members)
        token = page.next_page_token
        if not token:
            return total
    raise SeedError(f"more than {MAX_SEARCH_PAGES} pages of members: count stopped")


async def _authenticates(stub: Any, client: DemoClient) -> bool:
    try:
        await stub.AuthenticateClient(
            pb.AuthenticateClientRequest(
                client_id=client.client_id, client_secret=client.client_secret, tenant_id=DEMO_TENANT_ID
            ),
            timeout=CALL_TIMEOUT_S,
        )
        return True
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return False
        raise


def _stored_clients(credentials_path: Path) -> dict[str, DemoClient]:
    stored = read_private_json(credentials_path) or {}
    if stored.get("tenant_id") != DEMO_TENANT_ID:
        return {}
    clients = stored.get("clients") or {}
    # In the order they were made (the file is sorted by key), so the bank is listed first.
    return {
        key: DemoClient(key=key, name=c["name"], client_id=c["client_id"], client_secret=c["client_secret"],
                        scopes=tuple(c["scopes"]))
        for key, c in sorted(clients.items(), key=lambda item: CLIENT_ORDER.index(item[0])
                             if item[0] in CLIENT_ORDER else len(CLIENT_ORDER))
    }


async def _ensure_clients(stub: Any, *, credentials_path: Path) -> tuple[dict[str, DemoClient], bool]:
    """Reuse the stored demo clients if identity still accepts their secrets; otherwise make new ones.

    Identity shows a secret once and keeps only its hash, so the stored file is the only copy.
    When it is gone (or belongs to another database), the old demo clients can no longer be used:
    their grants are revoked so the tenant does not keep access it cannot account for.
    """
    wanted = {"bank": (BANK_CLIENT_NAME, BANK_SCOPES), "admin": (ADMIN_CLIENT_NAME, ADMIN_SCOPES)}
    assert tuple(wanted) == CLIENT_ORDER
    stored = _stored_clients(credentials_path)
    same_scopes = set(stored) == set(wanted) and all(
        set(c.scopes) == set(wanted[key][1]) for key, c in stored.items()
    )
    if same_scopes and all([await _authenticates(stub, c) for c in stored.values()]):
        return stored, False
    listed = await stub.ListApiClients(pb.ListApiClientsRequest(tenant_id=DEMO_TENANT_ID), timeout=CALL_TIMEOUT_S)
    demo_names = {name for name, _ in wanted.values()}
    for old in listed.clients:
        if old.name in demo_names:
            await stub.RevokeTenantAccess(
                pb.RevokeTenantAccessRequest(tenant_id=DEMO_TENANT_ID, client_id=old.client_id),
                timeout=CALL_TIMEOUT_S,
            )
    clients: dict[str, DemoClient] = {}
    for key, (name, scopes) in wanted.items():
        created = await stub.CreateApiClient(
            pb.CreateApiClientRequest(
                name=name, scopes=list(scopes), grants=[pb.TenantGrant(tenant_id=DEMO_TENANT_ID, scopes=list(scopes))]
            ),
            timeout=CALL_TIMEOUT_S,
        )
        clients[key] = DemoClient(key=key, name=name, client_id=created.client.client_id,
                                  client_secret=created.client_secret, scopes=scopes)
    write_private_json(credentials_path, {
        "tenant_id": DEMO_TENANT_ID,
        "clients": {
            key: {"name": c.name, "client_id": c.client_id, "client_secret": c.client_secret, "scopes": list(c.scopes)}
            for key, c in clients.items()
        },
    })
    return clients, True
