"""Recovery of lost jobs by the dispatcher's sweeps, with real Redis and real celery workers.

* A QUEUED job whose message vanished from the broker (Redis restarted empty, queue flushed)
  is re-published with a new token after ``queue.requeue_after_s``; the old message, should
  it still arrive, is dropped as stale: the study gets exactly one result.
* A job waiting in a backlog, or held (unacknowledged) by a worker, is never re-published.
* Re-publishing is bounded by ``queue.requeue_max``; then the job fails with the reason.
* A worker host that dies mid-step (no ack, no reject: the message stays in Redis' unacked
  hash) leaves a RUNNING job; it is re-published after ``running_lost_after_s`` and the old
  message, restored by Redis' visibility timeout later, is dropped.

Pipeline = ``prepare`` only (mechanics, not models). Redis db 14 with a random key prefix,
removed afterwards. Ages are simulated by back-dating ``Job.updated_at``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from queue_helpers import (WorkerProcess, block_one_file, head_study, index_files, job_row,
                           queue_settings, unblock, wait_for)
from sqlalchemy import func, select, update

from node.assembly import Assembler
from node.dispatcher import Dispatcher
from node.index import AuditEvent, Job, JobState, open_index, utcnow
from workers.app import _message_body

REDIS_DB = 14
SLICES = 20


# ---------------------------------------------------------------- helpers


class RedisNode:
    """Settings, index and Redis keys of one test's node (own key prefix)."""

    def __init__(self, root: Path, client: redis.Redis, **queue) -> None:
        self.prefix = f"ichtest-rec-{uuid.uuid4().hex[:8]}-"
        self.root, self.client = root, client
        self.settings, _, self.env = queue_settings(
            root / "var", broker_url=f"redis://127.0.0.1:6379/{REDIS_DB}",
            queue_prefix=self.prefix, **queue)
        self.index = open_index(self.settings)
        # kombu prefixes every key, and our queue names carry the prefix too.
        self.queue_key = f"{self.prefix}{self.prefix}deid"
        self.unacked_key = f"{self.prefix}unacked"
        self.workers: list[WorkerProcess] = []

    def worker(self, name: str) -> WorkerProcess:
        worker = WorkerProcess(self.env, self.root / f"{name}.log").start()
        self.workers.append(worker)
        worker.wait_ready()
        return worker

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.index.dispose()
        for key in self.client.scan_iter(f"{self.prefix}*"):
            self.client.delete(key)


@pytest.fixture
def redis_node(tmp_path):
    client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip("Redis not running on 127.0.0.1:6379")
    nodes: list[RedisNode] = []

    def make(**queue) -> RedisNode:
        nodes.append(RedisNode(tmp_path / f"node{len(nodes)}", client, **queue))
        return nodes[-1]

    yield make
    for node in nodes:
        node.close()
    assert not list(client.scan_iter("ichtest-rec-*"))  # nothing of ours left in Redis


def _new_job(settings, index, folder: Path) -> int:
    _, _, paths = head_study(folder / f"in-{uuid.uuid4().hex[:6]}", slices=SLICES)
    index_files(index, settings, paths, received_ago_s=3600)
    [job_id] = Assembler(settings, index).complete_due()
    return job_id


def _age(index, job_id: int, seconds: float) -> None:
    """Pretend nothing touched the job row for ``seconds``."""
    with index.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(
            updated_at=utcnow() - timedelta(seconds=seconds)))


def _audits(index, job_id: int, outcome: str) -> int:
    with index.session() as s:
        return s.execute(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.outcome == outcome, AuditEvent.ref == f"job {job_id}")).scalar_one()


def _worker_lines(worker: WorkerProcess, msg: str, job_id: int) -> int:
    """How many JSON log lines of this worker say ``msg`` about this job."""
    count = 0
    for line in worker.log.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # celery's own plain-text lines
        count += isinstance(rec, dict) and rec.get("msg") == msg and rec.get("job") == job_id
    return count


