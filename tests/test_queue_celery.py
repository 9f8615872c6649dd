"""Jobs through REAL celery worker processes: embedded filesystem transport and Redis.

The pipeline is shortened to the ``prepare`` step (config ``queue.steps``): these tests are
about the queue mechanics (outbox, late acks, re-dispatch, broker outage), not the models.
To hold a task mid-run deterministically, one spool file is swapped for a named pipe: the
step blocks on opening it until the test puts the real file back.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid

import pytest
import redis
from queue_helpers import (WorkerProcess, block_one_file, free_port, head_study, index_files,
                           job_row, queue_settings, unblock, wait_for)
from sqlalchemy import select

from models.volume import Volume
from node.assembly import Assembler
from node.dispatcher import Dispatcher
from node.index import Instance, JobState, Series, Study, open_index

SLICES = 20
LONG_SLICES = 160


def _new_job(settings, index, tmp_path, slices: int = SLICES) -> tuple[int, dict]:
    uid, specs, paths = head_study(tmp_path / f"in-{uuid.uuid4().hex[:6]}", slices=slices)
    index_files(index, settings, paths, received_ago_s=3600)
    jobs = Assembler(settings, index).complete_due()
    assert len(jobs) == 1
    return jobs[0], specs


def _check_prepared(settings, index, job_id: int, specs, slices: int = SLICES) -> None:
    job = job_row(index, job_id)
    assert job.state == JobState.DONE, job.reason
    assert job.step == "prepare" and job.timings["prepare"] > 0 and job.timings["total"] > 0
    job_dir = settings.storage.root / "jobs" / str(job_id)
    volume = Volume.load(job_dir / "volume.npz")
    assert volume.hu.shape == (slices, 512, 512)
    assert volume.spacing == pytest.approx((5.0, 0.48828125, 0.48828125))
    info = json.loads((job_dir / "series.json").read_text())
    assert info["series_uid"] == specs["soft"].series_uid  # soft tissue, not bone/localizer
    with index.session() as s:
        z = {uid: meta["ImagePositionPatient"][2] for uid, meta in s.execute(
            select(Instance.sop_instance_uid, Instance.meta)).all()}
    zs = [z[sl["sop_instance_uid"]] for sl in info["slices"]]
    assert zs == sorted(zs) and len(zs) == slices  # sorted by position, not InstanceNumber
    assert volume.hu[:, 256, 256].max() >= 35  # brain, not air: pixels really loaded


def _study_uid(index, job_id: int) -> str:
    with index.session() as s:
        return s.get(Study, job_row(index, job_id).study_id).study_uid


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded")
    settings, _, env = queue_settings(root / "var")
    index = open_index(settings)
    worker = WorkerProcess(env, root / "worker.log").start()
    worker.wait_ready()
    yield settings, index, worker, env
    worker.stop()
    index.dispose()


def test_embedded_job_runs_through_real_worker(embedded, tmp_path):
    settings, index, worker, _ = embedded
    job_id, specs = _new_job(settings, index, tmp_path)
    assert Dispatcher(settings, index).dispatch_pending() == 1
    assert job_row(index, job_id).state in (JobState.QUEUED, JobState.RUNNING, JobState.DONE)
    wait_for(lambda: job_row(index, job_id).state in (JobState.DONE, JobState.FAILED), 60,
             what="job done")
    _check_prepared(settings, index, job_id, specs)


def test_step_error_fails_job_with_reason_no_retry(embedded, tmp_path):
    settings, index, worker, _ = embedded
    job_id, _ = _new_job(settings, index, tmp_path)
    with index.session() as s:
        rows = s.execute(select(Instance.path).join(Series).join(Study).where(
            Study.id == job_row(index, job_id).study_id,
            Study.selected_series_uid == Series.series_uid)).scalars().all()
    Dispatcher(settings, index).dispatch_pending()
    wait_for(lambda: job_row(index, job_id).state == JobState.DONE, 60, what="job done")
    # Now the same study with its files gone: a permanent error, reason recorded, 1 attempt.
    for rel in rows:
        (settings.storage.spool_dir / rel).unlink(missing_ok=True)
    job = Assembler(settings, index).reprocess(_study_uid(index, job_id))
    Dispatcher(settings, index).dispatch_pending()
    wait_for(lambda: job_row(index, job.id).state == JobState.FAILED, 60, what="job failed")
    failed = job_row(index, job.id)
    assert failed.reason.startswith("prepare: ") and "missing" in failed.reason
    assert failed.attempts == 1 and failed.finished_at is not None


@pytest.mark.slow
def test_embedded_worker_killed_mid_task_job_rerun(embedded, tmp_path):
    """kill -9 of the supervised embedded worker: it is restarted and the job re-dispatched."""
    from workers.supervisor import WorkerSupervisor

    settings, index, shared_worker, _ = embedded
    shared_worker.stop()  # the supervisor's worker is the only consumer in this test
    dispatcher = Dispatcher(settings, index)
    sup = WorkerSupervisor(settings, on_restart=dispatcher.redispatch_unfinished).start()
    try:
        job_id, specs = _new_job(settings, index, tmp_path)
        fifo, saved = block_one_file(settings, index, job_id)
        dispatcher.dispatch_pending()
        wait_for(lambda: job_row(index, job_id).state == JobState.RUNNING, 60, what="running")
        first_token = job_row(index, job_id).celery_id
        pid = sup.pid
        os.killpg(pid, 9)
        wait_for(lambda: sup.restarts == 1 and sup.pid != pid, 30, what="worker restarted")
        unblock(fifo, saved)
        wait_for(lambda: job_row(index, job_id).state == JobState.DONE, 90, what="job re-run")
        job = job_row(index, job_id)
        assert job.celery_id != first_token  # re-dispatched with a new token
        _check_prepared(settings, index, job_id, specs)
    finally:
        sup.stop()
        shared_worker.start().wait_ready()


def test_restart_redispatches_queued_jobs_and_drops_stale_copies(embedded, tmp_path):
    """Node restart: QUEUED jobs are dispatched again; the old messages are dropped."""
    settings, index, worker, _ = embedded
    worker.stop()
    job_id, specs = _new_job(settings, index, tmp_path)
    Dispatcher(settings, index).dispatch_pending()
    assert job_row(index, job_id).state == JobState.QUEUED
    old_token = job_row(index, job_id).celery_id
    # "Restart": a new dispatcher re-dispatches what was queued (the old message still exists).
    assert Dispatcher(settings, index).redispatch_unfinished() == 1
    assert job_row(index, job_id).celery_id != old_token
    before = worker.log.read_text() if worker.log.exists() else ""
    worker.start().wait_ready()
    wait_for(lambda: job_row(index, job_id).state == JobState.DONE, 60, what="job done")
    _check_prepared(settings, index, job_id, specs)
    wait_for(lambda: "stale message dropped" in worker.log.read_text()[len(before):], 20,
             what="stale copy dropped")
    assert job_row(index, job_id).attempts == 0  # ran once to the end (attempts reset)


def test_transient_error_retried_with_backoff_then_succeeds(embedded, tmp_path):
    settings, index, worker, _ = embedded
    job_id, specs = _new_job(settings, index, tmp_path)
    blocker = settings.storage.root / "jobs" / str(job_id)
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where the job folder belongs")  # mkdir fails: OSError
    Dispatcher(settings, index).dispatch_pending()
    wait_for(lambda: "prepare attempt 1 failed" in (job_row(index, job_id).reason or ""), 60,
             what="first attempt failed")
    assert "FileExistsError" in job_row(index, job_id).reason
    blocker.unlink()
    wait_for(lambda: job_row(index, job_id).state == JobState.DONE, 60, what="retried")
    _check_prepared(settings, index, job_id, specs)


def test_transient_error_gives_up_after_max_attempts(embedded, tmp_path):
    settings, index, worker, _ = embedded
    job_id, _ = _new_job(settings, index, tmp_path)
    blocker = settings.storage.root / "jobs" / str(job_id)
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("x")
    started = time.monotonic()
    Dispatcher(settings, index).dispatch_pending()
    wait_for(lambda: job_row(index, job_id).state == JobState.FAILED, 60, what="failed")
    job = job_row(index, job_id)
    assert job.attempts == settings.queue.max_attempts == 3
    assert "gave up after 3 attempts" in job.reason and "FileExistsError" in job.reason
    # backoff 0.5 s then 1 s between the three attempts
    assert time.monotonic() - started >= 1.5


def test_not_analysed_job_without_report_step_finishes_at_once(embedded, tmp_path):
    from pydicom.uid import generate_uid
    from queue_helpers import SeriesSpec, write_series

    settings, index, _, _ = embedded
    uid = generate_uid()
    paths = write_series(tmp_path / "chest", uid, SeriesSpec(2, "Chest", "B31f", body_part="CHEST",
                                                            size=32))
    index_files(index, settings, paths, received_ago_s=3600)
    [job_id] = Assembler(settings, index).complete_due()
    assert job_row(index, job_id).kind == "not_analysed"
    Dispatcher(settings, index).dispatch_pending()
    job = job_row(index, job_id)
    assert job.state == JobState.DONE
    assert "not analysed" in job.reason and "CHEST" in job.reason


def test_running_job_without_progress_is_dispatched_again(embedded, tmp_path):
    """A job RUNNING past the task time limit (+1 min) lost its worker: sent again."""
    from datetime import timedelta

    from sqlalchemy import update

    from node.index import Job, utcnow

    settings, index, _, _ = embedded
    job_id, specs = _new_job(settings, index, tmp_path)
    with index.session() as s:  # as left behind by a worker host that died mid-step
        s.execute(update(Job).where(Job.id == job_id).values(
            state=JobState.RUNNING, step="prepare", celery_id="lost", attempts=1))
        s.execute(update(Job).where(Job.id == job_id).values(
            updated_at=utcnow() - timedelta(seconds=settings.queue.task_timeout_s + 61)))
    dispatcher = Dispatcher(settings, index)
    assert dispatcher.requeue_stale() == 1
    assert job_row(index, job_id).celery_id != "lost"
    wait_for(lambda: job_row(index, job_id).state == JobState.DONE, 60, what="job done")
    _check_prepared(settings, index, job_id, specs)
    assert dispatcher.requeue_stale() == 0


# ---------------------------------------------------------------- Redis


@pytest.fixture(scope="module")
def redis_queue(tmp_path_factory):
    client = redis.Redis(host="127.0.0.1", port=6379, db=14)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip("Redis not running on 127.0.0.1:6379")
    prefix = f"ichtest-{uuid.uuid4().hex[:8]}-"
    root = tmp_path_factory.mktemp("redis")
    settings, _, env = queue_settings(root / "var", broker_url="redis://127.0.0.1:6379/14",
                                      queue_prefix=prefix)
    index = open_index(settings)
    worker = WorkerProcess(env, root / "worker.log", concurrency=1).start()
    worker.wait_ready()
    yield settings, index, worker
    worker.stop()
    index.dispose()
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


@pytest.mark.redis
def test_redis_job_runs_through_real_worker(redis_queue, tmp_path):
    settings, index, _ = redis_queue
    job_id, specs = _new_job(settings, index, tmp_path)
    assert Dispatcher(settings, index).dispatch_pending() == 1
    wait_for(lambda: job_row(index, job_id).state in (JobState.DONE, JobState.FAILED), 60,
             what="job done")
    _check_prepared(settings, index, job_id, specs)
    keys = redis.Redis(port=6379, db=14).keys(f"{settings.queue.queue_prefix}*")
    assert keys  # our keys carry the prefix (nothing written outside it)


@pytest.mark.redis
def test_redis_pool_process_killed_mid_task_is_redelivered(redis_queue, tmp_path):
    """kill -9 of the process running the task: late ack + reject_on_worker_lost re-run it."""
    settings, index, worker = redis_queue
    job_id, specs = _new_job(settings, index, tmp_path)
    fifo, saved = block_one_file(settings, index, job_id)
    Dispatcher(settings, index).dispatch_pending()
    wait_for(lambda: job_row(index, job_id).state == JobState.RUNNING, 60, what="running")
    token = job_row(index, job_id).celery_id
    unblock(fifo, saved)
    children = worker.children()
    assert children
    for pid in children:
        os.kill(pid, 9)
    wait_for(lambda: job_row(index, job_id).state == JobState.DONE, 90, what="redelivered")
    job = job_row(index, job_id)
    assert job.celery_id == token  # same message redelivered by the broker, no re-dispatch
    assert job.timings["prepare"] > 0
    _check_prepared(settings, index, job_id, specs)


@pytest.mark.redis
def test_queues_are_routed_by_name(tmp_path):
    """A gpu-only worker (another host in production) never takes deid-queue work."""
    prefix = f"ichtest-{uuid.uuid4().hex[:8]}-"
    client = redis.Redis(port=6379, db=14)
    settings, _, env = queue_settings(tmp_path / "var", broker_url="redis://127.0.0.1:6379/14",
                                      queue_prefix=prefix)
    index = open_index(settings)
    worker = WorkerProcess(env, tmp_path / "worker.log", queues="gpu").start()
    try:
        worker.wait_ready()
        job_id, _ = _new_job(settings, index, tmp_path)
        Dispatcher(settings, index).dispatch_pending()
        wait_for(lambda: client.llen(f"{prefix}{prefix}deid") == 1, 10, what="message in deid")
        time.sleep(2)
        assert job_row(index, job_id).state == JobState.QUEUED
        assert client.llen(f"{prefix}{prefix}deid") == 1
        assert b"Task ichnode.step.prepare[" not in worker.log.read_bytes()
    finally:
        worker.stop()
        index.dispose()
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)


@pytest.mark.redis
def test_dead_broker_keeps_job_received_then_it_goes_through(tmp_path):
    """Broker down: jobs stay RECEIVED with a visible reason; once it is up they finish."""
    port = free_port()
    settings, _, env = queue_settings(tmp_path / "var", broker_url=f"redis://127.0.0.1:{port}/0")
    index = open_index(settings)
    job_id, specs = _new_job(settings, index, tmp_path)
    dispatcher = Dispatcher(settings, index)
    started = time.monotonic()
    assert dispatcher.dispatch_pending() == 0
    assert time.monotonic() - started < 15
    job = job_row(index, job_id)
    assert job.state == JobState.RECEIVED and "broker unavailable" in job.reason
    assert dispatcher.tick() == 0  # backing off: no hammering of a dead broker
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = None
    try:
        wait_for(lambda: _ping(port), 10, what="redis up")
        wait_for(lambda: dispatcher.dispatch_pending() == 1, 20, what="dispatched")
        assert job_row(index, job_id).state == JobState.QUEUED
        worker = WorkerProcess(env, tmp_path / "worker.log").start()
        worker.wait_ready()
        wait_for(lambda: job_row(index, job_id).state == JobState.DONE, 60, what="job done")
        assert job_row(index, job_id).reason is None
        _check_prepared(settings, index, job_id, specs)
    finally:
        if worker:
            worker.stop()
        server.terminate()
        server.wait(10)
        index.dispose()


def _ping(port: int) -> bool:
    try:
        return redis.Redis(port=port, socket_connect_timeout=0.5).ping()
    except redis.ConnectionError:
        return False


@pytest.mark.slow
def test_side_step_runs_beside_and_joins_the_last_step(tmp_path):
    """Canvas with ner beside the chain: the last step waits for it, its output is recorded."""
    settings, _, env = queue_settings(tmp_path / "var", side_steps=["ner"])
    index = open_index(settings)
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        worker.wait_ready()
        job_id, specs = _new_job(settings, index, tmp_path)
        Dispatcher(settings, index).dispatch_pending()
        wait_for(lambda: job_row(index, job_id).state in (JobState.DONE, JobState.FAILED), 180,
                 what="job done")
        job = job_row(index, job_id)
        assert job.state == JobState.DONE, job.reason
        assert "ner" in job.step_outputs["side"] and job.timings["ner"] > 0
        assert job.step == "prepare" and job.step_outputs["prepare"]["slices"] == SLICES
    finally:
        worker.stop()
        index.dispose()


@pytest.mark.redis
@pytest.mark.slow
def test_broker_lost_at_chain_hand_over_job_goes_back_to_outbox(tmp_path):
    """Broker killed while step 1 runs: handing the chain to step 2 fails, the job returns
    to RECEIVED with the reason (not stuck QUEUED) and finishes once the broker is back."""
    port = free_port()

    def redis_up() -> subprocess.Popen:
        proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                 "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _ping(port), 10, what="redis up")
        return proc

    settings, _, env = queue_settings(tmp_path / "var", broker_url=f"redis://127.0.0.1:{port}/0",
                                      steps=["prepare", "prepare"])
    index = open_index(settings)
    server = redis_up()
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        worker.wait_ready()
        # A long series keeps step 1 busy for seconds (reading 160 slices, writing the volume),
        # so the broker dies while it runs. (A FIFO cannot hold this step: pydicom must seek.)
        job_id, specs = _new_job(settings, index, tmp_path, slices=LONG_SLICES)
        dispatcher = Dispatcher(settings, index)
        dispatcher.dispatch_pending()
        wait_for(lambda: job_row(index, job_id).state == JobState.RUNNING, 60, interval=0.02,
                 what="running")
        server.kill()
        server.wait(10)
        wait_for(lambda: job_row(index, job_id).state == JobState.RECEIVED, 60,
                 what="back in the outbox")
        assert "hand-over failed" in job_row(index, job_id).reason
        server = redis_up()
        wait_for(lambda: dispatcher.dispatch_pending() == 1, 30, what="dispatched again")
        wait_for(lambda: job_row(index, job_id).state == JobState.DONE, 90, what="job done")
        _check_prepared(settings, index, job_id, specs, slices=LONG_SLICES)
    finally:
        worker.stop()
        server.kill()
        server.wait(10)
        index.dispose()
