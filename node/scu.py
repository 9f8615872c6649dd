"""Sending: C-ECHO and the C-STORE outbox (``sends`` table) with retries and backoff.

``Outbox.enqueue()`` records what must go where (idempotent per destination + SOP Instance UID);
``Outbox.deliver_due()`` sends the rows that are due, one association per destination, files
exactly as stored (no decode, no re-encode: presentation contexts are built from each file's SOP
class and transfer syntax). A failed attempt is retried after ``send.retry_backoff_s`` doubling
up to ``send.max_backoff_s``; after ``send.max_attempts`` the row is FAILED with the reason.
Every socket we open has TCP_NODELAY set (Nagle stalls a C-STORE sender at ~30 img/s).
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Iterable

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from node import commitment
from node.config import Destination, _check_ae_title
from node.index import AuditEvent, Index, Send, SendState, utcnow
from node.logs import uid_ref

log = logging.getLogger("node.scu")

_TARGET = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>\[[^\]]+\]|[^:@]+):(?P<port>\d{1,5})$")
# C-STORE statuses that mean "kept" (success and the storage warnings).
_KEPT = {0x0000, 0xB000, 0xB006, 0xB007}
MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255


class TargetError(ValueError):
    """A destination name or AE@host:port that cannot be used."""


def resolve_target(target: str, settings=None) -> Destination:  # noqa: ANN001 - Settings
    """A configured destination name, or ``AE@host:port``."""
    if settings is not None and target in settings.destinations:
        return settings.destinations[target]
    match = _TARGET.match(target.strip())
    if not match:
        known = ", ".join(sorted(settings.destinations)) if settings is not None else ""
        raise TargetError(f"unknown destination {target!r} (expected a configured name"
                          f"{' (' + known + ')' if known else ''} or AE@host:port)")
    try:
        ae = _check_ae_title(match["ae"])
    except ValueError as exc:
        raise TargetError(str(exc)) from None
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise TargetError(f"port {port} out of range")
    return Destination(ae_title=ae, host=match["host"].strip("[]"), port=port)


def _nodelay(event) -> None:  # noqa: ANN001 - pynetdicom Event
    try:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


def _new_ae(settings) -> AE:  # noqa: ANN001
    ae = AE(ae_title=settings.send.calling_ae if settings is not None else "ICHNODE")
    if settings is not None:
        ae.maximum_pdu_size = settings.send.max_pdu
        ae.acse_timeout = settings.dicom.acse_timeout
        ae.dimse_timeout = settings.dicom.dimse_timeout
        ae.network_timeout = settings.dicom.network_timeout
    return ae


def _tls_args(dest: Destination, settings) -> tuple[ssl.SSLContext, str] | None:  # noqa: ANN001
    if not dest.tls:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    cfg = settings.dicom if settings is not None else None
    if cfg is not None and cfg.tls_ca:
        ctx.load_verify_locations(str(cfg.tls_ca))
    if cfg is not None and cfg.tls_cert:
        ctx.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key or cfg.tls_cert))
    return ctx, dest.host


def _associate(ae: AE, dest: Destination, settings, handlers=()):  # noqa: ANN001, ANN202
    return ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                        tls_args=_tls_args(dest, settings),
                        evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay), *handlers])


@dataclass(frozen=True)
class EchoResult:
    """Outcome of a C-ECHO; truthy when the peer answered Success."""

    ok: bool
    status: str

    def __bool__(self) -> bool:
        return self.ok


def echo(target: str, settings=None) -> EchoResult:  # noqa: ANN001
    """C-ECHO a destination name from settings or ``AE@host:port``."""
    dest = resolve_target(target, settings)
    ae = _new_ae(settings)
    ae.add_requested_context(Verification)
    try:
        assoc = _associate(ae, dest, settings)
    except (OSError, ssl.SSLError) as exc:
        return EchoResult(False, f"connection failed: {exc}")
    if not assoc.is_established:
        return EchoResult(False, _association_failure(assoc))
    try:
        rsp = assoc.send_c_echo()
        status = getattr(rsp, "Status", None)
    finally:
        assoc.release()
    if status is None:
        return EchoResult(False, "no response (timeout or abort)")
    return EchoResult(status == 0x0000, f"0x{status:04X}")


def _association_failure(assoc) -> str:  # noqa: ANN001
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        if rj is not None and rj.result is not None:
            return (f"association rejected ({rj.result_str}, {rj.source_str}, "
                    f"{rj.reason_str})")
        return "association rejected"
    # pynetdicom reports a refused/unreachable connection as an abort too.
    return "no association (peer unreachable, refused, timed out or aborted)"


@dataclass
class _Item:
    send_id: int
    path: Path
    sop_class: str
    sop_instance: str
    tsyntax: str


class Outbox:
    """The persistent send queue (``sends`` rows) and its delivery loop."""

    def __init__(self, settings, index: Index) -> None:  # noqa: ANN001
        self.settings = settings
        self.index = index
        self._lock = threading.Lock()  # one delivery pass at a time in this process

    # ------------------------------------------------------------------ enqueue
    def enqueue(self, destination: str, paths: Iterable[str | Path], *, purpose: str = "manual",
                study_uid: str | None = None, resend: bool = False) -> list[int]:
        """Add files for ``destination``; one Send id per file (existing row reused).

        A FAILED row is reset to PENDING (enqueueing again means "try again"); a SENT row is
        left alone unless ``resend``.
        """
        if destination not in self.settings.destinations:
            raise TargetError(f"unknown destination {destination!r}")
        ids = []
        with self.index.session() as s:
            for raw in paths:
                path = Path(raw).resolve()
                meta = read_file_meta_info(path)  # raises on a non-DICOM file: caller reports
                sop = str(meta.get("MediaStorageSOPInstanceUID", "")).strip()
                if not sop:
                    raise ValueError(f"{path.name}: no SOP Instance UID in file meta")
                row = s.execute(select(Send).where(Send.destination == destination,
                                                   Send.sop_instance_uid == sop)
                                ).scalar_one_or_none()
                if row is None:
                    row = Send(destination=destination, path=str(path), sop_instance_uid=sop,
                               sop_class_uid=str(meta.get("MediaStorageSOPClassUID", "")),
                               study_uid=study_uid, purpose=purpose, state=SendState.PENDING,
                               attempts=0, next_attempt_at=utcnow())
                    s.add(row)
                elif row.state == SendState.FAILED or (resend and row.state != SendState.PENDING):
                    row.state, row.attempts, row.reason = SendState.PENDING, 0, None
                    row.next_attempt_at, row.path = utcnow(), str(path)
                s.flush()
                ids.append(row.id)
        return ids

    # ------------------------------------------------------------------ deliver
    def deliver_due(self, now: datetime | None = None, *, ids: Iterable[int] | None = None) -> int:
        """Send every due PENDING row (or only ``ids``); returns how many were delivered."""
        now = now or utcnow()
        with self._lock:
            if ids is None:  # unconfirmed too long: due again (new C-STORE + commitment)
                commitment.requeue_unconfirmed(self.settings, self.index, now)
            with self.index.session() as s:
                q = select(Send).where(Send.state == SendState.PENDING,
                                       Send.next_attempt_at <= now)
                if ids is not None:
                    q = select(Send).where(Send.state == SendState.PENDING,
                                           Send.id.in_(list(ids)))
                rows = s.scalars(q.order_by(Send.id)).all()
            by_dest: dict[str, list[Send]] = {}
            for row in rows:
                by_dest.setdefault(row.destination, []).append(row)
            return sum(self._deliver(dest, batch) for dest, batch in by_dest.items())

    def _deliver(self, name: str, rows: list[Send]) -> int:
        dest = self.settings.destinations.get(name)
        if dest is None:
            self._finish_all(rows, None, "destination no longer configured", permanent=True)
            return 0
        items, unreadable = [], []
        for row in rows:
            try:
                meta = read_file_meta_info(row.path)
                items.append(_Item(row.id, Path(row.path), str(meta.MediaStorageSOPClassUID),
                                   str(meta.MediaStorageSOPInstanceUID),
                                   str(meta.TransferSyntaxUID)))
            except Exception as exc:  # missing or damaged file: retrying will not help
                unreadable.append((row, f"file unreadable: {type(exc).__name__}"))
        for row, reason in unreadable:
            self._record(row.id, None, reason, permanent=True)
        sent = 0
        for chunk in _chunks_by_contexts(items):
            sent += self._deliver_chunk(name, dest, chunk)
        return sent

    def _deliver_chunk(self, name: str, dest: Destination, items: list[_Item]) -> int:
        ae = _new_ae(self.settings)
        for sop_class, tsyntax in sorted({(i.sop_class, i.tsyntax) for i in items}):
            ae.add_requested_context(sop_class, tsyntax)
        handlers = []
        if dest.storage_commitment:
            ae.add_requested_context(commitment.SOP_CLASS)
            # A peer may send the N-EVENT-REPORT on this association (PS3.4 J.3.3).
            handlers.append((evt.EVT_N_EVENT_REPORT, self._on_report))
        try:
            assoc = _associate(ae, dest, self.settings, handlers)
        except (OSError, ssl.SSLError) as exc:
            assoc, reason = None, f"connection failed: {exc}"
        if assoc is None or not assoc.is_established:
            reason = reason if assoc is None else _association_failure(assoc)
            log.warning("send: %s", reason, extra={"destination": name, "files": len(items)})
            for item in items:
                self._record(item.send_id, None, reason)
            return 0
        sent, delivered = 0, []
        try:
            for n, item in enumerate(items):
                if not assoc.is_established:
                    for rest in items[n:]:
                        self._record(rest.send_id, None, "association lost during send")
                    break
                try:
                    rsp = _send_as_stored(assoc, item.path)
                    status = getattr(rsp, "Status", None)
                except ValueError as exc:  # context rejected by the peer
                    self._record(item.send_id, None, f"not accepted by peer: {exc}"[:200])
                    continue
                except Exception as exc:  # noqa: BLE001 - any send error is a failed attempt
                    self._record(item.send_id, None, f"send error: {type(exc).__name__}")
                    continue
                if status is None:
                    self._record(item.send_id, None, "no response (timeout or abort)")
                elif status in _KEPT:
                    self._record(item.send_id, status, None)
                    delivered.append(item)
                    sent += 1
                else:
                    self._record(item.send_id, status, f"peer status 0x{status:04X}")
            if dest.storage_commitment and delivered and assoc.is_established:
                self._request_commitment(name, assoc, delivered)
        finally:
            if assoc.is_established:
                assoc.release()
        log.info("send pass", extra={"destination": name, "sent": sent, "files": len(items)})
        return sent

    # ------------------------------------------------------------------ commitment
    def _request_commitment(self, name: str, assoc, items: list[_Item]) -> None:  # noqa: ANN001
        """N-ACTION for what was just stored; rows stay SENT until the report comes.

        A failed request leaves them SENT too: ``send.commit_timeout_s`` re-sends them.
        """
        uid, error = commitment.request(assoc, [(i.sop_class, i.sop_instance) for i in items])
        if error:
            log.warning("send: %s", error, extra={"destination": name, "files": len(items)})
            self.index.audit("commitment", "failed", peer=name[:64], detail=error)
            return
        log.info("storage commitment requested",
                 extra={"destination": name, "files": len(items),
                        "transaction": uid_ref(uid)})
        wait_s = self.settings.send.commit_wait_s
        if wait_s > 0 and not commitment.wait(uid, wait_s):
            commitment.forget(uid)  # the report may still come later on a new association

    def _on_report(self, event) -> tuple[int, None]:  # noqa: ANN001
        """N-EVENT-REPORT on our own association (peer answered synchronously)."""
        return _handle_report(self.settings, self.index, event)

    # ------------------------------------------------------------------ bookkeeping
    def backoff(self, attempts: int) -> float:
        """Delay before the next attempt after ``attempts`` failed ones."""
        cfg = self.settings.send
        return min(cfg.retry_backoff_s * (2 ** max(attempts - 1, 0)), cfg.max_backoff_s)

    def _finish_all(self, rows: list[Send], status: int | None, reason: str, *,
                    permanent: bool) -> None:
        for row in rows:
            self._record(row.id, status, reason, permanent=permanent)

    def _record(self, send_id: int, status: int | None, reason: str | None, *,
                permanent: bool = False) -> None:
        """One attempt's outcome: SENT, or PENDING with backoff, or FAILED when exhausted."""
        now = utcnow()
        with self.index.session() as s:
            row = s.get(Send, send_id)
            if row is None:
                return
            row.attempts += 1
            row.last_status = None if status is None else f"0x{status:04X}"
            if reason is None:
                row.state, row.sent_at, row.reason = SendState.SENT, now, None
                outcome = "ok"
            elif permanent or row.attempts >= self.settings.send.max_attempts:
                row.state, row.reason = SendState.FAILED, reason
                outcome = "failed"
            else:
                row.reason = reason
                row.next_attempt_at = now + timedelta(seconds=self.backoff(row.attempts))
                outcome = "retry"
            s.add(AuditEvent(kind="send", outcome=outcome, peer=row.destination[:64],
                             ref=f"send:{row.id} {uid_ref(row.sop_instance_uid)}",
                             detail=reason or row.last_status))