def _task_id(raw: bytes) -> str:
    """Celery task id of a stored message (a queue entry, or an unacked ``[message, ...]``)."""
    data = json.loads(raw)
    return (data[0] if isinstance(data, list) else data)["headers"]["id"]


def _task_outcomes(worker: WorkerProcess) -> dict[str, str]:
    """{task id: 'succeeded' | 'ignored' | ...} from celery's trace lines in the worker log."""
    outcomes = {}
    for line in worker.log.read_text(errors="replace").splitlines():
        found = re.search(r'"msg": "Task [\w.]+\[([0-9a-f-]+)\] (\w+)', line)
        if found and found.group(2) != "received":
            outcomes[found.group(1)] = found.group(2)
    return outcomes


def _check_done_once(node: RedisNode, job_id: int, worker: WorkerProcess) -> Job:
    job = job_row(node.index, job_id)
    assert job.state == JobState.DONE, job.reason
    assert job.reason is None and job.timings["prepare"] > 0
    assert (node.settings.storage.root / "jobs" / str(job_id) / "volume.npz").exists()
    assert _worker_lines(worker, "step started", job_id) == 1
    return job


def _sweep_until(dispatcher: Dispatcher, index, job_id: int, old_token: str) -> Job:
    """Run the dispatcher loop as ``serve`` does until the job has a new token."""
    def republished():
        dispatcher.tick()
        return job_row(index, job_id).celery_id not in (old_token, None)

    wait_for(republished, 15, interval=0.2, what="lost job re-published")
    return job_row(index, job_id)


def _assert_old_dropped_new_ran(node, job_id: int, worker, old_id: str, new_id: str) -> None:  # noqa: ANN001
    """Both messages reach ``worker``: the old one is dropped as stale, the new one runs once."""
    wait_for(lambda: job_row(node.index, job_id).state in (JobState.DONE, JobState.FAILED), 60,
             what="job done")
    wait_for(lambda: node.client.llen(node.queue_key) == 0
             and node.client.hlen(node.unacked_key) == 0, 10, what="both messages acknowledged")
    _check_done_once(node, job_id, worker)
    assert _worker_lines(worker, "stale message dropped", job_id) == 1
    assert _task_outcomes(worker) == {old_id: "ignored", new_id: "succeeded"}


# ---------------------------------------------------------------- lost message


@pytest.mark.redis
def test_lost_message_is_republished_and_the_study_runs_once(redis_node, tmp_path):
    node = redis_node(requeue_after_s=2.0)
    job_id = _new_job(node.settings, node.index, tmp_path)
    dispatcher = Dispatcher(node.settings, node.index)
    assert dispatcher.dispatch_pending() == 1
    old_token = job_row(node.index, job_id).celery_id
    [old_message] = node.client.lrange(node.queue_key, 0, -1)
    assert old_token in _message_body(old_message)
    node.client.delete(node.queue_key)  # lost: Redis restarted without persistence / flushed
    _age(node.index, job_id, 3)

    job = _sweep_until(dispatcher, node.index, job_id, old_token)
    assert job.state == JobState.QUEUED and job.step is None  # no worker started it
    assert job.reason.startswith("broker message lost") and "re-published (1 of 3)" in job.reason
    assert _audits(node.index, job_id, "requeued") == 1
    [new_message] = node.client.lrange(node.queue_key, 0, -1)
    assert job.celery_id in _message_body(new_message)
    old_id, new_id = _task_id(old_message), _task_id(new_message)

    # The old message turns up after all (e.g. a replica that had it), at the head of the
    # queue: the worker takes it first and must drop it (its token is no longer the job's).
    node.client.rpush(node.queue_key, old_message)
    worker = node.worker("worker")
    _assert_old_dropped_new_ran(node, job_id, worker, old_id, new_id)
    assert dispatcher.requeue_lost() == 0 and _audits(node.index, job_id, "requeued") == 1


