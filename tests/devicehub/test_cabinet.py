"""The vending cabinet orders through its POS: the amount is held, captured when the item is
dispensed, voided (the balance exactly as before) when it is not; order ids are idempotent."""

from __future__ import annotations

from onecard.devicehub.v1 import devicehub_pb2 as pb
from onecard.ledger.v1 import ledger_pb2 as lpb
from tests.devicehub.tx_support import add_member, balance, campus, device, online, roundtrip


async def order(conn, order_id: str, cabinet_id: str, amount_fen: int, **presentation: str):  # noqa: ANN001, ANN201
    return await roundtrip(conn, order_id, "cabinet_result", pb.ConnectRequest(cabinet_order=pb.CabinetOrder(
        order_id=order_id, cabinet_device_id=cabinet_id, presentation=pb.Presentation(**presentation),
        amount_fen=amount_fen, item="slot-3 milk")))


async def dispensed(conn, order_id: str, ok: bool):  # noqa: ANN001, ANN201
    return await roundtrip(conn, order_id, "cabinet_result", pb.ConnectRequest(
        cabinet_dispensed=pb.CabinetDispensed(order_id=order_id, dispensed=ok)))


async def posted(ledger, tenant_id: str, account_id: str) -> int:  # noqa: ANN001
    answer = await ledger.stub.GetBalances(lpb.GetBalancesRequest(tenant_id=tenant_id, account_ids=[account_id]))
    return answer.accounts[0].balance.posted_fen


async def test_a_failed_dispense_leaves_the_balance_unchanged_and_a_good_one_pays(
        identity, codegen, ledger, policy, devicehub, device_stub, tenant_id: str) -> None:  # noqa: ANN001
    c = await campus(identity=identity, ledger=ledger, policy=policy, tenant_id=tenant_id)
    member = await add_member(c, identity=identity, ledger=ledger, number="S1", cash_fen=10_000, codegen=codegen,
                              card_uid="CC000001")
    pos = await device(devicehub, device_stub, tenant_id, merchant_id=c.vending_id, location="dorm-3-lobby",
                       scene_tags=("vending",))
    cabinet = await device(devicehub, device_stub, tenant_id, kind=pb.DEVICE_KIND_CABINET, location="dorm-3-lobby",
                           scene_tags=("vending",), parent_device_id=pos.device_id)
    conn = await online(device_stub, pos)
    try:
        code = member.code()
        held = await order(conn, "o-1", cabinet.device_id, 500, code=code)
        assert (held.stage, held.member_id, held.amount_fen) == (pb.CABINET_STAGE_HELD, member.member_id, 500)
        assert [(b.purse_kind, b.available_fen) for b in held.balances] == [("cash", 9_500)]
        assert await balance(ledger, tenant_id, member.cash_id) == 9_500
        failed = await dispensed(conn, "o-1", False)
        assert (failed.stage, failed.reason) == (pb.CABINET_STAGE_VOIDED, "VOIDED")
        assert await balance(ledger, tenant_id, member.cash_id) == 10_000
        assert await posted(ledger, tenant_id, member.cash_id) == 10_000
        assert await posted(ledger, tenant_id, c.vending_id) == 0
        # Repeats answer the stage reached; nothing moves again.
        assert (await order(conn, "o-1", cabinet.device_id, 500, code=code)).stage == pb.CABINET_STAGE_VOIDED
        assert (await dispensed(conn, "o-1", True)).stage == pb.CABINET_STAGE_VOIDED

        good = await order(conn, "o-2", cabinet.device_id, 700, card_uid="CC000001")
        assert good.stage == pb.CABINET_STAGE_HELD
        captured = await dispensed(conn, "o-2", True)
        assert (captured.stage, captured.reason) == (pb.CABINET_STAGE_CAPTURED, "CAPTURED")
        assert [(b.purse_kind, b.available_fen) for b in captured.balances] == [("cash", 9_300)]
        assert (await dispensed(conn, "o-2", True)).stage == pb.CABINET_STAGE_CAPTURED
        assert (await dispensed(conn, "o-2", False)).stage == pb.CABINET_STAGE_CAPTURED
        assert await posted(ledger, tenant_id, member.cash_id) == 9_300
        assert await posted(ledger, tenant_id, c.vending_id) == 700
    finally:
        await conn.close()


async def test_refusals(identity, codegen, ledger, policy, devicehub, device_stub,  # noqa: ANN001
                        tenant_id: str) -> None:
    c = await campus(identity=identity, ledger=ledger, policy=policy, tenant_id=tenant_id)
    member = await add_member(c, identity=identity, ledger=ledger, number="S1", cash_fen=300, card_uid="CC000002")
    pos = await device(devicehub, device_stub, tenant_id, merchant_id=c.vending_id, scene_tags=("vending",))
    stranger = await device(devicehub, device_stub, tenant_id, merchant_id=c.vending_id, scene_tags=("vending",))
    cabinet = await device(devicehub, device_stub, tenant_id, kind=pb.DEVICE_KIND_CABINET,
                           parent_device_id=pos.device_id, scene_tags=("vending",))
    conn = await online(device_stub, pos)
    other = await online(device_stub, stranger)
    try:
        short = await order(conn, "o-1", cabinet.device_id, 500, card_uid="CC000002")
        assert (short.stage, short.reason) == (pb.CABINET_STAGE_DECLINED, "INSUFFICIENT_FUNDS")
        assert (await order(conn, "o-2", cabinet.device_id, 100, card_uid="EEEE0000")).reason == "UNKNOWN_CARD"
        not_mine = await order(other, "o-3", cabinet.device_id, 100, card_uid="CC000002")
        assert isinstance(not_mine, pb.StreamError) and not_mine.reason == "NOT_CABINET_PARENT"
        unknown = await dispensed(conn, "o-404", True)
        assert isinstance(unknown, pb.StreamError) and unknown.reason == "UNKNOWN_ORDER"
        reused = await order(conn, "o-1", cabinet.device_id, 200, card_uid="CC000002")
        assert isinstance(reused, pb.StreamError) and reused.reason == "ORDER_ID_REUSED"
        assert await balance(ledger, tenant_id, member.cash_id) == 300
    finally:
        await conn.close()
        await other.close()
