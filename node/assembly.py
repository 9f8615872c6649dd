"""Study assembly: when a study is complete, which series it gets, and when it gets a job.

Intake (``node.spool``) sets a study to RECEIVING with ``last_received`` on every new instance,
also when the study was already completed ("late instances re-open it"). The assembler looks
for RECEIVING studies that had no new instance for ``assembly.quiet_period_s``, runs series
selection (:mod:`node.selection`), records the log and the state (SELECTED or SKIPPED with the
reason) and creates a job row (the outbox, dispatched by :mod:`node.dispatcher`).

Job rule (also for re-opened studies): a job is created when the study's *selection key*
differs from the one of its last job. The key is the selected series UID, its slice count and
the newest ``received_at`` of that series' instances — or ``skipped:<reason>`` for a study
without a usable series. So a late slice (or a re-sent, changed slice) of the analysed series
gives a new job, a late unrelated series (dose report, our own SR echoed back) does not, and a
skipped study that later receives a usable head series gets an ``analyze`` job. When a new job
is created, older unfinished jobs of the study are failed as "superseded" (their queued
messages are then dropped by the workers).

Skipped studies get a job of kind ``not_analysed``: its pipeline is only the ``report`` step,
which tells PACS why nothing was analysed (the reason is ``Study.state_reason``). Without a
configured report step such a job finishes at once (see :mod:`node.dispatcher`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from node.index import AuditEvent, Index, Instance, Job, JobState, Series, Study, StudyState, utcnow
from node.logs import uid_ref
from node.selection import Selection, SeriesInput, select_series

log = logging.getLogger("node.assembly")

KIND_ANALYZE = "analyze"
KIND_NOT_ANALYSED = "not_analysed"
UNFINISHED = (JobState.RECEIVED, JobState.QUEUED, JobState.RUNNING)


def series_inputs(session: Session, study_id: int) -> tuple[list[SeriesInput], dict[str, datetime]]:
    """The study's series as selection sees them, plus each series' newest ``received_at``."""
    rows = session.execute(
        select(Series.series_uid, Series.modality, Series.description, Series.body_part,
               Instance.sop_class_uid, Instance.meta, Instance.received_at)
        .join(Instance, Instance.series_id == Series.id)
        .where(Series.study_id == study_id)).all()
    metas: dict[str, list[dict]] = defaultdict(list)
    heads: dict[str, tuple] = {}
    newest: dict[str, datetime] = {}
    for uid, modality, desc, body, sop_class, meta, received in rows:
        metas[uid].append({**(meta or {}), "SOPClassUID": sop_class})
        heads[uid] = (modality, desc, body)
        if uid not in newest or received > newest[uid]:
            newest[uid] = received
    inputs = [SeriesInput(uid, metas[uid], *heads[uid]) for uid in sorted(metas)]
    return inputs, newest


def selection_key(selection: Selection, newest: dict[str, datetime]) -> str:
    if selection.selected_series_uid is None:
        return selection.key
    stamp = newest[selection.selected_series_uid]
    return f"{selection.key}:{stamp.isoformat()}"


class Assembler:
    """Completes quiet studies, selects their series and creates jobs."""

    def __init__(self, settings, index: Index) -> None:  # noqa: ANN001 - Settings
        self.settings = settings
        self.index = index

    def complete_due(self, now: datetime | None = None) -> list[int]:
        """Complete every study quiet for the quiet period; returns the ids of new jobs."""
        cutoff = (now or utcnow()) - timedelta(seconds=self.settings.assembly.quiet_period_s)
        with self.index.session() as s:
            due = s.execute(select(Study.id).where(Study.state == StudyState.RECEIVING,
                                                   Study.last_received <= cutoff)
                            .order_by(Study.last_received)).scalars().all()
        jobs = []
        for study_id in due:
            job_id = self._complete(study_id, cutoff)
            if job_id is not None:
                jobs.append(job_id)
        return jobs

    def _complete(self, study_id: int, cutoff: datetime) -> int | None:
        with self.index.session() as s:
            # Claim the study first: the conditional UPDATE fails if an instance arrived since
            # we looked (intake moved last_received), and it holds the row until commit.
            claimed = s.execute(update(Study).where(
                Study.id == study_id, Study.state == StudyState.RECEIVING,
                Study.last_received <= cutoff).values(state=StudyState.COMPLETE)).rowcount
            if claimed != 1:
                return None
            study = s.get(Study, study_id)
            job = self._select_and_plan(s, study, force=False)
            s.flush()
            return job.id if job else None

    def _select_and_plan(self, s: Session, study: Study, *, force: bool) -> Job | None:
        inputs, newest = series_inputs(s, study.id)
        a = self.settings.assembly
        selection = select_series(inputs, min_slices=a.min_slices,
                                  max_thickness_mm=a.max_slice_thickness_mm)
        key = selection_key(selection, newest)
        previous_key = (study.selection_log or {}).get("key")
        has_job = s.execute(select(Job.id).where(Job.study_id == study.id).limit(1)).first()
        study.selection_log = {**selection.as_log(), "key": key}
        study.selected_series_uid = selection.selected_series_uid
        if selection.selected_series_uid:
            study.state, study.state_reason = StudyState.SELECTED, selection.reason
        else:
            study.state, study.state_reason = StudyState.SKIPPED, selection.reason
        ref = uid_ref(study.study_uid)
        if has_job and key == previous_key and not force:
            log.info("study re-completed, selection unchanged: no new job",
                     extra={"study": ref, "state": study.state.value})
            return None
        kind = KIND_ANALYZE if selection.selected_series_uid else KIND_NOT_ANALYSED
        job = Job(study_id=study.id, kind=kind, state=JobState.RECEIVED)
        s.add(job)
        s.flush()
        superseded = s.execute(update(Job).where(
            Job.study_id == study.id, Job.id != job.id, Job.state.in_(UNFINISHED)).values(
            state=JobState.FAILED, reason=f"superseded by job {job.id}",
            finished_at=utcnow())).rowcount
        s.add(AuditEvent(kind="job", outcome="created", ref=f"job {job.id}",
                         detail=f"study {ref} kind={kind} superseded={superseded}"))
        log.info("study complete", extra={"study": ref, "state": study.state.value, "job": job.id,
                                          "kind": kind, "series": len(inputs),
                                          "superseded": superseded})
        return job

    def reprocess(self, study_uid: str) -> Job:
        """A new job for a stored study (selection is run again). LookupError/ValueError."""
        with self.index.session() as s:
            study = s.execute(select(Study).where(Study.study_uid == study_uid)
                              ).scalar_one_or_none()
            if study is None:
                raise LookupError("no such study in the index")
            if study.state == StudyState.RECEIVING:
                raise ValueError("study is still receiving instances; it gets a job when complete")
            job = self._select_and_plan(s, study, force=True)
            s.flush()
            return job