@pytest.mark.redis
def test_waiting_or_held_messages_are_never_republished(redis_node, tmp_path):
    """A job in a backlog (message in the queue) or taken by a worker (message in the unacked
    hash) is left alone however long it waits; only a message found nowhere, twice, counts."""
    node = redis_node(requeue_after_s=1.0)
    job_id = _new_job(node.settings, node.index, tmp_path)
    dispatcher = Dispatcher(node.settings, node.index)
    dispatcher.dispatch_pending()
    token = job_row(node.index, job_id).celery_id
    node.client.lpush(node.queue_key, b"not a kombu message")  # a foreign entry is ignored
    _age(node.index, job_id, 600)
    assert [dispatcher.requeue_lost() for _ in range(3)] == [0, 0, 0]  # waiting in the queue

    # A worker took it (kombu's layout: unacked[tag] = [message, exchange, routing key]).
    raw = node.client.rpop(node.queue_key)
    assert token in _message_body(raw)
    deid = f"{node.prefix}deid"
    node.client.hset(node.unacked_key, "tag-1", json.dumps([json.loads(raw), deid, deid]))
    assert [dispatcher.requeue_lost() for _ in range(3)] == [0, 0, 0]
    assert job_row(node.index, job_id).celery_id == token

    node.client.delete(node.unacked_key)  # now it is nowhere
    assert dispatcher.requeue_lost() == 0  # first sighting: could be in a worker's hands
    assert dispatcher.requeue_lost() == 1
    job = job_row(node.index, job_id)
    assert job.state == JobState.QUEUED and job.celery_id != token
    assert _audits(node.index, job_id, "requeued") == 1


@pytest.mark.redis
def test_republishing_is_bounded_then_the_job_fails(redis_node, tmp_path):
    node = redis_node(requeue_after_s=1.0, requeue_max=2)
    job_id = _new_job(node.settings, node.index, tmp_path)
    dispatcher = Dispatcher(node.settings, node.index)
    dispatcher.dispatch_pending()
    for n in (1, 2):
        node.client.delete(node.queue_key)
        _age(node.index, job_id, 5)
        assert [dispatcher.requeue_lost(), dispatcher.requeue_lost()] == [0, 1]
        job = job_row(node.index, job_id)
        assert job.state == JobState.QUEUED and f"re-published ({n} of 2)" in job.reason
        assert node.client.llen(node.queue_key) == 1
    node.client.delete(node.queue_key)
    _age(node.index, job_id, 5)
    assert [dispatcher.requeue_lost(), dispatcher.requeue_lost()] == [0, 1]
    job = job_row(node.index, job_id)
    assert job.state == JobState.FAILED and job.finished_at is not None
    assert job.reason.startswith("broker message lost") and "gave up after 2 re-publishes" \
        in job.reason
    assert _audits(node.index, job_id, "requeued") == 2
    assert _audits(node.index, job_id, "requeue-gave-up") == 1
    assert node.client.llen(node.queue_key) == 0  # failed, not published again
    assert dispatcher.requeue_lost() == 0


# ---------------------------------------------------------------- dead worker host


