"""Hands jobs from the job table (the outbox) to Celery.

* New jobs (RECEIVED) are published as the canvas of :mod:`workers.pipeline` and marked QUEUED.
  Each dispatch writes a fresh token to ``Job.celery_id`` *before* publishing; workers drop
  messages whose token is not the job's current one, so a re-dispatch never runs a job twice.
* A broker that cannot be reached (publish fails) leaves the job RECEIVED with the reason; the
  dispatcher tries again later (backoff up to 30 s) — a job is never lost.
* On start-up (node restart) and after the embedded worker was restarted, jobs QUEUED or
  RUNNING are dispatched again (steps are idempotent, the chain restarts at its first step).
* A job RUNNING without any update for longer than the task time limit plus a minute is
  considered lost (its worker died with the message) and is dispatched again.
* A job that FAILED (bad series, model error, attempts exhausted) gets a follow-up job of kind
  ``not_analysed``: PACS receives a short report saying why, so nobody waits for a result that
  will never come (a triage tool that is silent on failure is unsafe).
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import timedelta

from sqlalchemy import and_, exists, select, update
from sqlalchemy.orm import aliased

from node.index import AuditEvent, Index, Job, JobState, Study, utcnow

log = logging.getLogger("node.dispatcher")

MAX_BACKOFF_S = 30.0
STALE_GRACE_S = 60.0
UNFINISHED = (JobState.QUEUED, JobState.RUNNING)


class Dispatcher:
    def __init__(self, settings, index: Index, app=None) -> None:  # noqa: ANN001
        self.settings = settings
        self.index = index
        self._app = app
        self._failures = 0
        self._next_try = 0.0
        self._next_stale_check = 0.0

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
        if now >= self._next_stale_check:
            self._next_stale_check = now + 30.0
            self.requeue_stale()
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

    def requeue_stale(self) -> int:
        limit = self.settings.queue.task_timeout_s + STALE_GRACE_S
        cutoff = utcnow() - timedelta(seconds=limit)
        with self.index.session() as s:
            ids = s.execute(select(Job.id).where(Job.state == JobState.RUNNING,
                                                 Job.updated_at < cutoff)).scalars().all()
        for job_id in ids:
            log.warning("running job without progress, dispatching again", extra={"job": job_id})
            self.dispatch(job_id, from_states=(JobState.RUNNING,))
        return len(ids)

    # ------------------------------------------------------------------ one job
    def dispatch(self, job_id: int, *, from_states=(JobState.RECEIVED,),  # noqa: ANN001
                 steps: list[str] | None = None) -> bool:
        """Publish one job; False when the broker failed (job left RECEIVED with the reason)."""
        from workers.pipeline import build

        token = uuid.uuid4().hex
        with self.index.session() as s:
            claimed = s.execute(update(Job).where(Job.id == job_id, Job.state.in_(from_states))
                                .values(celery_id=token, state=JobState.QUEUED, reason=None,
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
        log.info("job queued", extra={"job": job_id, "kind": kind})
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
