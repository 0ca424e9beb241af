"""The copy-paste tour `make run` prints: token, create a member, search, freeze, directory feed,
then the bank's wallet calls: a top-up, the member's balances and "did this pay?", an app payment,
and, as the admin client, the device fleet: terminals, the dining index and alarms.

Plain curl and python3, no jq, with the real address, tenant and credentials filled in. The same
lines are written to ``.data/walkthrough.sh`` so they can be run as a script, and the smoke test
does exactly these calls.
"""
from __future__ import annotations

import shlex

from devstack.seed import DemoClient

# The gateway's paths, relative to the base URL; the smoke test imports them so both stay in step.
TOKEN_PATH = "/v1/oauth/token"
MEMBERS_PATH = "/v1/tenants/{tenant_id}/members"
MEMBER_PATH = "/v1/tenants/{tenant_id}/members/{member_id}"
FREEZE_PATH = "/v1/tenants/{tenant_id}/members/{member_id}/freeze"
DIRECTORY_CHANGES_PATH = "/v1/tenants/{tenant_id}/directory-changes"
TOP_UP_PATH = "/v1/tenants/{tenant_id}/members/{member_id}/top-ups"
BALANCES_PATH = "/v1/tenants/{tenant_id}/members/{member_id}/balances"
PAYMENT_LOOKUP_PATH = "/v1/tenants/{tenant_id}/payments/lookup"
UNFREEZE_PATH = "/v1/tenants/{tenant_id}/members/{member_id}/unfreeze"
PAYMENTS_PATH = "/v1/tenants/{tenant_id}/members/{member_id}/payments"
DEVICES_PATH = "/v1/tenants/{tenant_id}/devices"
DINING_INDEX_PATH = "/v1/tenants/{tenant_id}/dining-index"
ALARMS_PATH = "/v1/tenants/{tenant_id}/alarms"
SEARCH_PREFIX = "Zhou"

_JSON_FIELD = "python3 -c 'import json,sys;print(json.load(sys.stdin)[\"{field}\"])'"
_LIST_MEMBERS = (
    "python3 -c 'import json,sys;[print(m[\"external_number\"], m[\"name\"], m[\"status\"]) "
    "for m in json.load(sys.stdin)[\"members\"]]'"
)
_LIST_PURSES = (
    "python3 -c 'import json,sys;[print(p[\"purse_kind\"], p[\"ref\"] or \"-\", p[\"status\"], "
    "p[\"available_fen\"], \"fen available\") for p in json.load(sys.stdin)[\"purses\"]]'"
)
_LOOKUP = (
    "python3 -c 'import json,sys;a=json.load(sys.stdin);"
    "print(\"found\", a[\"transfer\"][\"kind\"], a[\"transfer\"][\"amount_fen\"], \"fen\") "
    "if a[\"found\"] else print(\"not found\")'"
)
_PAID = (
    "python3 -c 'import json,sys;a=json.load(sys.stdin);"
    "print(\"paid\", a[\"transfer\"][\"amount_fen\"], \"fen\") if a[\"paid\"] else print(\"not paid:\", a[\"reason\"])'"
)
_LIST_DEVICES = (
    "python3 -c 'import json,sys;[print(d[\"kind\"], d[\"name\"], d[\"location\"], "
    "\"online\" if d[\"online\"] else \"offline\") for d in json.load(sys.stdin)[\"devices\"]]'"
)
_LIST_DINING = (
    "python3 -c 'import json,sys;[print(l[\"location\"], l[\"served\"], \"served in 15 min, capacity\", "
    "l[\"capacity\"], \"load\", l[\"load\"]) for l in json.load(sys.stdin)[\"locations\"]]'"
)
_LIST_ALARMS = (
    "python3 -c 'import json,sys;a=json.load(sys.stdin)[\"alarms\"];print(len(a), \"open alarms\");"
    "[print(\" \", x[\"severity\"], x[\"kind\"], x[\"detail\"]) for x in a]'"
)
_LIST_CHANGES = (
    "python3 -c 'import json,sys;[print(c[\"sequence\"], c[\"kind\"], c[\"member\"][\"name\"]) "
    "for c in json.load(sys.stdin)[\"changes\"]]'"
)


def _shell_path(template: str) -> str:
    """A path template with the walkthrough's shell variables in it."""
    return "$GW" + template.format(tenant_id="$TENANT", member_id="$MEMBER")


def walkthrough(*, base_url: str, tenant_id: str, client: DemoClient, canteen_account_id: str = "",
                admin: DemoClient | None = None, partner_grpc: str = "", partner_ca: str = "") -> list[str]:
    auth = '-H "Authorization: Bearer $TOKEN"'
    return (_bank_steps(base_url=base_url, tenant_id=tenant_id, client=client, canteen_account_id=canteen_account_id,
                        auth=auth) + _grpc_steps(partner_grpc=partner_grpc, partner_ca=partner_ca)
            + ([] if admin is None else _fleet_steps(admin)))


def _grpc_steps(*, partner_grpc: str, partner_ca: str) -> list[str]:
    """The same bank over the partner gRPC API, as comments: grpcurl is not a dependency."""
    if not partner_grpc:
        return []
    grpcurl = (f"grpcurl -cacert {shlex.quote(partner_ca)} -authority localhost "
               '-H "authorization: Bearer $TOKEN"')
    return [
        "",
        "# The same over gRPC (onecard.partner.v1.PartnerService, docs/partners.md), with grpcurl installed:",
        f"#   {grpcurl} -d '{{\"tenant_id\": \"'$TENANT'\", \"member_id\": \"'$MEMBER'\"}}' \\",
        f"#     {partner_grpc} onecard.partner.v1.PartnerService/GetMemberBalances",
    ]