@pytest.mark.redis
@pytest.mark.slow
def test_dead_worker_host_job_is_redone_exactly_once(redis_node, tmp_path):
    """Power loss of the worker host mid-step: no ack, no reject. The node re-publishes the
    RUNNING job once it is silent past ``running_lost_after_s``; the old message, restored by
    Redis' visibility timeout much later, is dropped by the new worker."""
    node = redis_node()
    q = node.settings.queue
    job_id = _new_job(node.settings, node.index, tmp_path)
    fifo, saved = block_one_file(node.settings, node.index, job_id)
    dead = node.worker("dead-host")
    dispatcher = Dispatcher(node.settings, node.index)
    dispatcher.dispatch_pending()
    wait_for(lambda: job_row(node.index, job_id).state == JobState.RUNNING, 60, what="running")
    old_token = job_row(node.index, job_id).celery_id
    os.killpg(dead.proc.pid, signal.SIGKILL)  # the whole host: main process and pool
    dead.proc.wait(10)
    [held] = node.client.hvals(node.unacked_key)  # the message stays with the dead host
    assert node.client.llen(node.queue_key) == 0
    assert dispatcher.requeue_stale() == 0  # not silent long enough yet
    assert dispatcher.requeue_lost() == 0  # RUNNING is not the lost-message sweep's business

    _age(node.index, job_id, q.running_lost_after_s + 5)
    assert dispatcher.requeue_stale() == 1
    job = job_row(node.index, job_id)
    assert job.state == JobState.QUEUED and job.celery_id != old_token
    [new_message] = node.client.lrange(node.queue_key, 0, -1)
    old_id, new_id = _task_id(held), _task_id(new_message)
    assert job.reason.startswith("worker lost") and "re-published (1 of 3)" in job.reason
    assert _audits(node.index, job_id, "requeued") == 1

    # Later, Redis' visibility timeout expires (kombu's own restore, run here at once): the
    # dead host's message goes back to the head of the queue, before the re-published one.
    assert q.broker_visibility_timeout_s > q.running_lost_after_s
    from kombu import Connection

    with Connection(node.settings.broker_url, transport_options={
            "global_keyprefix": node.prefix, "visibility_timeout": 0}) as conn:
        conn.default_channel.qos.restore_visible(num=10, interval=1)
    assert node.client.hlen(node.unacked_key) == 0 and node.client.llen(node.queue_key) == 2

    unblock(fifo, saved)
    worker = node.worker("new-host")
    _assert_old_dropped_new_ran(node, job_id, worker, old_id, new_id)


# ---------------------------------------------------------------- without Redis


@pytest.mark.parametrize("queue", [
    {}, {"task_timeout_s": 30, "retry_backoff_s": 0, "max_attempts": 1},
    {"task_timeout_s": 60, "retry_backoff_s": 30, "max_attempts": 10},
    {"task_timeout_s": 30, "lost_worker_grace_s": 5},
    {"task_timeout_s": 30, "lost_worker_grace_s": 3600, "max_attempts": 1},
])
def test_time_limits_are_ordered(tmp_path, queue):
    """A live worker's longest silence < lost-worker detection < Redis redelivery, for any
    settings: the node's re-dispatch (new token) always comes before a same-token redelivery."""
    from node.config import Settings
    from workers.app import create_app

    settings = Settings(storage={"root": tmp_path}, queue={
        "broker_url": "redis://127.0.0.1:6379/14", **queue})
    q = settings.queue
    longest_silence = max(q.task_timeout_s, q.longest_retry_delay_s)
    assert longest_silence < q.running_lost_after_s < q.broker_visibility_timeout_s
    options = create_app(settings).conf.broker_transport_options
    assert options["visibility_timeout"] == q.broker_visibility_timeout_s


def test_embedded_transport_is_never_swept_blindly(tmp_path):
    """The filesystem transport cannot show messages a worker holds: no re-publish on a timer
    (the supervisor re-dispatches after a worker restart instead)."""
    settings, _, _ = queue_settings(tmp_path / "var", requeue_after_s=1.0)
    index = open_index(settings)
    try:
        job_id = _new_job(settings, index, tmp_path)
        dispatcher = Dispatcher(settings, index)
        dispatcher.dispatch_pending()
        token = job_row(index, job_id).celery_id
        for path in (settings.broker_dir / "queue").iterdir():
            path.unlink()  # message gone (as if a worker had taken it)
        _age(index, job_id, 600)
        assert [dispatcher.requeue_lost() for _ in range(3)] == [0, 0, 0]
        assert job_row(index, job_id).celery_id == token
    finally:
        index.dispose()
