"""Fixed keys and codes for the SDK tests; nothing here needs a database or a network."""
from __future__ import annotations

import uuid
from dataclasses import dataclass

import nacl.signing
import pytest

from onecard_codes import (
    IssuedCredential,
    IssuerKey,
    OfflineCaps,
    Purpose,
    Revocations,
    TrustList,
    issue_credential,
    make_holder_code,
)
from onecard_codes.verify import ReplayCache, Verifier

TENANT = uuid.UUID("11111111-0000-4000-8000-000000000001")
OTHER_TENANT = uuid.UUID("22222222-0000-4000-8000-000000000002")
MEMBER = uuid.UUID("33333333-0000-4000-8000-000000000003")
NOT_BEFORE_S = 1_767_225_600
NOW_S = NOT_BEFORE_S + 3600
CAPS = OfflineCaps(per_transaction_fen=3000, per_day_fen=20000, count_per_day=20)


@dataclass
class World:
    issuer: IssuerKey
    other_issuer: IssuerKey
    holder: nacl.signing.SigningKey
    credential: IssuedCredential

    def trust_list(self, *, fetched_at_s: int = NOW_S - 60, include_other: bool = False) -> TrustList:
        keys = (self.issuer.trusted(), self.other_issuer.trusted()) if include_other else (self.issuer.trusted(),)
        return TrustList(keys=keys, fetched_at_s=fetched_at_s)

    def verifier(self, *, revocations: Revocations | None = None, include_other: bool = False,
                 replay_cache: ReplayCache | None = None) -> Verifier:
        return Verifier(trust_list=self.trust_list(include_other=include_other), revocations=revocations,
                        replay_cache=replay_cache)

    def code(self, *, time_s: int = NOW_S, counter: int = 1, purpose: Purpose = Purpose.PAY,
             credential: IssuedCredential | None = None) -> str:
        return make_holder_code(credential_bytes=(credential or self.credential).credential_bytes,
                                holder_signing_key=self.holder, now_s=time_s, counter=counter, purpose=purpose)

    def issue(self, *, not_before_s: int = NOT_BEFORE_S, not_after_s: int = NOT_BEFORE_S + 72 * 3600,
              issuer: IssuerKey | None = None, purposes: Purpose = Purpose.PAY | Purpose.RIDE) -> IssuedCredential:
        return issue_credential(issuer_key=issuer or self.issuer, member_id=MEMBER,
                                holder_public_key=bytes(self.holder.verify_key), not_before_s=not_before_s,
                                not_after_s=not_after_s, caps=CAPS, purposes=purposes)


@pytest.fixture(scope="session")
def world() -> World:
    issuer = IssuerKey.from_seed(tenant_id=TENANT, seed=b"\x01" * 32)
    other_issuer = IssuerKey.from_seed(tenant_id=OTHER_TENANT, seed=b"\x02" * 32)
    holder = nacl.signing.SigningKey(b"\x03" * 32)
    credential = issue_credential(issuer_key=issuer, member_id=MEMBER, holder_public_key=bytes(holder.verify_key),
                                  not_before_s=NOT_BEFORE_S, not_after_s=NOT_BEFORE_S + 72 * 3600, caps=CAPS,
                                  purposes=Purpose.PAY | Purpose.RIDE)
    return World(issuer=issuer, other_issuer=other_issuer, holder=holder, credential=credential)