def _fleet_steps(admin: DemoClient) -> list[str]:
    auth = '-H "Authorization: Bearer $ADMIN_TOKEN"'
    return [
        "",
        f"# 10. The device fleet, as {admin.name} (scopes devices:admin and data:read): the terminals the",
        "#     simulator runs (some go offline and come back), the dining index (people served per canteen in",
        "#     the last 15 minutes against capacity) and the open alarms",
        f"ADMIN_TOKEN=$(curl -sf -X POST \"{_shell_path(TOKEN_PATH)}\" -d grant_type=client_credentials \\",
        f"    -d client_id={shlex.quote(admin.client_id)} -d client_secret={shlex.quote(admin.client_secret)} "
        "-d tenant_id=\"$TENANT\" \\",
        f"    | {_JSON_FIELD.format(field='access_token')})",
        f'curl -sf "{_shell_path(DEVICES_PATH)}?page_size=10" {auth} | {_LIST_DEVICES}',
        f'curl -sf "{_shell_path(DINING_INDEX_PATH)}" {auth} | {_LIST_DINING}',
        f'curl -sf "{_shell_path(ALARMS_PATH)}?page_size=5" {auth} | {_LIST_ALARMS}',
    ]


def _bank_steps(*, base_url: str, tenant_id: str, client: DemoClient, canteen_account_id: str, auth: str) -> list[str]:
    return [
        f"GW={shlex.quote(base_url)}",
        f"TENANT={shlex.quote(tenant_id)}",
        f"CLIENT_ID={shlex.quote(client.client_id)}",
        f"CLIENT_SECRET={shlex.quote(client.client_secret)}",
        "",
        f"# 1. An access token for {client.name} in the demo tenant (OAuth2 client credentials)",
        f'TOKEN=$(curl -sf -X POST "{_shell_path(TOKEN_PATH)}" -d grant_type=client_credentials \\',
        '    -d client_id="$CLIENT_ID" -d client_secret="$CLIENT_SECRET" -d tenant_id="$TENANT" \\',
        f"    | {_JSON_FIELD.format(field='access_token')})",
        "",
        "# 2. Create a member (the student number must be new, so it is taken from the clock)",
        f'MEMBER=$(curl -sf -X POST "{_shell_path(MEMBERS_PATH)}" {auth} -H "Content-Type: application/json" \\',
        "    -d \"{\\\"external_number\\\": \\\"D$(date +%s)\\\", \\\"name\\\": \\\"Zhou Xinyi\\\", "
        "\\\"groups\\\": {\\\"department\\\": \\\"physics\\\", \\\"grade\\\": \\\"2025\\\"}}\" \\",
        f"    | {_JSON_FIELD.format(field='member_id')})",
        "echo \"created $MEMBER\"",
        "",
        "# 3. Search: an exact student number, or a name prefix",
        f'curl -sf "{_shell_path(MEMBERS_PATH)}?q={SEARCH_PREFIX}&page_size=5" {auth} | {_LIST_MEMBERS}',
        "",
        "# 4. Freeze the new member (codes and cards stop working; the directory feed says so)",
        f'curl -sf -X POST "{_shell_path(FREEZE_PATH)}" {auth} -H "Content-Type: application/json" \\',
        "    -d '{\"reason\": \"card reported lost\"}'" f" | {_JSON_FIELD.format(field='status')}",
        "",
        "# 5. The directory change feed a bank or a device hub follows (first page)",
        f'curl -sf "{_shell_path(DIRECTORY_CHANGES_PATH)}?page_size=5" {auth} | {_LIST_CHANGES}',
        "",
        "# 6. Top up the member's cash purse with 100.00 CNY (amounts are integer fen) from the bank's own",
        "#    clearing account; the Idempotency-Key makes a retry safe: the same key answers the same top-up",
        "KEY=\"walkthrough-$(date +%s)\"",
        f'curl -sf -X POST "{_shell_path(TOP_UP_PATH)}" {auth} -H "Idempotency-Key: $KEY" \\',
        "    -H \"Content-Type: application/json\" -d '{\"amount_fen\": 10000, \"external_ref\": \"walkthrough\"}' \\",
        "    | python3 -c 'import json,sys;t=json.load(sys.stdin)[\"transfer\"];print(t[\"kind\"], t[\"amount_fen\"])'",
        "",
        "# 7. The member's purses and balances",
        f'curl -sf "{_shell_path(BALANCES_PATH)}" {auth} | {_LIST_PURSES}',
        "",
        "# 8. \"Did this pay?\" after a timeout: look the write up by its Idempotency-Key",
        f'curl -sf "{_shell_path(PAYMENT_LOOKUP_PATH)}?idempotency_key=$KEY" {auth} | {_LOOKUP}',
    ] + ([] if not canteen_account_id else [
        "",
        "# 9. Unfreeze the member (the card was found), then pay 12.00 CNY at the North Canteen from the app:",
        "#    the tenant's published rules decide (meal periods, limits, funding order); outside a meal period",
        "#    the canteen is closed and the answer says so",
        f'curl -sf -X POST "{_shell_path(UNFREEZE_PATH)}" {auth} | {_JSON_FIELD.format(field="status")}',
        f"CANTEEN={shlex.quote(canteen_account_id)}",
        f'curl -sf -X POST "{_shell_path(PAYMENTS_PATH)}" {auth} -H "Idempotency-Key: $KEY-lunch" \\',
        "    -H \"Content-Type: application/json\" -d '{\"merchant_account_id\": \"'\"$CANTEEN\"'\", \"amount_fen\": 1200}' \\",
        f"    | {_PAID}",
    ])
