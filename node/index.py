"""The node's index: what was received, what is to be done, what was sent (SQLAlchemy 2).

SQLite by default (WAL, one file under the storage root), PostgreSQL by URL. The ``jobs`` and
``sends`` tables are the outbox: they are the source of truth, Celery only carries the work.
"""

from __future__ import annotations

import enum
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Iterator

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True), dict: JSON}


class StudyState(str, enum.Enum):
    RECEIVING = "receiving"  # instances arriving; quiet period not yet over
    COMPLETE = "complete"  # quiet period over, series selection pending
    SELECTED = "selected"  # a series was selected, a job exists
    SKIPPED = "skipped"  # not a usable head CT (reason recorded)


class JobState(str, enum.Enum):
    RECEIVED = "received"  # created, not yet handed to the broker
    QUEUED = "queued"  # handed to the broker
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"  # attempts exhausted or a permanent error; reason recorded


class SendState(str, enum.Enum):
    PENDING = "pending"
    SENT = "sent"  # C-STORE success from the peer
    COMMITTED = "committed"  # Storage Commitment confirmed
    FAILED = "failed"


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    # PHI-zone columns: never logged, never leave the node except to PACS.
    patient_id: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    state: Mapped[StudyState] = mapped_column(Enum(StudyState, native_enum=False, length=16),
                                              default=StudyState.RECEIVING, index=True)
    state_reason: Mapped[str | None] = mapped_column(Text)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    first_received: Mapped[datetime] = mapped_column(default=utcnow)
    last_received: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    selected_series_uid: Mapped[str | None] = mapped_column(String(64))
    selection_log: Mapped[dict | None] = mapped_column(JSON)  # reason for every series decision
    priority: Mapped[str | None] = mapped_column(String(16))  # STAT / URGENT / ROUTINE
    priority_flags: Mapped[dict | None] = mapped_column(JSON)
    results: Mapped[dict | None] = mapped_column(JSON)  # analysis summary (no PHI)
    entities: Mapped[dict | None] = mapped_column(JSON)  # NER output
    priority_pushed_at: Mapped[datetime | None] = mapped_column()

    series: Mapped[list["Series"]] = relationship(back_populates="study", cascade="all, delete-orphan")
    jobs: Mapped[list["Job"]] = relationship(back_populates="study", cascade="all, delete-orphan")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    description: Mapped[str | None] = mapped_column(String(64))
    body_part: Mapped[str | None] = mapped_column(String(16))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list["Instance"]] = relationship(back_populates="series",
                                                       cascade="all, delete-orphan")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)  # relative to the spool folder
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Geometry/selection attributes copied at intake so selection never re-reads files.
    meta: Mapped[dict | None] = mapped_column(JSON)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """One pipeline run for one study (outbox row). Celery carries only the job id."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32), default="analyze")
    state: Mapped[JobState] = mapped_column(Enum(JobState, native_enum=False, length=16),
                                            default=JobState.RECEIVED, index=True)
    step: Mapped[str | None] = mapped_column(String(32))  # current/last pipeline step
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str | None] = mapped_column(Text)
    celery_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    work_item: Mapped[str | None] = mapped_column(Text)  # folder with the de-identified work item
    timings: Mapped[dict | None] = mapped_column(JSON)
    # Small JSON outputs of finished steps (side steps such as ner join the last step here).
    step_outputs: Mapped[dict | None] = mapped_column(JSON)

    study: Mapped[Study] = relationship(back_populates="jobs")


class Send(Base):
    """One file (or set) to deliver to one destination: the SCU outbox."""

    __tablename__ = "sends"
    __table_args__ = (UniqueConstraint("destination", "sop_instance_uid", name="uq_send_dest_sop"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    destination: Mapped[str] = mapped_column(String(64), index=True)
    path: Mapped[str] = mapped_column(Text)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    study_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    purpose: Mapped[str] = mapped_column(String(32), default="manual")  # results/original/defaced
    state: Mapped[SendState] = mapped_column(Enum(SendState, native_enum=False, length=16),
                                             default=SendState.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    last_status: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column()
    committed_at: Mapped[datetime | None] = mapped_column()


class AuditEvent(Base):
    """Who did what when: associations, instances, jobs, sends. No patient identity in here."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)  # association, instance, job, send, ...
    outcome: Mapped[str] = mapped_column(String(16))  # ok, rejected, failed, ...
    peer: Mapped[str | None] = mapped_column(String(64))  # calling AE @ address
    ref: Mapped[str | None] = mapped_column(String(80))  # hashed UID, job id, send id
    detail: Mapped[str | None] = mapped_column(Text)


class Pseudonym(Base):
    """Original ↔ pseudonym mapping (PHI zone only): re-links results to the original study."""

    __tablename__ = "pseudonyms"
    __table_args__ = (UniqueConstraint("kind", "original", name="uq_pseudo_kind_orig"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # uid, patient_id, accession
    original: Mapped[str] = mapped_column(String(128))
    pseudonym: Mapped[str] = mapped_column(String(128), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Original Study Instance UID the row belongs to (deid area): list/purge a study's mapping.
    study_uid: Mapped[str | None] = mapped_column(String(64), index=True)


class ClinicalText(Base):
    """Free text about a patient/study (HL7 MLLP, DICOM, CLI) waiting for or linked to a study."""

    __tablename__ = "clinical_texts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(16))  # hl7, dicom, cli
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    study_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    text: Mapped[str] = mapped_column(Text)
    entities: Mapped[dict | None] = mapped_column(JSON)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class Index:
    """Engine + session factory for one index URL."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        kwargs: dict = {"echo": echo, "pool_pre_ping": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create_all(self) -> None:
        Base.metadata.create_all(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: commits on success, rolls back on any error."""
        with self._sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def audit(self, kind: str, outcome: str, *, peer: str | None = None, ref: str | None = None,
              detail: str | None = None) -> None:
        with self.session() as s:
            s.add(AuditEvent(kind=kind, outcome=outcome, peer=peer, ref=ref, detail=detail))

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001
    # WAL lets the SCP write while the CLI and workers read; FULL sync = durable acknowledgement.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def open_index(settings) -> Index:  # noqa: ANN001 - Settings, avoid import cycle
    """Open (and create if needed) the index named by the settings."""
    settings.storage.root.mkdir(parents=True, exist_ok=True)
    index = Index(settings.storage.resolved_index_url)
    index.create_all()
    return index
