"""Pseudonyms derived from the node secret, and the original <-> pseudonym rows of the index.

Every pseudonym is an HMAC-SHA256 of the original value under the node secret, so the same
original always gets the same pseudonym on this node (consistent UID remapping across a study,
across re-runs and across worker processes) while nobody without the secret can recompute or
invert it. The index keeps the mapping (PHI zone) to re-link results to the original study.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from node.index import Index, Pseudonym

SECRET_FILE = "deid.secret"
# Per-patient shift into the past, 1..10 years: far enough that dates do not re-identify,
# bounded so that shifted dates stay plausible (year > 1900) for PACS and research tools.
MIN_SHIFT_DAYS = 365
MAX_SHIFT_DAYS = 3650


def load_secret(settings) -> bytes:  # noqa: ANN001 - node.config.Settings
    """The configured secret, or the one generated once and stored under the storage root."""
    configured = settings.deid.secret.get_secret_value()
    if configured:
        return configured.encode("utf-8")
    path = Path(settings.storage.root) / SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: two workers starting at once must not write two different secrets.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_hex(32).encode("ascii"))
        fh.flush()
        os.fsync(fh.fileno())
    return path.read_bytes().strip()


@dataclass(frozen=True)
class Pseudonymizer:
    """Deterministic keyed pseudonyms; ``fixed_shift_days`` overrides the per-patient shift."""

    secret: bytes
    fixed_shift_days: int | None = None

    @classmethod
    def from_settings(cls, settings) -> "Pseudonymizer":  # noqa: ANN001
        return cls(load_secret(settings), settings.deid.date_shift_days)

    def digest(self, kind: str, value: str) -> bytes:
        # The kind is part of the message so a patient ID and a UID with equal text differ.
        return hmac.new(self.secret, f"{kind}\x00{value}".encode("utf-8"), hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """``2.25.<decimal UUID>`` (PS3.5 B.2): at most 44 characters, a valid UI value."""
        return "2.25." + str(uuid.UUID(bytes=self.digest("uid", original)[:16], version=4).int)

    def patient_id(self, original: str) -> str:
        return "ICHN-" + self.digest("patient", original).hex()[:12].upper()

    def work_id(self, study_uid: str, series_uid: str) -> str:
        """Name of the work-item folder: no UID text, only a keyed hash."""
        return "w" + self.digest("work", f"{study_uid}|{series_uid}").hex()[:24]

    def shift_days(self, patient_id: str) -> int:
        """Days added to every date of this patient (negative: into the past)."""
        if self.fixed_shift_days is not None:
            return self.fixed_shift_days
        span = MAX_SHIFT_DAYS - MIN_SHIFT_DAYS + 1
        n = int.from_bytes(self.digest("dateshift", patient_id)[:8], "big")
        return -(MIN_SHIFT_DAYS + n % span)


def shift_da(value: str, days: int) -> str:
    """Shift a DA value (YYYYMMDD); values that are not full dates are emptied."""
    value = value.strip()
    try:
        return (datetime.strptime(value[:8], "%Y%m%d").date() + timedelta(days=days)).strftime(
            "%Y%m%d")
    except ValueError:
        return ""


def shift_dt(value: str, days: int) -> str:
    """Shift the date part of a DT value and keep time and UTC offset (longitudinal intervals)."""
    value = value.strip()
    if len(value) < 8:
        return ""  # a year or year-month alone cannot be shifted by days
    shifted = shift_da(value[:8], days)
    return shifted + value[8:] if shifted else ""


def shift_date(value: date, days: int) -> date:
    return value + timedelta(days=days)


def record(index: Index, study_uid: str, rows: list[tuple[str, str, str]]) -> int:
    """Store (kind, original, pseudonym) rows not yet in the index; returns how many were new.

    Idempotent: a re-run of a job, or two workers on the same study, add nothing twice.
    """
    if not rows:
        return 0
    unique = {(k, o): p for k, o, p in rows}
    for _attempt in range(3):
        try:
            with index.session() as s:
                known = set()
                originals = sorted({o for _k, o in unique})
                for start in range(0, len(originals), 500):
                    chunk = originals[start:start + 500]
                    known |= {(k, o) for k, o in s.execute(
                        select(Pseudonym.kind, Pseudonym.original).where(
                            Pseudonym.original.in_(chunk)))}
                new = [Pseudonym(kind=k, original=o, pseudonym=p, study_uid=study_uid)
                       for (k, o), p in unique.items() if (k, o) not in known]
                s.add_all(new)
            return len(new)
        except IntegrityError:
            continue  # another worker inserted the same rows meanwhile: read again
    raise RuntimeError("could not record pseudonyms after 3 attempts")


def originals_for(index: Index, pseudonym: str) -> list[dict]:
    """Rows whose pseudonym is ``pseudonym`` (PHI: for the PHI zone and its admin only)."""
    with index.session() as s:
        rows = s.execute(select(Pseudonym).where(Pseudonym.pseudonym == pseudonym)).scalars()
        return [{"kind": r.kind, "original": r.original, "pseudonym": r.pseudonym,
                 "study_uid": r.study_uid} for r in rows]


def pseudonyms_for_study(index: Index, study_uid: str) -> list[dict]:
    with index.session() as s:
        rows = s.execute(select(Pseudonym).where(Pseudonym.study_uid == study_uid)
                         .order_by(Pseudonym.kind, Pseudonym.id)).scalars()
        return [{"kind": r.kind, "original": r.original, "pseudonym": r.pseudonym} for r in rows]
