"""One Celery task per pipeline step; each records its outcome on the job row.

A task gets ``(previous, job_id, token)``: the previous step's small output dict, the job id
and the job's dispatch token. It

1. drops the message (``Ignore``) when the token is not the job's current one or the job is
   finished — a stale copy from before a re-dispatch, or a job superseded by a newer one;
2. marks the job RUNNING with the step and counts the attempt (a step started more than
   ``queue.max_attempts`` times — also by redeliveries after a killed worker — fails the job);
3. calls ``workers.steps.<step>.run(ctx, previous)``;
4. on ``StepError`` fails the job with the reason, no retry; on any other exception retries
   with exponential backoff (``queue.retry_backoff_s`` doubling) up to ``queue.max_attempts``,
   then fails the job with the reason;
5. on success records the step's time and output; the last step marks the job DONE.

Side steps (``queue.side_steps``, e.g. ner) run beside the chain; their output (or their
error: a side step never fails the job) is stored on the job, and the last step of the chain
waits for them before it runs (a join in the outbox row: no Celery result backend needed).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import threading
import time
from datetime import datetime

from celery import Celery, Task
from celery.exceptions import Ignore, Retry
from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError

from node.index import Index, Job, JobState, utcnow
from workers.context import StepContext, StepError

log = logging.getLogger("workers.tasks")

ROLE_MAIN, ROLE_LAST, ROLE_SIDE = "main", "last", "side"
JOIN_POLL_S = 2.0

_indexes: dict[str, Index] = {}
_indexes_lock = threading.Lock()


def get_index(settings) -> Index:  # noqa: ANN001 - Settings
    """One index (engine) per process, created lazily (so never shared across a fork)."""
    url = settings.storage.resolved_index_url
    with _indexes_lock:
        if url not in _indexes:
            from node.index import open_index

            _indexes[url] = open_index(settings)
        return _indexes[url]


def register(app: Celery) -> None:
    from workers.app import STEP_QUEUES, configured_steps

    for step in {*STEP_QUEUES, *configured_steps(app.ichnode_settings)}:
        _register_step(app, step)


class StepTask(Task):
    """Base class of the step tasks: a failure Celery sees (not one the step reported) goes
    back to the outbox instead of leaving the job QUEUED/RUNNING forever."""

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:  # noqa: ANN001
        try:
            job_id, token = args[1], args[2]
        except (IndexError, TypeError):
            return
        with get_index(self.app.ichnode_settings).session() as s:
            job = _locked_job(s, job_id)
            if not _current(job, token):
                return
            what = f"{type(exc).__name__}: {exc}"
            if (kwargs or {}).get("role") == ROLE_SIDE:  # never fails the job: joins as error
                outputs = dict(job.step_outputs or {})
                name = self.name.removeprefix("ichnode.step.")
                outputs["side"] = {**outputs.get("side", {}), name: {"error": what}}
                job.step_outputs = outputs
            elif isinstance(exc, (KombuOperationalError, ConnectionError, OSError)):
                # Typically: the broker went away while the chain was handed to its next
                # step. RECEIVED + reason -> the node's dispatcher sends the job again.
                job.state, job.reason = JobState.RECEIVED, f"hand-over failed ({what}); will retry"
                log.warning("chain hand-over failed, job back to the outbox",
                            extra={"job": job_id, "error": type(exc).__name__})
            else:
                _fail(job, f"{job.step or 'pipeline'}: internal error ({what})")


def _register_step(app: Celery, step: str) -> None:
    from workers.app import task_name

    def step_task(self, previous, job_id, token, role=ROLE_MAIN, join=()):  # noqa: ANN001
        try:
            return execute(self, step, previous, job_id, token, role, list(join))
        except SQLAlchemyError as exc:
            # The index itself failed (locked, server down) while recording: the outcome is
            # unknown to the outbox, so run the message again later instead of losing it.
            log.warning("index error around step, will retry",
                        extra={"job": job_id, "step": step, "error": type(exc).__name__})
            raise self.retry(exc=exc, countdown=max(1.0, self.app.ichnode_settings.queue
                                                    .retry_backoff_s), max_retries=None)

    step_task.__name__ = f"step_{step}"
    # shared=False: Celery would otherwise add these closures to every app created later.
    app.task(name=task_name(step), bind=True, max_retries=None, acks_late=True,
             shared=False, base=StepTask)(step_task)


def _locked_job(s, job_id: int) -> Job | None:  # noqa: ANN001 - Session
    # A write first: takes SQLite's write lock / PostgreSQL's row lock before we read, so a
    # read-modify-write of the JSON columns cannot lose a concurrent side step's update.
    s.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow()))
    return s.get(Job, job_id, populate_existing=True)


def _current(job: Job | None, token: str) -> bool:
    return job is not None and job.celery_id == token and job.state not in (
        JobState.DONE, JobState.FAILED)


def execute(task, step: str, previous, job_id: int, token: str, role: str,  # noqa: ANN001
            join: list[str]) -> dict:
    settings = task.app.ichnode_settings
    index = get_index(settings)
    previous = previous if isinstance(previous, dict) else {}
    if role == ROLE_LAST and join:
        previous = _join(task, index, settings, step, previous, job_id, token, join)
    attempt = _begin(index, settings, step, job_id, token, role, task.request.retries)
    started = time.monotonic()
    ctx = StepContext(settings, index, job_id)
    try:
        module = importlib.import_module(f"workers.steps.{step}")
        out = _plain_json(module.run(ctx, previous) or {})
    except StepError as exc:
        return _step_error(index, step, job_id, token, role, str(exc), started)
    except (Ignore, Retry):
        raise
    except Exception as exc:  # noqa: BLE001 - anything else is worth a retry
        what = f"{type(exc).__name__}: {exc}"
        if attempt >= settings.queue.max_attempts:
            return _step_error(index, step, job_id, token, role,
                               f"{what} (gave up after {attempt} attempts)", started)
        delay = settings.queue.retry_backoff_s * (2 ** (attempt - 1))
        _note(index, job_id, token,
              f"{step} attempt {attempt} failed ({what}); retry in {delay:g} s")
        log.warning("step failed, will retry", extra={
            "job": job_id, "step": step, "attempt": attempt, "error": type(exc).__name__})
        raise task.retry(exc=exc, countdown=delay, max_retries=None)
    _finish(index, step, job_id, token, role, out, time.monotonic() - started)
    return out


def _plain_json(out: dict) -> dict:
    """A step's output as plain JSON (it travels through the broker and into the index)."""
    if not isinstance(out, dict):
        raise StepError(f"step returned {type(out).__name__}, not a dict")

    def default(o):  # noqa: ANN001, ANN202 - numpy scalars/arrays, paths
        if hasattr(o, "tolist"):
            return o.tolist()
        if isinstance(o, os.PathLike):
            return os.fspath(o)
        raise TypeError(f"{type(o).__name__} is not JSON serialisable")

    try:
        return json.loads(json.dumps(out, default=default))
    except (TypeError, ValueError) as exc:
        raise StepError(f"step output is not JSON: {exc}") from exc


