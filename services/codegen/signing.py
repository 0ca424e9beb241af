"""The one place codegen meets the code format: every byte is laid out and signed by the decode
SDK (``onecard_codes``), never here. This module only converts codegen's values to the SDK's.
Plain computation; no I/O.
"""

from __future__ import annotations

import functools
import uuid
from datetime import datetime

import nacl.signing
import onecard_codes as sdk

from services.codegen.domain import BatchPlan, OfflineCaps, Purpose, Validity

_SDK_PURPOSE = {
    Purpose.PAY: sdk.Purpose.PAY,
    Purpose.ACCESS: sdk.Purpose.ACCESS,
    Purpose.RIDE: sdk.Purpose.RIDE,
    Purpose.CHECK_IN: sdk.Purpose.CHECK_IN,
}

IssuedCredential = sdk.IssuedCredential
TokenBatch = sdk.TokenBatch


def key_id_for(public_key: bytes) -> bytes:
    return sdk.key_id_for(public_key)


def sdk_purposes(purposes: tuple[Purpose, ...]) -> sdk.Purpose:
    return functools.reduce(lambda acc, p: acc | _SDK_PURPOSE[p], purposes, sdk.Purpose(0))


def sdk_caps(caps: OfflineCaps) -> sdk.OfflineCaps:
    return sdk.OfflineCaps(per_transaction_fen=caps.per_transaction_fen, per_day_fen=caps.per_day_fen,
                   count_per_day=caps.per_day_count)


def _epoch_s(value: datetime) -> int:
    return int(value.timestamp())


def _issuer(*, signing_key: nacl.signing.SigningKey, tenant_id: uuid.UUID) -> sdk.IssuerKey:
    return sdk.IssuerKey(tenant_id=tenant_id, signing_key=signing_key)


def sign_credential(
    *,
    signing_key: nacl.signing.SigningKey,
    tenant_id: uuid.UUID,
    member_id: uuid.UUID,
    holder_public_key: bytes,
    validity: Validity,
    caps: OfflineCaps,
    purposes: tuple[Purpose, ...],
) -> IssuedCredential:
    return sdk.issue_credential(
        issuer_key=_issuer(signing_key=signing_key, tenant_id=tenant_id),
        member_id=member_id,
        holder_public_key=holder_public_key,
        not_before_s=_epoch_s(validity.not_before),
        not_after_s=_epoch_s(validity.not_after),
        caps=sdk_caps(caps),
        purposes=sdk_purposes(purposes),
    )


def sign_token_batch(
    *,
    signing_key: nacl.signing.SigningKey,
    tenant_id: uuid.UUID,
    member_id: uuid.UUID,
    credential_id: uuid.UUID,
    plan: BatchPlan,
    caps: OfflineCaps,
    purposes: tuple[Purpose, ...],
) -> TokenBatch:
    return sdk.issue_token_batch(
        issuer_key=_issuer(signing_key=signing_key, tenant_id=tenant_id),
        member_id=member_id,
        not_before_s=_epoch_s(plan.not_before),
        not_after_s=_epoch_s(plan.not_after),
        caps=sdk_caps(caps),
        purposes=sdk_purposes(purposes),
        slot_length_s=plan.slot_length_s,
        credential_id=credential_id,
    )