def _handle_report(settings, index: Index, event) -> tuple[int, None]:  # noqa: ANN001
    """EVT_N_EVENT_REPORT for Storage Commitment, on either side of an association."""
    req = event.request
    if str(req.AffectedSOPClassUID or "") != commitment.SOP_CLASS:
        return 0x0112, None  # no such SOP instance / class we handle reports for
    assoc = event.assoc
    peer = assoc.acceptor if assoc.is_requestor else assoc.requestor
    try:
        info = event.event_information
        commitment.apply_report(settings, index, peer.ae_title or "",
                                int(req.EventTypeID or 0), info)
    except Exception:  # noqa: BLE001 - answer a failure, the peer may report again
        log.exception("storage commitment report not applied")
        return 0x0110, None
    return 0x0000, None


def _send_as_stored(assoc, path: Path):  # noqa: ANN001, ANN202
    """C-STORE a file's dataset streamed from disk as stored (no decode, no re-encode).

    pynetdicom's switch for this is process-wide, so it is set only around the call.
    """
    with _CHUNKED_LOCK:
        old, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
        try:
            return assoc.send_c_store(path)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = old


_CHUNKED_LOCK = threading.Lock()


def _chunks_by_contexts(items: list[_Item]) -> list[list[_Item]]:
    """Split so that no association needs more than 128 presentation contexts."""
    chunks: list[list[_Item]] = []
    current: list[_Item] = []
    seen: set[tuple[str, str]] = set()
    for item in items:
        key = (item.sop_class, item.tsyntax)
        if key not in seen and len(seen) >= MAX_CONTEXTS:
            chunks.append(current)
            current, seen = [], set()
        seen.add(key)
        current.append(item)
    if current:
        chunks.append(current)
    return chunks
