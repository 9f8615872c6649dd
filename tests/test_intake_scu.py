"""Sending: node.scu Outbox and echo against DCMTK storescp (real peer on 127.0.0.1)."""

from __future__ import annotations

from datetime import UTC, timedelta

import pytest
from pydicom import dcmread
from sqlalchemy import select

from intake_helpers import (compress_rle, dataset_bytes, free_port, have_dcmtk, make_head_ct,
                            node_settings, storescp)
from node.index import AuditEvent, Send, SendState, open_index, utcnow
from node.scu import Outbox, TargetError, echo, resolve_target

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="DCMTK (storescp) not installed")


def _settings(tmp_path, port, **send):
    return node_settings(
        tmp_path,
        destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": port}},
        send={"retry_backoff_s": 10, "max_backoff_s": 40, "max_attempts": 4, **send})


def _rows(index) -> list[Send]:
    with index.session() as s:
        return list(s.scalars(select(Send).order_by(Send.id)))


def _utc(dt):
    # SQLite hands back naive datetimes (stored as UTC).
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _received(folder) -> dict[str, bytes]:
    out = {}
    for f in folder.iterdir():
        out[str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)] = dataset_bytes(f)
    return out


def test_outbox_delivers_to_storescp_as_stored(tmp_path):
    ct = make_head_ct(tmp_path / "ct")[:4]
    rle = compress_rle(make_head_ct(tmp_path / "ct2")[:2], tmp_path / "rle")
    port = free_port()
    settings = _settings(tmp_path, port)
    index = open_index(settings)
    outbox = Outbox(settings, index)
    ids = outbox.enqueue("pacs", [*ct, *rle], purpose="results", study_uid="1.2.3")
    assert len(ids) == 6
    assert outbox.enqueue("pacs", ct[:2], purpose="results") == ids[:2]  # idempotent
    with storescp(port, tmp_path / "received"):
        assert outbox.deliver_due() == 6
    received = _received(tmp_path / "received")
    for path in [*ct, *rle]:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert received[uid] == dataset_bytes(path)  # RLE sent as RLE, bytes unchanged
    rows = _rows(index)
    assert [r.state for r in rows] == [SendState.SENT] * 6
    assert all(r.last_status == "0x0000" and r.attempts == 1 for r in rows)
    assert outbox.deliver_due() == 0  # nothing due any more
    # Re-enqueueing a delivered file does not send it again unless asked to.
    assert outbox.enqueue("pacs", ct[:1]) == ids[:1]
    assert _rows(index)[0].state == SendState.SENT
    outbox.enqueue("pacs", ct[:1], resend=True)
    assert _rows(index)[0].state == SendState.PENDING
    index.dispose()


def test_destination_down_is_retried_with_backoff_then_succeeds(tmp_path):
    ct = make_head_ct(tmp_path / "ct")[:3]
    port = free_port()
    settings = _settings(tmp_path, port)
    index = open_index(settings)
    outbox = Outbox(settings, index)
    outbox.enqueue("pacs", ct)
    t0 = utcnow()
    assert outbox.deliver_due() == 0  # nobody listening
    rows = _rows(index)
    assert all(r.state == SendState.PENDING and r.attempts == 1 for r in rows)
    assert all("no association" in r.reason for r in rows)
    first_delay = (_utc(rows[0].next_attempt_at) - t0).total_seconds()
    assert 9 <= first_delay <= 12  # retry_backoff_s
    assert outbox.deliver_due() == 0  # not due yet: no attempt made
    assert _rows(index)[0].attempts == 1
    assert outbox.deliver_due(now=utcnow() + timedelta(seconds=11)) == 0  # due, still down
    rows = _rows(index)
    assert rows[0].attempts == 2
    assert 19 <= (_utc(rows[0].next_attempt_at) - utcnow()).total_seconds() <= 21  # doubled
    with storescp(port, tmp_path / "received"):
        assert outbox.deliver_due(now=utcnow() + timedelta(seconds=25)) == 3
    assert [r.state for r in _rows(index)] == [SendState.SENT] * 3
    assert len(list((tmp_path / "received").iterdir())) == 3
    with index.session() as s:
        outcomes = s.scalars(select(AuditEvent.outcome).where(AuditEvent.kind == "send")).all()
    assert outcomes.count("retry") == 6 and outcomes.count("ok") == 3
    index.dispose()


def test_exhausted_attempts_fail_with_reason_and_backoff_is_capped(tmp_path):
    ct = make_head_ct(tmp_path / "ct")[:1]
    settings = _settings(tmp_path, free_port(), max_attempts=4)
    index = open_index(settings)
    outbox = Outbox(settings, index)
    assert [outbox.backoff(n) for n in (1, 2, 3, 4, 5)] == [10, 20, 40, 40, 40]
    (send_id,) = outbox.enqueue("pacs", ct)
    when = utcnow()
    for _ in range(4):
        outbox.deliver_due(now=when)
        when += timedelta(seconds=100)
    (row,) = _rows(index)
    assert row.state == SendState.FAILED and row.attempts == 4
    assert "no association" in row.reason
    # Enqueueing again is a request to retry.
    assert outbox.enqueue("pacs", ct) == [send_id]
    assert _rows(index)[0].state == SendState.PENDING
    index.dispose()


def test_missing_file_fails_permanently(tmp_path):
    ct = make_head_ct(tmp_path / "ct")[:2]
    port = free_port()
    settings = _settings(tmp_path, port)
    index = open_index(settings)
    outbox = Outbox(settings, index)
    outbox.enqueue("pacs", ct)
    ct[0].unlink()
    with storescp(port, tmp_path / "received"):
        assert outbox.deliver_due() == 1
    rows = _rows(index)
    assert rows[0].state == SendState.FAILED and "file unreadable" in rows[0].reason
    assert rows[1].state == SendState.SENT
    index.dispose()


def test_echo_by_name_and_address(tmp_path):
    port = free_port()
    settings = _settings(tmp_path, port)
    assert not echo("pacs", settings)
    with storescp(port, tmp_path / "received"):
        assert echo("pacs", settings)
        result = echo(f"PACS@127.0.0.1:{port}")
        assert result.ok and result.status == "0x0000"
    with pytest.raises(TargetError):
        resolve_target("nowhere", settings)
    with pytest.raises(TargetError):
        resolve_target("A@host:99999")
