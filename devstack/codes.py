"""``python -m devstack.codes show|verify``: try the e-code against the stack `make run` started.

``show`` plays a phone: it makes a holder key, asks codegen for a credential for a demo member
and draws a fresh holder code as a QR in the terminal every few seconds, for a bounded time.
``verify`` plays a POS: it syncs the demo tenant's trust list and revocations from codegen and
verifies a pasted code with the decode SDK, printing its fields or why it is refused.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid

import grpc
import onecard_codes as sdk
from onecard_codes.qr import render_terminal
from onecard_codes.verify import Verifier

from devstack.config import ConfigError, DevstackConfig
from devstack.seed import DEMO_TENANT_ID
from onecard.codegen.v1 import codegen_pb2 as cpb
from onecard.codegen.v1 import codegen_pb2_grpc
from onecard.identity.v1 import identity_pb2 as ipb
from onecard.identity.v1 import identity_pb2_grpc
from runtime.grpc_client import error_info, open_channel
from runtime.mesh import MeshTLS, TLSMaterialError
from services.codegen.client import fetch_verifier_inputs

CALL_TIMEOUT_S = 10.0
DEFAULT_SHOW_S = 60
MAX_SHOW_S = 3600
DEFAULT_REFRESH_S = 5
MIN_REFRESH_S = 1
DEFAULT_VALIDITY_S = 3600
_PURPOSES = {p.name.lower(): p for p in (sdk.Purpose.PAY, sdk.Purpose.ACCESS, sdk.Purpose.RIDE,
                                         sdk.Purpose.CHECK_IN)}
_PB_PURPOSE = {sdk.Purpose.PAY: cpb.PURPOSE_PAY, sdk.Purpose.ACCESS: cpb.PURPOSE_ACCESS,
               sdk.Purpose.RIDE: cpb.PURPOSE_RIDE, sdk.Purpose.CHECK_IN: cpb.PURPOSE_CHECK_IN}
CLEAR_SCREEN = "\x1b[2J\x1b[H"


class TryItError(Exception):
    """Something the user can fix (the stack is not running, no such member); printed, not traced."""


def _targets() -> tuple[str, str, MeshTLS]:
    """identity's and codegen's addresses, and devstack's certificate, of the stack make run started."""
    config = DevstackConfig.from_env()
    try:
        tls = MeshTLS.load(config.identity_dir("devstack"))
    except TLSMaterialError:
        raise TryItError("no devstack certificate under the data folder; start the stack with `make run` first"
                         ) from None
    return config.service("identity").target, config.service("codegen").target, tls


def _refusal(exc: grpc.aio.AioRpcError) -> TryItError:
    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return TryItError("the local stack does not answer; start it with `make run` in another terminal")
    reason, _ = error_info(exc)
    return TryItError(f"{exc.code().name} {reason or ''}: {exc.details()}")


async def _demo_member(identity: identity_pb2_grpc.IdentityServiceStub, *, external_number: str | None
                       ) -> ipb.Member:
    answer = await identity.SearchMembers(
        ipb.SearchMembersRequest(tenant_id=DEMO_TENANT_ID, query=external_number or "",
                                 status=ipb.MEMBER_STATUS_UNSPECIFIED if external_number else ipb.MEMBER_STATUS_ACTIVE,
                                 page_size=1),
        timeout=CALL_TIMEOUT_S,
    )
    if not answer.members:
        raise TryItError(f"no demo member {external_number or '(active)'}; is the demo seeded (`make run`)?")
    return answer.members[0]


