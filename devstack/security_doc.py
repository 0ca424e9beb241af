"""``python -m devstack.security_doc``: write the tables of docs/security.md from their sources.

The allow-list comes from the protos' ``(onecard.mesh.v1.access)`` options, the NATS accounts from
services.nats_accounts; the doc holds each between ``<!-- name:begin -->`` and ``<!-- name:end -->``
markers, and tests/trust/test_security_doc.py fails when a table there differs from its source.
"""
from __future__ import annotations

import re
import sys
from collections.abc import Iterator

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import ServiceDescriptor

from devstack.config import REPO_ROOT
from onecard.codegen.v1 import codegen_pb2
from onecard.devicehub.v1 import devicehub_pb2
from onecard.identity.v1 import identity_pb2
from onecard.ledger.v1 import ledger_pb2
from onecard.ops.v1 import ops_pb2
from onecard.policy.v1 import policy_pb2
from onecard.webhooks.v1 import webhooks_pb2
from runtime.access import allow_list_table
from runtime.nats_access import accounts_table
from services.nats_accounts import NATS_ACCOUNTS

DOC = REPO_ROOT / "docs" / "security.md"
PROTO_MODULES = (identity_pb2, codegen_pb2, ledger_pb2, policy_pb2, devicehub_pb2, webhooks_pb2, ops_pb2)


def onecard_services() -> Iterator[ServiceDescriptor]:
    """Every service the onecard protos declare, in file order."""
    pool = descriptor_pool.Default()
    for module in PROTO_MODULES:
        yield from pool.FindFileByName(module.DESCRIPTOR.name).services_by_name.values()


def tables() -> dict[str, str]:
    return {"allow-list": allow_list_table(onecard_services()), "nats-accounts": accounts_table(NATS_ACCOUNTS)}


def render(text: str) -> str:
    """``text`` with each marked table replaced by its source's."""
    for name, table in tables().items():
        pattern = re.compile(rf"(<!-- {name}:begin -->\n)(?:.*?\n)?(<!-- {name}:end -->)", re.DOTALL)
        if not pattern.search(text):
            raise ValueError(f"{DOC}: no <!-- {name}:begin --> ... <!-- {name}:end --> markers")
        text = pattern.sub(lambda m, table=table: m.group(1) + table + "\n" + m.group(2), text)
    return text


def main() -> int:
    DOC.write_text(render(DOC.read_text()))
    print(f"wrote {DOC.relative_to(REPO_ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
