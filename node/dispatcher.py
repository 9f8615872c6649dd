"""Hands jobs from the job table (the outbox) to Celery.

* New jobs (RECEIVED) are published as the canvas of :mod:`workers.pipeline` and marked QUEUED.
  Each dispatch writes a fresh token to ``Job.celery_id`` *before* publishing; workers drop
  messages whose token is not the job's current one, so a re-dispatch never runs a job twice.
* A broker that cannot be reached (publish fails) leaves the job RECEIVED with the reason; the
  dispatcher tries again later (backoff up to 30 s) — a job is never lost.
* On start-up (node restart) and after the embedded worker was restarted, jobs QUEUED or
  RUNNING are dispatched again (steps are idempotent, the chain restarts at its first step).
* Sweeps (every ``queue.requeue_after_s / 2``, at most every 30 s) take lost jobs back to the
  outbox with their token cleared, so the old message, should it still arrive, is dropped:
  a job RUNNING without any row update for ``QueueSection.running_lost_after_s`` (its worker
  host died), and a job QUEUED for ``queue.requeue_after_s`` whose token is in no Redis queue
  and no unacknowledged entry (message lost: Redis restarted empty, queue flushed). It must be
  missing in two sweeps in a row: a worker that just popped a message has not yet written its
  unacked entry. Each re-publish is audited and counted (``requeued`` audit events); after
  ``queue.requeue_max`` of them the job fails instead.
* A job that FAILED (bad series, model error, attempts exhausted) gets a follow-up job of kind
  ``not_analysed``: PACS receives a short report saying why, so nobody waits for a result that
  will never come (a triage tool that is silent on failure is unsafe).
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import timedelta

from sqlalchemy import and_, exists, func, select, update
from sqlalchemy.orm import aliased

from node.index import AuditEvent, Index, Job, JobState, Study, utcnow

log = logging.getLogger("node.dispatcher")

MAX_BACKOFF_S = 30.0
SWEEP_INTERVAL_S = 30.0  # at most; shorter when queue.requeue_after_s is short
REQUEUED = "requeued"  # audit outcome of a sweep re-publish: also the per-job counter
UNFINISHED = (JobState.QUEUED, JobState.RUNNING)


class Dispatcher:
    def __init__(self, settings, index: Index, app=None) -> None:  # noqa: ANN001
        self.settings = settings
        self.index = index
        self._app = app
        self._failures = 0
        self._next_try = 0.0
        self._next_sweep = 0.0
        self._missing: dict[int, str] = {}  # QUEUED job -> token missing in the last sweep

    @property
    def app(self):  # noqa: ANN201 - celery.Celery, imported lazily (node start-up cost)
        if self._app is None:
            from workers.app import create_app

            self._app = create_app(self.settings)
        return self._app

    # ------------------------------------------------------------------ loops
    def tick(self) -> int:
        """One dispatcher round (called every ``queue.dispatch_interval_s``)."""
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + self._sweep_interval()
            self.requeue_stale()
            self.requeue_lost()
        if now < self._next_try:
            return 0
        self.report_failures()
        return self.dispatch_pending()

    def dispatch_pending(self, limit: int = 100) -> int:
        """Publish RECEIVED jobs, oldest first; stops at the first broker failure."""
        with self.index.session() as s:
            ids = s.execute(select(Job.id).where(Job.state == JobState.RECEIVED)
                            .order_by(Job.id).limit(limit)).scalars().all()
        done = 0
        for job_id in ids:
            if not self.dispatch(job_id, from_states=(JobState.RECEIVED,)):
                break
            done += 1
        return done

    def redispatch_unfinished(self) -> int:
        """Dispatch QUEUED/RUNNING jobs again (node start-up, embedded worker restart)."""
        with self.index.session() as s:
            ids = s.execute(select(Job.id).where(Job.state.in_(UNFINISHED))
                            .order_by(Job.id)).scalars().all()
        count = sum(1 for job_id in ids if self.dispatch(job_id, from_states=UNFINISHED))
        if ids:
            log.info("unfinished jobs dispatched again", extra={"jobs": len(ids), "ok": count})
        return count

    def report_failures(self) -> int:
        """Create a ``not_analysed`` job for each failed analysis that has no later job."""
        if "report" not in self.settings.queue.steps:
            return 0
        later = aliased(Job)
        with self.index.session() as s:
            failed = s.execute(select(Job).where(
                Job.state == JobState.FAILED, Job.kind != "not_analysed",
                ~exists().where(and_(later.study_id == Job.study_id, later.id > Job.id)),
            )).scalars().all()
            for job in failed:
                study = s.get(Study, job.study_id)
                study.state_reason = f"analysis failed ({job.reason or 'unknown reason'})"[:1000]
                s.add(Job(study_id=job.study_id, kind="not_analysed"))
                s.add(AuditEvent(kind="job", outcome="failure-report", ref=f"job {job.id}"))
        if failed:
            log.info("failed jobs will be reported as not analysed", extra={"jobs": len(failed)})
        return len(failed)

    def _sweep_interval(self) -> float:
        q = self.settings.queue
        interval = SWEEP_INTERVAL_S
        if q.requeue_after_s:  # a short age (tests, impatient sites) is checked as often
            interval = min(interval, q.requeue_after_s / 2)
        return max(q.dispatch_interval_s, interval)

    def requeue_stale(self) -> int:
        """Re-publish RUNNING jobs whose worker vanished (no row update for too long)."""
        limit = self.settings.queue.running_lost_after_s
        cutoff = utcnow() - timedelta(seconds=limit)
        stale = self._quiet_jobs(JobState.RUNNING, cutoff)
        for job_id, token in stale.items():
            self._requeue(job_id, token, JobState.RUNNING, cutoff,
                          f"worker lost (running without progress for over {limit:g} s)")
        return len(stale)

    def requeue_lost(self) -> int:
        """Re-publish QUEUED jobs whose broker message is gone; returns how many were taken
        back (re-published or, past ``queue.requeue_max``, failed)."""
        after = self.settings.queue.requeue_after_s
        if not after:
            return 0
        cutoff = utcnow() - timedelta(seconds=after)
        queued = self._quiet_jobs(JobState.QUEUED, cutoff)
        missing = self._missing_messages(queued)
        if missing is None:
            return 0
        # Confirmed only when missing in the previous sweep too (same token): a message a
        # worker has just popped is invisible until its unacked entry is written.
        confirmed = {j: t for j, t in missing.items() if self._missing.get(j) == t}
        self._missing = missing
        for job_id, token in confirmed.items():
            self._missing.pop(job_id, None)
            self._requeue(job_id, token, JobState.QUEUED, cutoff,
                          f"broker message lost (queued over {after:g} s, in no queue)")
        return len(confirmed)

    def _quiet_jobs(self, state: JobState, cutoff) -> dict[int, str]:  # noqa: ANN001
        """{job id: token} of jobs in ``state`` whose row was not updated since ``cutoff``."""
        with self.index.session() as s:
            rows = s.execute(select(Job.id, Job.celery_id).where(
                Job.state == state, Job.updated_at < cutoff)).all()
        return {job_id: token for job_id, token in rows if token}

    def _missing_messages(self, jobs: dict[int, str]) -> dict[int, str] | None:
        """The jobs whose token has no message in the broker; None when unknown (embedded
        filesystem transport, broker unreachable: then nothing is re-published)."""
        if not jobs:
            return {}
        from workers.app import tokens_in_broker

        try:
            present = tokens_in_broker(self.app, set(jobs.values()))
        except Exception as exc:  # noqa: BLE001 - kombu/redis raise many types for "no broker"
            log.warning("broker not readable, lost-message check skipped",
                        extra={"error": type(exc).__name__})
            return None
        if present is None:
            return None
        return {job_id: token for job_id, token in jobs.items() if token not in present}

    def _requeue(self, job_id: int, token: str, state: JobState, cutoff,  # noqa: ANN001
                 cause: str) -> None:
        """Take a lost job back to the outbox and publish it with a new token, or fail it once
        it was re-published ``queue.requeue_max`` times (a job cannot loop for ever)."""
        reason = self._take_back(job_id, token, state, cutoff, cause)
        if reason is not None:
            self.dispatch(job_id, reason=reason)

    def _take_back(self, job_id: int, token: str, state: JobState, cutoff,  # noqa: ANN001
                   cause: str) -> str | None:
        """One transaction: the job, still as seen (state, token, no update since ``cutoff``),
        goes to RECEIVED without token — from now on its old message is stale — or to FAILED;
        the audit event is the re-publish counter. Returns the reason when re-publishing."""
        limit = self.settings.queue.requeue_max
        with self.index.session() as s:
            done = self._requeue_count(s, job_id)
            if done >= limit:
                reason, outcome = f"{cause}; gave up after {done} re-publishes", "requeue-gave-up"
                values = {"state": JobState.FAILED, "finished_at": utcnow()}
            else:
                reason, outcome = f"{cause}; re-published ({done + 1} of {limit})", REQUEUED
                values = {"state": JobState.RECEIVED, "celery_id": None, "queued_at": None}
            claimed = s.execute(update(Job).where(
                Job.id == job_id, Job.state == state, Job.celery_id == token,
                Job.updated_at < cutoff).values(reason=reason, **values)).rowcount
            if claimed != 1:
                return None  # a worker moved it meanwhile: not lost after all
            s.add(AuditEvent(kind="job", outcome=outcome, ref=f"job {job_id}", detail=cause))
        log.warning("lost job re-published" if outcome == REQUEUED else "lost job failed",
                    extra={"job": job_id, "was": state.value, "reason": reason})
        return reason if outcome == REQUEUED else None

    @staticmethod
    def _requeue_count(s, job_id: int) -> int:  # noqa: ANN001 - Session
        return s.execute(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.kind == "job", AuditEvent.outcome == REQUEUED,
            AuditEvent.ref == f"job {job_id}")).scalar_one()

    # ------------------------------------------------------------------ one job
    def dispatch(self, job_id: int, *, from_states=(JobState.RECEIVED,),  # noqa: ANN001
                 steps: list[str] | None = None, reason: str | None = None) -> bool:
        """Publish one job; False when the broker failed (job left RECEIVED with the reason).
        ``reason`` stays on the queued job (e.g. why it was re-published)."""
        from workers.pipeline import build

        token = uuid.uuid4().hex
        with self.index.session() as s:
            claimed = s.execute(update(Job).where(Job.id == job_id, Job.state.in_(from_states))
                                .values(celery_id=token, state=JobState.QUEUED, reason=reason,
                                        queued_at=utcnow(), step_outputs=None)).rowcount
            if claimed != 1:
                return True  # finished or taken meanwhile: nothing to do
            job = s.get(Job, job_id)
            kind = job.kind
            study_reason = s.get(Study, job.study_id).state_reason
        canvas = build(self.app, self.settings, job_id, token, kind, steps=steps)
        if canvas is None:
            self._finish_empty(job_id, token, kind, study_reason)
            return True
        try:
            self._check_broker()
            canvas.apply_async(retry=False)
        except Exception as exc:  # noqa: BLE001 - kombu/redis raise many types for "no broker"
            self._broker_failed(job_id, token, exc)
            return False
        self._failures, self._next_try = 0, 0.0
        self.index.audit("job", "queued", ref=f"job {job_id}")
        log.info("job queued", extra={"job": job_id, "kind": kind, "reason": reason})
        return True

    def _check_broker(self) -> None:
        # Fail fast when the broker is down: kombu's default channel would otherwise retry
        # the connection for several seconds per job. Then declare our queues: a Redis that
        # restarted empty has no exchange->queue bindings, and kombu silently drops a message
        # published without a route (measured: the job would sit QUEUED with no message).
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2,
                                   timeout=3)
            channel = conn.default_channel
            for queue in self.app.conf.task_queues:
                queue(channel).declare()

    def _broker_failed(self, job_id: int, token: str, exc: Exception) -> None:
        reason = f"broker unavailable ({type(exc).__name__}: {exc}); will retry"
        with self.index.session() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.celery_id == token,
                                        Job.state == JobState.QUEUED)
                      .values(state=JobState.RECEIVED, reason=reason[:500], queued_at=None))
            s.add(AuditEvent(kind="job", outcome="broker-failed", ref=f"job {job_id}",
                             detail=type(exc).__name__))
        self._failures += 1
        delay = min(MAX_BACKOFF_S, self.settings.queue.dispatch_interval_s * 2 ** self._failures)
        self._next_try = time.monotonic() + delay
        log.warning("broker unavailable, job stays received",
                    extra={"job": job_id, "error": type(exc).__name__, "retry_in_s": delay})

    def _finish_empty(self, job_id: int, token: str, kind: str,
                      study_reason: str | None) -> None:
        if kind == "not_analysed":
            reason = (f"not analysed ({study_reason or 'no usable series'}); "
                      "no report step configured")
        else:
            reason = "no pipeline steps configured (queue.steps is empty)"
        with self.index.session() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.celery_id == token).values(
                state=JobState.DONE, finished_at=utcnow(), reason=reason))