async def show(*, external_number: str | None, purpose: sdk.Purpose, seconds: int, refresh_s: int,
               clear: bool) -> None:
    identity_target, codegen_target, tls = _targets()
    async with open_channel(identity_target, tls=tls, server_name="identity") as identity_channel, \
            open_channel(codegen_target, tls=tls, server_name="codegen") as codegen_channel:
        identity = identity_pb2_grpc.IdentityServiceStub(identity_channel)
        codegen = codegen_pb2_grpc.CodegenServiceStub(codegen_channel)
        try:
            member = await _demo_member(identity, external_number=external_number)
            holder = sdk.generate_holder_key()
            issued = await codegen.IssueCredential(
                cpb.IssueCredentialRequest(tenant_id=DEMO_TENANT_ID, member_id=member.member_id,
                                           holder_public_key=sdk.holder_public_key(holder),
                                           purposes=list(_PB_PURPOSE.values()), validity_s=DEFAULT_VALIDITY_S),
                timeout=CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            raise _refusal(exc) from None
    credential = issued.credential
    deadline = time.monotonic() + seconds
    # The counter rises with every code shown, as a phone's would; a verifier refuses a repeat.
    counter = 0
    while True:
        counter += 1
        now_s = int(time.time())
        code = sdk.make_holder_code(credential_bytes=issued.credential_bytes, holder_signing_key=holder,
                                    now_s=now_s, counter=counter, purpose=purpose)
        if clear:
            print(CLEAR_SCREEN, end="")
        print(render_terminal(code))
        print(f"member {member.external_number}  credential {credential.credential_id}  purpose "
              f"{purpose.name.lower()}  counter {counter}  {len(code)} characters")
        print(f"\n{code}\n")
        print(f"verify it in another terminal:  python -m devstack.codes verify '<the code above>'"
              f"   (refreshing every {refresh_s} s; Ctrl-C to stop)")
        # The last code stays on screen when the loop ends; it lives as long as any other.
        if time.monotonic() + refresh_s > deadline:
            return
        await asyncio.sleep(refresh_s)


async def verify(*, code: str, purpose: sdk.Purpose) -> bool:
    _identity_target, codegen_target, tls = _targets()
    async with open_channel(codegen_target, tls=tls, server_name="codegen") as channel:
        try:
            trust_list, revocations = await fetch_verifier_inputs(
                codegen_pb2_grpc.CodegenServiceStub(channel), tenant_id=DEMO_TENANT_ID, timeout_s=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise _refusal(exc) from None
    result = Verifier(trust_list=trust_list, revocations=revocations).verify(
        code.strip(), now_s=int(time.time()), expected_tenant_id=uuid.UUID(DEMO_TENANT_ID), purpose=purpose)
    if not result.ok:
        print(f"REFUSED  {result.reason.value}  ({result.detail})")
        return False
    print(f"ACCEPTED {result.kind.value} code")
    for name in ("tenant_id", "member_id", "credential_id", "purpose", "time_s", "counter", "not_after_s"):
        value = getattr(result, name)
        print(f"  {name:<14} {value.name.lower() if isinstance(value, sdk.Purpose) else value}")
    print(f"  {'caps':<14} {result.caps.per_transaction_fen} fen a payment, {result.caps.per_day_fen} fen "
          f"and {result.caps.count_per_day} payments a day")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.codes", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    show_cmd = commands.add_parser("show", help="issue a credential for a demo member and show live codes as QR")
    show_cmd.add_argument("--member", help="the demo member's external number (default: the first active one)")
    show_cmd.add_argument("--purpose", choices=sorted(_PURPOSES), default="pay")
    show_cmd.add_argument("--seconds", type=int, default=DEFAULT_SHOW_S,
                          help=f"how long to keep refreshing (default {DEFAULT_SHOW_S}, at most {MAX_SHOW_S})")
    show_cmd.add_argument("--refresh-s", type=int, default=DEFAULT_REFRESH_S)
    show_cmd.add_argument("--no-clear", action="store_true", help="do not clear the screen between codes")
    verify_cmd = commands.add_parser("verify", help="verify a pasted code against the demo tenant's lists")
    verify_cmd.add_argument("code", help="the code text, 'OC1:...' (quote it: it contains spaces)")
    verify_cmd.add_argument("--purpose", choices=sorted(_PURPOSES), default="pay")
    args = parser.parse_args(argv)
    try:
        if args.command == "show":
            if not 1 <= args.seconds <= MAX_SHOW_S or args.refresh_s < MIN_REFRESH_S:
                parser.error(f"--seconds must be in [1, {MAX_SHOW_S}] and --refresh-s at least {MIN_REFRESH_S}")
            asyncio.run(show(external_number=args.member, purpose=_PURPOSES[args.purpose], seconds=args.seconds,
                             refresh_s=args.refresh_s, clear=not args.no_clear and sys.stdout.isatty()))
            return 0
        return 0 if asyncio.run(verify(code=args.code, purpose=_PURPOSES[args.purpose])) else 1
    except (TryItError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
