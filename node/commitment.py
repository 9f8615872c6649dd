"""Storage Commitment Push Model (PS3.4 J): ask a destination to confirm what it received.

After a C-STORE pass to a destination with ``storage_commitment: true`` the outbox sends an
N-ACTION (Action Type 1) listing the instances it delivered; the peer answers with an
N-EVENT-REPORT (Event Type 1 = all committed, 2 = some failed) on the same association or, as
Orthanc and most PACS do, later on a new association to our SCP. Both paths end in
:func:`apply_report`, which turns SENT rows into COMMITTED, or back into PENDING (retried like
any failed send) / FAILED for the references the peer could not commit.

Rows are matched by SOP Instance UID among SENT rows of the destinations whose AE title is the
reporter's (a report may arrive in another process than the one that asked, e.g. after
``ichnode send``), so no extra column is needed.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom.sop_class import StorageCommitmentPushModel
from sqlalchemy import select

from node.index import AuditEvent, Index, Send, SendState, utcnow
from node.logs import uid_ref

log = logging.getLogger("node.commitment")

SOP_CLASS = StorageCommitmentPushModel  # 1.2.840.10008.1.20.1
SOP_INSTANCE = "1.2.840.10008.1.20.1.1"  # the well-known instance (PS3.4 J.3.5)
ACTION_REQUEST = 1
EVENT_ALL_COMMITTED, EVENT_SOME_FAILED = 1, 2

# TransactionUID -> Event set when a report for it was applied (lets a sender wait briefly).
_WAITING: dict[str, threading.Event] = {}
_WAITING_LOCK = threading.Lock()


def build_request(refs: list[tuple[str, str]]) -> tuple[str, Dataset]:
    """(TransactionUID, N-ACTION Action Information) for [(sop_class, sop_instance)]."""
    ds = Dataset()
    ds.TransactionUID = generate_uid()
    items = []
    for sop_class, sop_instance in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return str(ds.TransactionUID), ds


def request(assoc, refs: list[tuple[str, str]]) -> tuple[str | None, str | None]:  # noqa: ANN001
    """Send the N-ACTION on an established association: (TransactionUID, error or None)."""
    uid, info = build_request(refs)
    with _WAITING_LOCK:
        _WAITING[uid] = threading.Event()
    try:
        status, _reply = assoc.send_n_action(info, ACTION_REQUEST, SOP_CLASS, SOP_INSTANCE)
    except (ValueError, RuntimeError) as exc:  # no accepted context for the SOP class
        forget(uid)
        return None, f"storage commitment not accepted by peer: {exc}"[:200]
    code = getattr(status, "Status", None)
    if code is None:
        forget(uid)
        return None, "storage commitment: no N-ACTION response"
    if code != 0x0000:
        forget(uid)
        return None, f"storage commitment N-ACTION status 0x{code:04X}"
    return uid, None


def wait(uid: str, seconds: float) -> bool:
    """Wait up to ``seconds`` for the report of ``uid`` (same association or another one)."""
    with _WAITING_LOCK:
        done = _WAITING.get(uid)
    return bool(done and done.wait(seconds))


def forget(uid: str) -> None:
    with _WAITING_LOCK:
        _WAITING.pop(uid, None)


def _refs(ds: Dataset, keyword: str) -> dict[str, int | None]:
    """SOP Instance UID -> FailureReason (None for committed ones) from a report sequence."""
    out: dict[str, int | None] = {}
    for item in ds.get(keyword, None) or []:
        uid = str(item.get("ReferencedSOPInstanceUID", "")).strip()
        if uid:
            reason = item.get("FailureReason", None)
            out[uid] = int(reason) if reason is not None else None
    return out


def apply_report(settings, index: Index, reporter_ae: str, event_type: int,  # noqa: ANN001
                 info: Dataset | None) -> tuple[int, int]:
    """Mark SENT rows named in an N-EVENT-REPORT; returns (committed, failed) counts."""
    info = info if info is not None else Dataset()
    committed = _refs(info, "ReferencedSOPSequence")
    failed = _refs(info, "FailedSOPSequence")
    if event_type == EVENT_ALL_COMMITTED and failed:
        log.warning("event type 1 with failed references; treating them as failed")
    dests = [name for name, d in settings.destinations.items()
             if d.storage_commitment and d.ae_title == reporter_ae.strip()]
    if not dests:  # an unknown AE: accept any commitment destination's rows
        dests = [name for name, d in settings.destinations.items() if d.storage_commitment]
    now, n_ok, n_bad = utcnow(), 0, 0
    wanted = list(committed) + list(failed)
    with index.session() as s:
        rows = s.scalars(select(Send).where(Send.state == SendState.SENT,
                                            Send.destination.in_(dests),
                                            Send.sop_instance_uid.in_(wanted))).all() if wanted else []
        for row in rows:
            if row.sop_instance_uid in failed:
                code = failed[row.sop_instance_uid]
                reason = ("storage commitment failed"
                          + (f" (failure reason 0x{code:04X})" if code is not None else ""))
                if row.attempts >= settings.send.max_attempts:
                    row.state, outcome = SendState.FAILED, "failed"
                else:
                    row.state, outcome = SendState.PENDING, "retry"
                    delay = min(settings.send.retry_backoff_s * (2 ** max(row.attempts - 1, 0)),
                                settings.send.max_backoff_s)
                    row.next_attempt_at = now + timedelta(seconds=delay)
                row.reason = reason
                n_bad += 1
            else:
                row.state, row.committed_at, row.reason = SendState.COMMITTED, now, None
                outcome, reason = "committed", None
                n_ok += 1
            s.add(AuditEvent(kind="commitment", outcome=outcome, peer=row.destination[:64],
                             ref=f"send:{row.id} {uid_ref(row.sop_instance_uid)}", detail=reason))
    uid = str(info.get("TransactionUID", ""))
    log.info("storage commitment report", extra={
        "transaction": uid_ref(uid) if uid else None, "event_type": event_type,
        "committed": n_ok, "failed": n_bad, "unmatched": len(wanted) - n_ok - n_bad})
    with _WAITING_LOCK:
        done = _WAITING.pop(uid, None)
    if done is not None:
        done.set()
    return n_ok, n_bad


def requeue_unconfirmed(settings, index: Index, now=None) -> int:  # noqa: ANN001
    """SENT rows to commitment destinations unconfirmed for ``send.commit_timeout_s``: re-send."""
    now = now or utcnow()
    dests = [name for name, d in settings.destinations.items() if d.storage_commitment]
    if not dests:
        return 0
    cutoff = now - timedelta(seconds=settings.send.commit_timeout_s)
    n = 0
    with index.session() as s:
        rows = s.scalars(select(Send).where(Send.state == SendState.SENT,
                                            Send.destination.in_(dests),
                                            Send.sent_at < cutoff)).all()
        for row in rows:
            reason = f"no storage commitment within {settings.send.commit_timeout_s:g}s"
            if row.attempts >= settings.send.max_attempts:
                row.state = SendState.FAILED
            else:
                row.state, row.next_attempt_at = SendState.PENDING, now
            row.reason = reason
            s.add(AuditEvent(kind="commitment", outcome="timeout", peer=row.destination[:64],
                             ref=f"send:{row.id} {uid_ref(row.sop_instance_uid)}", detail=reason))
            n += 1
    if n:
        log.warning("unconfirmed sends re-queued", extra={"sends": n})
    return n