def _begin(index: Index, settings, step: str, job_id: int, token: str, role: str,  # noqa: ANN001
           retries: int) -> int:
    """Mark the step started; returns the attempt number. Raises Ignore for stale messages."""
    with index.session() as s:
        job = _locked_job(s, job_id)
        if not _current(job, token):
            log.info("stale message dropped", extra={"job": job_id, "step": step})
            raise Ignore()
        if role == ROLE_SIDE:
            return retries + 1  # side steps count their own retries; the job row is the chain's
        attempts = (job.attempts if job.step == step else 0) + 1
        if attempts > settings.queue.max_attempts:
            _fail(job, f"{step}: started {attempts - 1} times without finishing "
                       "(worker killed or lost)")
            raise Ignore()
        job.state, job.step, job.attempts = JobState.RUNNING, step, attempts
        log.info("step started", extra={"job": job_id, "step": step, "attempt": attempts})
        return attempts


def _fail(job: Job, reason: str) -> None:
    job.state, job.reason, job.finished_at = JobState.FAILED, reason, utcnow()
    log.warning("job failed", extra={"job": job.id, "step": job.step})


def _note(index: Index, job_id: int, token: str, reason: str) -> None:
    with index.session() as s:
        job = _locked_job(s, job_id)
        if _current(job, token):
            job.reason = reason


def _step_error(index: Index, step: str, job_id: int, token: str, role: str, reason: str,
                started: float) -> dict:
    if role == ROLE_SIDE:  # a side step never fails the job: its error joins the last step
        _finish(index, step, job_id, token, role, {"error": reason}, time.monotonic() - started)
        return {}
    with index.session() as s:
        job = _locked_job(s, job_id)
        if _current(job, token):
            _fail(job, f"{step}: {reason}")
    raise Ignore()  # stops the chain


def _finish(index: Index, step: str, job_id: int, token: str, role: str, out: dict,
            seconds: float) -> None:
    with index.session() as s:
        job = _locked_job(s, job_id)
        if not _current(job, token):
            raise Ignore()  # superseded while running: do not continue its chain
        timings = dict(job.timings or {})
        timings[step] = round(seconds, 3)
        outputs = dict(job.step_outputs or {})
        if role == ROLE_SIDE:
            outputs["side"] = {**outputs.get("side", {}), step: out}
        else:
            outputs[step] = out
            job.attempts = 0
            if "work_item" in out:  # the deid step's de-identified work-item folder
                job.work_item = str(out["work_item"])
            if role == ROLE_LAST:
                job.state, job.finished_at, job.reason = JobState.DONE, utcnow(), None
                timings["total"] = round(_seconds_since(job.created_at, job.finished_at), 3)
            else:
                job.state, job.reason = JobState.QUEUED, None  # waits for the next step
        job.timings, job.step_outputs = timings, outputs
    log.info("step done", extra={"job": job_id, "step": step, "seconds": round(seconds, 3),
                                 "done": role == ROLE_LAST})


def _seconds_since(start: datetime, end: datetime) -> float:
    if start.tzinfo is None:  # SQLite gives naive UTC back
        end = end.replace(tzinfo=None)
    return (end - start).total_seconds()


def _join(task, index: Index, settings, step: str, previous: dict, job_id: int,  # noqa: ANN001
          token: str, join: list[str]) -> dict:
    """Wait (by re-scheduling this message) until all side steps stored their output."""
    with index.session() as s:
        job = s.get(Job, job_id)
        if not _current(job, token):
            log.info("stale message dropped", extra={"job": job_id, "step": step})
            raise Ignore()
        side = (job.step_outputs or {}).get("side", {})
    missing = [name for name in join if name not in side]
    if not missing:
        merged = dict(previous)
        for name in join:
            merged.update({k: v for k, v in side[name].items() if k != "error"})
        merged["side"] = {name: side[name] for name in join}
        return merged
    if task.request.retries * JOIN_POLL_S > settings.queue.task_timeout_s:
        with index.session() as s:
            job = _locked_job(s, job_id)
            if _current(job, token):
                _fail(job, f"{step}: side step(s) {', '.join(missing)} did not finish")
        raise Ignore()
    raise task.retry(countdown=JOIN_POLL_S, max_retries=None)
