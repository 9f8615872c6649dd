"""Durable spool + index of received instances: the part of intake that makes an ACK mean "kept".

``Spool.store(encoded, ...)`` takes the bytes exactly as the peer sent them (preamble + file meta +
dataset, as ``pynetdicom.events.Event.encoded_dataset()`` gives them), reads only the header
attributes it needs (never the pixel data, never a re-encode), writes the bytes to a temporary file
in the target folder, fsyncs it, renames it into place, fsyncs the folder and then indexes the
instance in one transaction. Only then does the caller answer Success.

Status codes (PS3.4 B.2.3) raised as :class:`StoreError`:

* ``0xA700`` Out of Resources - free space below ``storage.min_free_mb``;
* ``0xA701`` Out of Resources - the spool cannot be written (permissions, not a folder, I/O error);
* ``0xA702`` Out of Resources - the index cannot be written (database down, locked too long);
* ``0xA900`` Data Set does not match SOP Class - a Type 1 UID (Study, Series, SOP Instance,
  SOP Class) is missing or empty, or the dataset's SOP Instance UID differs from the one in the
  C-STORE request, or an image SOP class ("... Image Storage") arrives without pixel data
  (a transfer cut exactly at an element boundary looks whole otherwise);
* ``0xC000`` Cannot Understand - the dataset cannot be parsed: not DICOM, or truncated (every
  element length is checked against the received bytes, since pydicom accepts a cut-off value).

Re-sent instances: identical bytes for a known SOP Instance UID are a no-op Success (no new row,
nothing rewritten). Different bytes for a known SOP Instance UID replace the stored copy (the newest
wins: a modality re-sending a corrected instance means it), the row is updated, the study re-opens
and an ``instance``/``replaced`` audit row is written. File names carry a prefix of the content
hash, so the old file stays valid until the index points at the new one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import threading
import zlib
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any, Iterator

from pydicom import dcmread
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pydicom.valuerep import DSfloat, IS
from sqlalchemy import Integer, bindparam, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from node.index import AuditEvent, Index, Instance, Series, Study, StudyState, utcnow
from node.logs import uid_ref

log = logging.getLogger("node.spool")

# Attributes series selection needs, copied into Instance.meta at intake.
META_KEYWORDS = (
    "Modality", "ImageType", "BodyPartExamined", "SeriesDescription", "StudyDescription",
    "ProtocolName", "ConvolutionKernel", "SliceThickness", "PixelSpacing",
    "ImageOrientationPatient", "ImagePositionPatient", "Rows", "Columns",
    "GantryDetectorTilt", "InstanceNumber", "AcquisitionNumber",
)
UID_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
PHI_KEYWORDS = ("PatientID", "AccessionNumber")
_READ_KEYWORDS = META_KEYWORDS + UID_KEYWORDS + PHI_KEYWORDS

IMPLICIT = "1.2.840.10008.1.2"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"

OUT_OF_RESOURCES = 0xA700
SPOOL_UNWRITABLE = 0xA701
INDEX_UNAVAILABLE = 0xA702
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000


# Hot-path statements built once: SQLAlchemy then only binds parameters (about 6x cheaper per
# statement than building ``insert(...).values(...)`` for every instance).
_SELECT_EXISTING = (select(Instance.id, Instance.sha256, Instance.path)
                    .where(Instance.sop_instance_uid == bindparam("b_sop")))
_TOUCH_STUDY = (update(Study).where(Study.id == bindparam("b_id")).values(
    state=bindparam("b_state", type_=Study.__table__.c.state.type),
    last_received=bindparam("b_now", type_=Study.__table__.c.last_received.type),
    state_reason=None,
    instance_count=Study.instance_count + bindparam("b_added", type_=Integer)))
_COUNT_SERIES = (update(Series).where(Series.id == bindparam("b_id"))
                 .values(instance_count=Series.instance_count + 1))
_INSERT_INSTANCE = insert(Instance)
_INSERT_AUDIT = insert(AuditEvent)


class StoreError(Exception):
    """An instance that was not kept; ``status`` is the C-STORE status to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Header:
    """What intake reads from a received dataset (no pixel data)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    patient_id: str | None
    accession_number: str | None
    meta: dict[str, Any]


@dataclass(frozen=True)
class Stored:
    """Outcome of a store: ``outcome`` is ``new``, ``duplicate`` or ``replaced``."""

    outcome: str
    instance_id: int
    path: Path
    header: Header


def uid_hash(uid: str) -> str:
    """Folder/file name for a UID: fixed length, no identity, no odd characters."""
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:24]


def _json_value(value: Any) -> Any:
    # pydicom value types -> plain JSON (DS -> float, IS -> int, multi-values -> lists).
    if isinstance(value, MultiValue | list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, IS):
        return int(value)
    if isinstance(value, DSfloat | float):
        return float(value)
    if isinstance(value, int):
        return value
    return str(value)


# VRs with a 2-byte reserved field and a 4-byte length in explicit VR encoding (PS3.5 7.1.2).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT",
             b"SV", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


class _Malformed(Exception):
    pass


def _walk(buf: bytes, pos: int, end: int, *, implicit: bool, little: bool,
          stop_tag: int | None = None, only_group: int | None = None,
          seen: set[int] | None = None) -> int:
    """Walk element headers from ``pos``; return where the walk ended. Raises _Malformed when a
    length runs past the data (truncation) or the stream is not made of DICOM elements.

    pydicom reads a truncated value silently, so without this a cut-off transfer would be
    acknowledged. Values are skipped by length, never decoded.
    """
    u16, u32 = ("<H", "<I") if little else (">H", ">I")
    while pos < end:
        if end - pos < 8:
            raise _Malformed("element header cut off")
        group, elem = struct.unpack_from(u16 + u16[1], buf, pos)
        tag = (group << 16) | elem
        if only_group is not None and group != only_group:
            return pos
        if seen is not None:
            seen.add(tag)
        if tag in (_ITEM_END, _SEQ_END) or tag == _ITEM:
            if stop_tag is not None and tag == stop_tag:
                return pos + 8
            if tag == _ITEM:  # inside a sequence: item with defined or undefined length
                length = struct.unpack_from(u32, buf, pos + 4)[0]
                pos += 8
                if length == _UNDEFINED:
                    pos = _walk(buf, pos, end, implicit=implicit, little=little,
                                stop_tag=_ITEM_END)
                elif length > end - pos:
                    raise _Malformed("item runs past the end of the data")
                else:
                    pos += length
                continue
            raise _Malformed(f"unexpected delimiter {tag:08X}")
        vr = b""
        if implicit or group == 0xFFFE:
            length = struct.unpack_from(u32, buf, pos + 4)[0]
            pos += 8
        else:
            vr = buf[pos + 4:pos + 6]
            if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                raise _Malformed("not an explicit VR")
            if vr in _LONG_VRS:
                if end - pos < 12:
                    raise _Malformed("element header cut off")
                length = struct.unpack_from(u32, buf, pos + 8)[0]
                pos += 12
            else:
                length = struct.unpack_from(u16, buf, pos + 6)[0]
                pos += 8
        if length == _UNDEFINED:
            # Sequence or encapsulated pixel data: items until the sequence delimiter
            # (an undefined-length UN holds implicit VR little endian, PS3.5 6.2.2).
            pos = _walk(buf, pos, end, implicit=implicit or vr == b"UN", little=little,
                        stop_tag=_SEQ_END)
            continue
        if length > end - pos:
            raise _Malformed(f"element ({group:04X},{elem:04X}) runs past the end of the data")
        pos += length
    if stop_tag is not None:
        raise _Malformed("sequence or item not terminated")
    return pos


_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}


def check_complete(encoded: bytes, transfer_syntax_uid: str) -> set[int]:
    """StoreError 0xC000 unless ``encoded`` (preamble + meta + dataset) is structurally whole;
    returns the top-level tags of the dataset."""
    top: set[int] = set()
    try:
        if len(encoded) < 132 or encoded[128:132] != b"DICM":
            raise _Malformed("no DICOM file meta")
        start = _walk(encoded, 132, len(encoded), implicit=False, little=True, only_group=2)
        body = encoded
        if transfer_syntax_uid == DEFLATED:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            body = inflater.decompress(encoded[start:])
            if not inflater.eof:
                raise _Malformed("deflated stream cut off")
            start = 0
        if start >= len(body):
            raise _Malformed("empty dataset")
        _walk(body, start, len(body), implicit=transfer_syntax_uid == IMPLICIT,
              little=transfer_syntax_uid != BIG_ENDIAN, seen=top)
    except (_Malformed, struct.error, zlib.error, IndexError) as exc:
        raise StoreError(CANNOT_UNDERSTAND, f"dataset truncated or malformed: {exc}") from exc
    return top


def _is_image_class(sop_class: str) -> bool:
    # Storage SOP classes of images carry "Image Storage" in their registry name.
    try:
        return "Image Storage" in UID(sop_class).name
    except Exception:  # noqa: BLE001 - odd UID text: not a known image class
        return False


def read_header(encoded: bytes) -> Header:
    """Parse the file meta and the few attributes intake needs; StoreError if unusable."""
    try:
        ds = dcmread(BytesIO(encoded), force=True, stop_before_pixels=True,
                     specific_tags=list(_READ_KEYWORDS))
        tsuid = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
        values = {kw: ds.get(kw) for kw in _READ_KEYWORDS}
    except Exception as exc:  # pydicom raises many types on garbage; all mean "cannot parse"
        raise StoreError(CANNOT_UNDERSTAND, f"dataset cannot be parsed: {type(exc).__name__}") from exc
    if not tsuid:
        raise StoreError(CANNOT_UNDERSTAND, "no transfer syntax in file meta")
    top = check_complete(encoded, tsuid.strip())
    missing = [kw for kw in UID_KEYWORDS if not str(values.get(kw) or "").strip()]
    if missing:
        if len(missing) == len(UID_KEYWORDS) and not any(values.get(k) for k in META_KEYWORDS):
            # Nothing recognisable at all: a byte stream, not a dataset with a gap.
            raise StoreError(CANNOT_UNDERSTAND, "no DICOM attributes found in dataset")
        raise StoreError(DOES_NOT_MATCH, f"missing Type 1 attribute(s): {', '.join(missing)}")
    if _is_image_class(str(values["SOPClassUID"]).strip()) and not top & _PIXEL_TAGS:
        # A cut exactly at an element boundary looks whole: an image without pixels is not.
        raise StoreError(DOES_NOT_MATCH, "image SOP class without pixel data (truncated?)")
    meta = {}
    for kw in META_KEYWORDS:
        value = values.get(kw)
        if value is not None and value != "":
            try:
                meta[kw] = _json_value(value)
            except (TypeError, ValueError):
                meta[kw] = str(value)
    return Header(
        sop_class_uid=str(values["SOPClassUID"]).strip(),
        sop_instance_uid=str(values["SOPInstanceUID"]).strip(),
        study_uid=str(values["StudyInstanceUID"]).strip(),
        series_uid=str(values["SeriesInstanceUID"]).strip(),
        transfer_syntax_uid=tsuid.strip(),
        patient_id=(str(values["PatientID"]) if values.get("PatientID") else None),
        accession_number=(str(values["AccessionNumber"]) if values.get("AccessionNumber")
                          else None),
        meta=meta,
    )


class Spool:
    """Received instances on disk (``storage.spool_dir``) and in the index."""

    def __init__(self, settings, index: Index) -> None:  # noqa: ANN001 - Settings
        self.root = Path(settings.storage.spool_dir)
        self.index = index
        self.min_free_bytes = settings.storage.min_free_mb * 1024 * 1024
        self.fsync = settings.storage.fsync
        # Folders known to exist durably (created and their parent fsynced): skip mkdir/fsync.
        self._dirs: set[Path] = set()
        # study/series UID -> row id: saves two SELECTs per instance. Invalidated when an
        # UPDATE touches no row (study deleted by someone else).
        self._study_ids: dict[str, int] = {}
        self._series_ids: dict[str, int] = {}
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="spool-write")

    # ------------------------------------------------------------------ public
    def store(self, encoded: bytes, *, calling_ae: str | None = None,
              expected_sop_instance_uid: str | None = None,
              header: Header | None = None) -> Stored:
        """Keep one received instance durably and index it; StoreError if it cannot."""
        header = header or read_header(encoded)
        if expected_sop_instance_uid and expected_sop_instance_uid.strip() != header.sop_instance_uid:
            raise StoreError(DOES_NOT_MATCH,
                             "SOP Instance UID differs from the C-STORE request's")
        sha = hashlib.sha256(encoded).hexdigest()
        existing = self._existing(header.sop_instance_uid)
        if existing is not None and existing[1] == sha and self._intact(existing[2], len(encoded)):
            return Stored("duplicate", existing[0], self.root / existing[2], header)
        self._check_space(len(encoded))
        rel = self._relpath(header, sha)
        path = self.root / rel
        if existing is not None:
            # Replacement (rare): sequential, so the old copy stays valid until the row moves.
            self._write(path, encoded)
            return self._index_or_unlink(header, rel, path, len(encoded), sha, calling_ae,
                                         keep=existing[2] == rel)
        # New instance: the file's fsyncs and the index commit's fsync run side by side (the
        # ACK waits for both); the latency is the longer of the two, not their sum.
        writing = (self._pool.submit(self._write, path, encoded) if self.fsync
                   else _run_now(self._write, path, encoded))  # no fsync: no thread hand-off
        stored = self._index_or_unlink(header, rel, path, len(encoded), sha, calling_ae,
                                       keep=False, writing=writing)
        try:
            writing.result()
        except BaseException:
            if stored.outcome == "new":  # (a concurrent twin's row is left to its own store)
                self._unindex(stored.instance_id, header)  # not on disk = not kept
                _unlink(path)
            raise
        return stored

    def _index_or_unlink(self, header: Header, rel: str, path: Path, size: int, sha: str,
                         calling_ae: str | None, *, keep: bool,
                         writing: Future | None = None) -> Stored:
        try:
            instance_id, outcome, old_rel = self._index(header, rel, size, sha, calling_ae,
                                                        known_new=writing is not None)
        except BaseException:
            # Not indexed = not kept: remove the file so nothing half-stored remains.
            if writing is not None:
                try:
                    writing.result()
                except StoreError:
                    pass
            if not keep:
                _unlink(path)
            raise
        if old_rel and old_rel != rel:
            _unlink(self.root / old_rel)
        return Stored(outcome, instance_id, path, header)

    def _intact(self, rel: str, size: int) -> bool:
        # A duplicate is only a no-op when the stored copy is really there (self-healing after
        # a crash between index commit and file write).
        try:
            return (self.root / rel).stat().st_size == size
        except OSError:
            return False

    def _unindex(self, instance_id: int, header: Header) -> None:
        """Compensate an index commit whose file could not be written."""
        try:
            with self._db() as s:
                inst = s.get(Instance, instance_id)
                if inst is None:
                    return
                s.execute(update(Series).where(Series.id == inst.series_id)
                          .values(instance_count=Series.instance_count - 1))
                s.execute(update(Study).where(Study.study_uid == header.study_uid)
                          .values(instance_count=Study.instance_count - 1))
                s.delete(inst)
                s.add(AuditEvent(kind="instance", outcome="failed",
                                 ref=uid_ref(header.sop_instance_uid),
                                 detail="file not written; index row removed"))
        except SQLAlchemyError as exc:
            log.error("could not remove index row of an unwritten instance: %s",
                      type(exc).__name__, extra={"sop": uid_ref(header.sop_instance_uid)})

    def repair_recent(self, hours: float = 24.0) -> int:
        """Drop index rows of recent instances whose file is missing; returns how many.

        The index commit and the file's fsyncs run side by side, so a crash between the two can
        leave a row without its file (the sender got no ACK and normally re-sends, which heals
        it). Run at start-up so that nothing downstream trusts such a row.
        """
        since = utcnow() - timedelta(hours=hours)
        with self._db() as s:
            rows = s.execute(select(Instance.id, Instance.path, Instance.sop_instance_uid)
                             .where(Instance.received_at >= since)).all()
        missing = [r for r in rows if not (self.root / r.path).is_file()]
        for row in missing:
            with self._db() as s:
                inst = s.get(Instance, row.id)
                if inst is None:
                    continue
                series = s.get(Series, inst.series_id)
                if series is not None:
                    series.instance_count = max(0, series.instance_count - 1)
                    s.execute(update(Study).where(Study.id == series.study_id)
                              .values(instance_count=Study.instance_count - 1))
                s.delete(inst)
                s.add(AuditEvent(kind="instance", outcome="removed",
                                 ref=uid_ref(row.sop_instance_uid),
                                 detail="file missing after restart; index row removed"))
        if missing:
            log.warning("removed %d index row(s) whose file was missing", len(missing))
        return len(missing)

    def path_of(self, rel: str) -> Path:
        return self.root / rel

    # ------------------------------------------------------------------ disk
    def _relpath(self, header: Header, sha: str) -> str:
        study = uid_hash(header.study_uid)
        return (f"{study[:2]}/{study}/{uid_hash(header.series_uid)}/"
                f"{uid_hash(header.sop_instance_uid)}-{sha[:8]}.dcm")

    def _check_space(self, size: int) -> None:
        probe = self.root
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            free = shutil.disk_usage(probe).free
        except OSError as exc:
            raise StoreError(SPOOL_UNWRITABLE, f"spool not accessible: {exc.strerror}") from exc
        if free - size < self.min_free_bytes:
            raise StoreError(OUT_OF_RESOURCES,
                             f"free space {free // 2**20} MiB below storage.min_free_mb")

    def _ensure_dir(self, folder: Path) -> None:
        if folder in self._dirs:
            return
        missing = []
        probe = folder
        while not probe.is_dir():
            missing.append(probe)
            probe = probe.parent
        for d in reversed(missing):
            d.mkdir(exist_ok=True)
            if self.fsync:
                _fsync_dir(d.parent)  # the new folder's entry must survive a crash too
        self._dirs.add(folder)

    def _write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            self._ensure_dir(path.parent)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            if self.fsync:
                _fsync_dir(path.parent)
        except OSError as exc:
            _unlink(tmp)
            self._dirs.discard(path.parent)
            raise StoreError(SPOOL_UNWRITABLE,
                             f"spool not writable: {exc.strerror or type(exc).__name__}") from exc

    # ------------------------------------------------------------------ index
    @contextmanager
    def _db(self) -> Iterator[Session]:
        """A transaction on the spool's own long-lived connection (one at a time).

        Checking a pooled connection out per instance costs a pre-ping round trip each time;
        intake keeps one connection and drops it on any database error (the next instance
        reconnects, so an index outage heals by itself).
        """
        with self._lock:
            if self._conn is None:
                self._conn = self.index.engine.connect()
                if not self.fsync and self._conn.dialect.name == "sqlite":
                    # storage.fsync = false: no durable acknowledgement, no commit fsync either.
                    self._conn.exec_driver_sql("PRAGMA synchronous=NORMAL")
                    self._conn.commit()
            session = Session(bind=self._conn, expire_on_commit=False)
            try:
                yield session
                session.commit()
            except BaseException:
                try:
                    session.rollback()
                finally:
                    session.close()
                    self._drop_connection()
                raise
            session.close()

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.invalidate()
                self._conn.close()
            except Exception:  # noqa: BLE001 - already broken
                pass
            self._conn = None

    def close(self) -> None:
        """Release the connection and the writer threads."""
        with self._lock:
            self._drop_connection()
        self._pool.shutdown(wait=True)

    def _existing(self, sop_uid: str) -> tuple[int, str, str] | None:
        try:
            with self._db() as s:
                row = s.connection().execute(_SELECT_EXISTING, {"b_sop": sop_uid}).first()
        except SQLAlchemyError as exc:
            raise StoreError(INDEX_UNAVAILABLE,
                             f"index unavailable: {type(exc).__name__}") from exc
        return tuple(row) if row else None

    def _index(self, header: Header, rel: str, size: int, sha: str, calling_ae: str | None,
               known_new: bool = False) -> tuple[int, str, str | None]:
        for attempt in range(3):
            try:
                with self._db() as s:
                    return self._index_in(s, header, rel, size, sha, calling_ae, known_new)
            except IntegrityError:
                known_new = False
                # Another association created the same study/series/instance concurrently
                # (or the cache was stale): forget cached ids and redo the transaction.
                self._study_ids.pop(header.study_uid, None)
                self._series_ids.pop(header.series_uid, None)
                if attempt == 2:
                    raise StoreError(INDEX_UNAVAILABLE, "index conflict persisted") from None
            except SQLAlchemyError as exc:
                self._study_ids.pop(header.study_uid, None)
                self._series_ids.pop(header.series_uid, None)
                raise StoreError(INDEX_UNAVAILABLE,
                                 f"index unavailable: {type(exc).__name__}") from exc
        raise AssertionError("unreachable")

    def _index_in(self, s, header: Header, rel: str, size: int, sha: str,  # noqa: ANN001
                  calling_ae: str | None, known_new: bool) -> tuple[int, str, str | None]:
        now = utcnow()
        conn = s.connection()  # Core on the session's connection: no ORM overhead on the hot path
        old = None
        if not known_new:
            old = s.execute(select(Instance).where(
                Instance.sop_instance_uid == header.sop_instance_uid)).scalar_one_or_none()
        study_id = self._touch_study(s, header, calling_ae, now, 1 if old is None else 0)
        series_id = self._series_id(s, header, study_id)
        values = dict(series_id=series_id, sop_class_uid=header.sop_class_uid,
                      transfer_syntax_uid=header.transfer_syntax_uid, path=rel, size=size,
                      sha256=sha, calling_ae=calling_ae, received_at=now, meta=header.meta)
        if old is None:
            # Hot path: Core statements (no ORM unit of work); a concurrent insert of the same
            # SOP Instance UID raises IntegrityError and the caller redoes it the slow way.
            instance_id = conn.execute(_INSERT_INSTANCE, dict(
                sop_instance_uid=header.sop_instance_uid, **values)).inserted_primary_key[0]
            conn.execute(_COUNT_SERIES, {"b_id": series_id})
            outcome, old_rel = "new", None
        else:
            old_rel = old.path
            if old.series_id != series_id:  # moved series (rare: a corrected re-send)
                _move_counts(s, old.series_id, series_id)
            for key, value in values.items():
                setattr(old, key, value)
            s.flush()
            instance_id, outcome = old.id, "replaced"
        conn.execute(_INSERT_AUDIT, dict(
            at=now, kind="instance", outcome="ok" if outcome == "new" else outcome,
            peer=calling_ae, ref=uid_ref(header.sop_instance_uid),
            detail=f"ts={header.transfer_syntax_uid} size={size}"))
        return instance_id, outcome, old_rel

    def _touch_study(self, s, header: Header, calling_ae: str | None,  # noqa: ANN001
                     now: datetime, added: int) -> int:
        # Every new instance (re)opens the study: RECEIVING, last_received = now.
        study_id = self._study_ids.get(header.study_uid)
        if study_id is not None:
            done = s.connection().execute(_TOUCH_STUDY, {
                "b_id": study_id, "b_state": StudyState.RECEIVING, "b_now": now,
                "b_added": added})
            if done.rowcount == 1:
                return study_id
        study = s.execute(select(Study).where(Study.study_uid == header.study_uid)
                          ).scalar_one_or_none()
        if study is None:
            study = Study(study_uid=header.study_uid, patient_id=header.patient_id,
                          accession_number=header.accession_number, calling_ae=calling_ae,
                          state=StudyState.RECEIVING, first_received=now, last_received=now,
                          instance_count=added)
            s.add(study)
        else:
            study.state = StudyState.RECEIVING
            study.state_reason = None
            study.last_received = now
            study.instance_count = (study.instance_count or 0) + added
        s.flush()
        self._study_ids[header.study_uid] = study.id
        return study.id

    def _series_id(self, s, header: Header, study_id: int) -> int:  # noqa: ANN001
        cached = self._series_ids.get(header.series_uid)
        if cached is not None:
            return cached
        series = s.execute(select(Series).where(Series.series_uid == header.series_uid)
                           ).scalar_one_or_none()
        if series is None:
            meta = header.meta
            series = Series(study_id=study_id, series_uid=header.series_uid,
                            modality=_short(meta.get("Modality"), 16),
                            description=_short(meta.get("SeriesDescription"), 64),
                            body_part=_short(meta.get("BodyPartExamined"), 16),
                            instance_count=0)
            s.add(series)
            s.flush()
        self._series_ids[header.series_uid] = series.id
        return series.id


def _run_now(fn, *args) -> Future:  # noqa: ANN001
    future: Future = Future()
    try:
        future.set_result(fn(*args))
    except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
        future.set_exception(exc)
    return future


def _move_counts(s, old_series_id: int, new_series_id: int) -> None:  # noqa: ANN001
    s.execute(update(Series).where(Series.id == old_series_id)
              .values(instance_count=Series.instance_count - 1))
    s.execute(update(Series).where(Series.id == new_series_id)
              .values(instance_count=Series.instance_count + 1))


def _short(value: Any, length: int) -> str | None:
    if value is None:
        return None
    text = "\\".join(map(str, value)) if isinstance(value, list) else str(value)
    return text[:length]


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove %s: %s", path.name, exc.strerror)
