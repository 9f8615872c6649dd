"""Fault injection against real processes on loopback: `ichnode serve`, `ichnode worker`
(Celery), our own redis-server, DCMTK storescu/storescp. Each test ends with "nothing lost,
nothing duplicated": instances in the index == instances sent (every file intact), one job per
study finished exactly once, and each result delivered to the PACS once.

Faults: kill -9 a worker mid-task (pool process, then the whole worker), Redis restarted
mid-run, the node stopped (and killed) mid-association and restarted, the spool disk full
(real tmpfs when mounting is allowed; else the free-space limit), a flood of associations beyond
dicom.max_associations, and fuzzed DICOM (mutated pydicom test files) by C-STORE.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from deploy_helpers import (Deployment, RedisServer, build_corpus, check_spool_integrity,
                            send_corpus, store_responses, storescu, storescu_async, wait_until,
                            write_tiny_study)
from queue_helpers import block_one_file, unblock

pytestmark = [pytest.mark.timeout(300)]

INTAKE_ONLY = {"steps": ["prepare"], "side_steps": []}

# What the suite did, printed at the end (pytest -s): the figures of the fault report.
TALLY = {"faults injected": 0, "studies processed": 0, "instances sent": 0,
         "instances lost": 0, "instances duplicated": 0, "results duplicated": 0}


@pytest.fixture(scope="module", autouse=True)
def _report_tally():
    yield
    print("\nfault suite: " + ", ".join(f"{k} {v}" for k, v in TALLY.items()))


def fault() -> None:
    TALLY["faults injected"] += 1


def send_ok(paths: list[Path], port: int) -> None:
    """storescu sends every file and the node answers Success to each."""
    result = storescu(paths, port)
    out = result.stdout + result.stderr
    assert result.returncode == 0 and store_responses(out) == ["Success"] * len(paths), out[-2000:]


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def deployment(tmp_path, redis_server):
    """A node with the `prepare` step only (intake faults do not need the models)."""
    made: list[Deployment] = []

    def make(**overrides) -> Deployment:
        options = {**INTAKE_ONLY, **overrides}
        dep = Deployment(tmp_path / f"dep{len(made)}", broker_url=redis_server.url, **options)
        made.append(dep)
        return dep

    yield make
    for dep in made:
        dep.stop()


def _assert_nothing_lost(dep: Deployment, sent: dict[str, int], *, jobs: bool = True,
                         timeout: float = 60) -> dict:
    """Index holds exactly the sent instances, files intact; one DONE job per study."""
    def settled():
        c = dep.counts()
        if c["instances"] != sent:
            return None
        if jobs and any(c["jobs"].get(uid) != ["done"] for uid in sent):
            return None
        return c

    try:
        counts = wait_until(settled, timeout, 0.5, what="all instances indexed and jobs done")
    except TimeoutError:
        c = dep.counts()
        for uid, n in sent.items():
            got = c["instances"].get(uid, 0)
            TALLY["instances lost" if got < n else "instances duplicated"] += abs(n - got)
        raise AssertionError(f"sent {sent}\nindexed {c['instances']}\njobs {c['jobs']}\n"
                             f"{dep.logs()}") from None
    assert check_spool_integrity(counts) == []
    TALLY["instances sent"] += sum(sent.values())
    if jobs:
        TALLY["studies processed"] += len(sent)
    return counts


# ---- the node ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("how", ["stop", "kill9"])
def test_node_stopped_mid_association_then_restarted(deployment, tmp_path, how):
    dep = deployment()
    dep.start_node()
    dep.add_worker("deid,gpu,ner,report")
    uid, paths = write_tiny_study(tmp_path / "study", slices=150)
    sender = storescu_async(paths, dep.port)
    # Stop the node while the association is busy (some instances stored, not all).
    wait_until(lambda: 10 <= dep.counts()["instances"].get(uid, 0), 60, 0.05,
               what="first instances stored")
    fault()
    if how == "stop":
        dep.stop_node()
    else:
        dep.node.kill9()
        dep.node.popen.wait(10)
    out = sender.communicate(timeout=60)[0]
    partial = dep.counts()["instances"].get(uid, 0)
    assert sender.returncode != 0 and partial < len(paths), out[-500:]
    # Nothing half-indexed even though the node went away in the middle of a transfer.
    assert check_spool_integrity(dep.counts()) == []

    dep.start_node()
    # The modality re-sends the whole study: already stored instances are not duplicated.
    send_ok(paths, dep.port)
    _assert_nothing_lost(dep, {uid: len(paths)})


def test_spool_free_space_limit_refuses_cleanly(deployment, tmp_path):
    """storage.min_free_mb above the disk's free space: every C-STORE is refused with
    0xA700 Out of Resources, the association still ends normally, nothing is indexed."""
    dep = deployment(storage={"min_free_mb": 10**9})
    dep.start_node()
    fault()
    uid, paths = write_tiny_study(tmp_path / "study", slices=5)
    result = storescu(paths, dep.port)
    text = result.stdout + result.stderr
    responses = store_responses(text)
    assert len(responses) == len(paths), text
    assert all("outofresources" in r.lower().replace(" ", "") for r in responses), text
    assert "Releasing Association" in text and "Abort" not in text, text
    counts = dep.counts()
    assert counts["instances"] == {} and check_spool_integrity(counts) == []
    assert dep.node.alive()


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True)
    return res.returncode == 0


def test_spool_disk_really_full(deployment, tmp_path):
    """The spool on a 2 MB tmpfs: instances that do not fit are refused (0xA7xx), the ones
    acknowledged are intact and indexed, and after space is freed a re-send completes."""
    dep = deployment()
    spool = dep.workdir / "var" / "spool"
    if not _mount_tmpfs(spool, "2m"):
        pytest.skip("cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN); "
                    "test_spool_free_space_limit_refuses_cleanly covers the limit")
    try:
        filler = spool / "filler.bin"
        filler.write_bytes(b"\0" * 1_400_000)  # leaves ~0.6 MB: room for a few instances
        fault()
        dep.start_node()
        uid, paths = write_tiny_study(tmp_path / "study", slices=30, size=128)  # ~33 KB each
        result = storescu(paths, dep.port)
        text = result.stdout + result.stderr
        responses = store_responses(text)
        stored = dep.counts()["instances"].get(uid, 0)
        assert 0 < stored < len(paths) and len(responses) == len(paths), text
        assert responses.count("Success") == stored, text
        assert all("outofresources" in r.lower().replace(" ", "") for r in responses if r != "Success"), text
        filler.unlink()
        counts = dep.counts()
        assert check_spool_integrity(counts) == []  # nothing half-indexed, no partial files
        assert dep.node.alive()
        send_ok(paths, dep.port)
        dep.add_worker("deid,gpu,ner,report")
        _assert_nothing_lost(dep, {uid: len(paths)})
    finally:
        dep.stop()
        subprocess.run(["umount", "-l", str(spool)], capture_output=True)


def test_association_flood_beyond_the_limit(deployment, tmp_path):
    """max_associations=3, 12 senders at once: the surplus is rejected (transient, local limit),
    the accepted ones are served completely; re-sending the rejected studies loses nothing."""
    from pynetdicom import AE

    dep = deployment(dicom={"max_associations": 3})
    dep.start_node()
    # Three slow associations hold every slot while the flood arrives.
    holders = []
    held_ae = AE(ae_title="HOLDER")
    held_ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    holder_study, holder_paths = write_tiny_study(tmp_path / "held", slices=6)
    from pydicom import dcmread

    for _ in range(3):
        assoc = held_ae.associate("127.0.0.1", dep.port, ae_title="ICHNODE")
        assert assoc.is_established
        holders.append(assoc)
    studies = {}
    for i in range(12):
        uid, paths = write_tiny_study(tmp_path / f"flood{i}", slices=4)
        studies[uid] = paths
    fault()
    senders = {uid: storescu_async(paths, dep.port, calling=f"FLOOD{i}")
               for i, (uid, paths) in enumerate(studies.items())}
    outputs = {uid: p.communicate(timeout=60)[0] for uid, p in senders.items()}
    rejected = [uid for uid, p in senders.items() if p.returncode != 0]
    assert len(rejected) == len(studies), "all slots were held: every flood sender is refused"
    assert all("Association Rejected" in outputs[uid] for uid in rejected), outputs
    # The held associations are still served while the flood is refused.
    for i, assoc in enumerate(holders):
        for path in holder_paths[i * 2:(i + 1) * 2]:
            assert assoc.send_c_store(dcmread(path)).Status == 0x0000
        assoc.release()
    # Slots free again: the refused senders retry (as modalities do) and get through.
    for uid, paths in studies.items():
        send_ok(paths, dep.port)
    dep.add_worker("deid,gpu,ner,report")
    sent = {uid: len(p) for uid, p in studies.items()}
    sent[holder_study] = len(holder_paths)
    _assert_nothing_lost(dep, sent)


def test_fuzzed_dicom_never_crashes_the_node(deployment, tmp_path):
    """Mutated real files (pydicom's bundled test files, fixed seed) sent raw by C-STORE:
    each gets a status, the node stays up, exactly the acknowledged instances are indexed,
    and a valid study still goes through afterwards."""
    dep = deployment(assembly={"quiet_period_s": 600.0})  # fuzz studies never become jobs
    dep.start_node()
    corpus = build_corpus(tmp_path / "fuzz", count=120, seed=20261123)
    assert len(corpus) == 120
    results = send_corpus(corpus, dep.port)
    TALLY["faults injected"] += len(corpus)
    unanswered = [r for r in results if r.status is None]
    assert not unanswered, unanswered[:5]
    assert dep.node.alive(), dep.logs()
    # 0x0110 is the SCP's answer to an unexpected exception: every mutant must be classified.
    assert not [r for r in results if r.status == 0x0110], dep.logs()
    stored = {r.sop_uid for r in results if r.stored}
    refused = [r for r in results if not r.stored]
    assert refused and stored, "the corpus should exercise both outcomes"
    counts = dep.counts()
    from node.config import load_settings
    from node.index import Index, Instance
    from sqlalchemy import select

    index = Index(load_settings(dep.config).storage.resolved_index_url)
    with index.session() as s:
        indexed = set(s.execute(select(Instance.sop_instance_uid)).scalars())
    index.dispose()
    assert indexed == stored, (len(indexed), len(stored))
    assert check_spool_integrity(counts) == []
    # Still serving: a clean study is stored completely.
    uid, paths = write_tiny_study(tmp_path / "after", slices=4)
    send_ok(paths, dep.port)
    assert dep.counts()["instances"][uid] == 4
    print(f"fuzz: {len(results)} sent, {len(stored)} stored, {len(refused)} refused, "
          f"statuses {sorted({hex(r.status) for r in results})}")


# ---- the pipeline: workers, broker, PACS ---------------------------------------------------------

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


@pytest.fixture(scope="module")
def pipeline_studies(tmp_path_factory):
    from deploy_helpers import phantom_studies

    return phantom_studies(tmp_path_factory.mktemp("phantoms"), 3, matrix=128, first_seed=7100)


def _pipeline(deployment, **overrides) -> Deployment:
    from deploy_helpers import usable_steps

    steps = usable_steps()
    # A short task limit (the node re-dispatches a job RUNNING without progress after limit +
    # retry countdown + grace), still long enough for CPU inference of a small study once
    # analyze is in the chain; a short grace, since these workers write their rows at once.
    queue = {"task_timeout_s": 60.0, "retry_backoff_s": 1.0, "dispatch_interval_s": 0.5,
             "lost_worker_grace_s": 10.0, **overrides.pop("queue", {})}
    return deployment(steps=steps, side_steps=[], pacs="report" in steps, queue=queue,
                      **overrides)


def _send_studies(dep: Deployment, studies) -> dict[str, int]:  # noqa: ANN001
    for _, files in studies:
        send_ok(files, dep.port)
    return {uid: len(files) for uid, files in studies}


def _running_job(dep: Deployment, step: str | None = None) -> dict:
    from deploy_helpers import job_rows

    def running():
        rows = [r for r in job_rows(dep.config) if r["state"] == "running"]
        return next((r for r in rows if step is None or _current_step(dep, r["job"]) == step),
                    None)

    return wait_until(running, 120, 0.1, what=f"a job running {step or ''}")


@contextmanager
def _node_index(dep: Deployment):
    """The deployment's settings and an open index on its database (disposed afterwards)."""
    from node.config import load_settings
    from node.index import Index

    settings = load_settings(dep.config)
    index = Index(settings.storage.resolved_index_url)
    try:
        yield settings, index
    finally:
        index.dispose()


def _current_step(dep: Deployment, job_id: int) -> str | None:
    from node.index import Job

    with _node_index(dep) as (_, index), index.session() as s:
        return s.get(Job, job_id).step


def _assert_results_once(dep: Deployment, sent: dict[str, int], timeout: float = 240) -> None:
    """Every job DONE once, instances intact, and (with a report step) each study's results at
    the PACS exactly once: no result SOP Instance delivered twice."""
    _assert_nothing_lost(dep, sent, timeout=timeout)
    if dep.pacs is None:
        return

    def delivered():
        rows = dep.pacs.received()
        have = {r["study"] for r in rows if r["sop_class"].startswith(SR_PREFIX)}
        return rows if have >= set(sent) else None

    rows = wait_until(delivered, 120, 1.0, what="results at the PACS")
    time.sleep(2)  # a duplicate delivery would arrive right behind
    rows = dep.pacs.received()
    sops = [r["sop"] for r in rows]
    TALLY["results duplicated"] += len(sops) - len(set(sops))
    assert len(sops) == len(set(sops)), "a result instance reached the PACS twice"
    per_study = {uid: sum(1 for r in rows if r["study"] == uid and
                          r["sop_class"].startswith(SR_PREFIX)) for uid in sent}
    assert per_study == {uid: 1 for uid in sent}, per_study


@pytest.mark.slow
def test_worker_pool_process_killed_mid_task(deployment, pipeline_studies):
    """kill -9 the process running a step: the worker's main process puts the message back
    (late ack, reject on worker lost) and the step runs again; results arrive once. The pool
    process is held mid-task (FIFO spool files, as below), so the kill lands inside a task."""
    dep = _pipeline(deployment)
    dep.start_node()
    sent = _send_studies(dep, pipeline_studies)
    held = _hold_every_study(dep, sent)
    worker = dep.add_worker("deid,gpu,ner,report")
    _running_job(dep, "prepare")
    children = [pid for pid in worker.tree_pids() if pid != worker.pid]
    assert children, "prefork worker has a pool process"
    fault()
    for pid in children:
        worker.kill9(pid)
    _release(held)
    _assert_results_once(dep, sent)
    assert worker.alive()
    assert "WorkerLostError" in worker.log_text()


@pytest.mark.slow
@pytest.mark.timeout(540)
def test_whole_worker_killed_mid_task_and_replaced(deployment, pipeline_studies):
    """kill -9 a whole worker (main + pool) mid-task, as a host dying: its message stays
    unacknowledged in Redis; the node's dispatcher re-dispatches the job once it has been
    RUNNING without progress past the task time limit, and a replacement worker finishes it.
    A late redelivery of the old message is dropped (stale token): results arrive once.

    The worker is held mid-task on purpose (one spool file of each study is a FIFO until the
    kill), so the kill never lands between two steps and the lost-worker path always runs."""
    dep = _pipeline(deployment)
    dep.start_node()
    sent = _send_studies(dep, pipeline_studies)  # no worker yet: the jobs wait in Redis
    held = _hold_every_study(dep, sent)
    worker = dep.add_worker("deid,gpu,ner,report")
    _running_job(dep, "prepare")
    fault()
    for pid in reversed(worker.tree_pids()):
        worker.kill9(pid)
    worker.popen.wait(10)
    _release(held)
    dep.add_worker("deid,gpu,ner,report")  # the host comes back / another host takes over
    _assert_results_once(dep, sent, timeout=420)
    assert "worker lost (running without progress" in dep.node.log_text()


def _release(held: list[tuple[Path, Path]]) -> None:
    for fifo, saved in held:
        unblock(fifo, saved)
        saved.unlink()  # the spool holds exactly what was sent again


def _hold_every_study(dep: Deployment, sent: dict[str, int]) -> list[tuple[Path, Path]]:
    """Once every study has its job, swap one spool file of each job's series for a FIFO."""
    from deploy_helpers import job_rows

    def one_job_per_study():
        jobs = [r["job"] for r in job_rows(dep.config) if r["study"] in sent]
        return jobs if len(jobs) == len(sent) else None

    jobs = wait_until(one_job_per_study, 60, 0.2, what="a job per study")
    with _node_index(dep) as (settings, index):
        return [block_one_file(settings, index, job) for job in jobs]


@pytest.mark.slow
def test_redis_restarted_mid_run(deployment, redis_server, pipeline_studies):
    """Redis stops while jobs are queued and running, and comes back 3 s later (its
    append-only file keeps queued messages). The node keeps unpublished jobs RECEIVED and
    publishes them when Redis is back; workers reconnect; results arrive once."""
    dep = _pipeline(deployment)
    dep.start_node()
    worker = dep.add_worker("deid,gpu,ner,report")
    sent = _send_studies(dep, pipeline_studies[:2])
    _running_job(dep)
    fault()
    redis_server.stop()
    # While the broker is down a new study arrives: intake must not depend on the broker.
    extra_uid, extra_files = pipeline_studies[2]
    send_ok(extra_files, dep.port)
    sent[extra_uid] = len(extra_files)
    time.sleep(3)
    redis_server.start()
    _assert_results_once(dep, sent, timeout=280)
    assert worker.alive()


@pytest.mark.slow
def test_pacs_down_for_a_while(deployment, pipeline_studies):
    """The results PACS is down while the studies are processed; the outbox retries and
    delivers everything once it is back."""
    dep = _pipeline(deployment, send={"retry_backoff_s": 1.0, "max_backoff_s": 3.0,
                                      "max_attempts": 30})
    if dep.pacs is None:
        pytest.skip("pipeline has no report step yet")
    dep.pacs.stop()
    fault()
    dep.start_node()
    dep.add_worker("deid,gpu,ner,report")
    sent = _send_studies(dep, pipeline_studies[:2])
    _assert_nothing_lost(dep, sent, timeout=240)  # jobs DONE, sends pending

    def tried_and_pending():
        from sqlalchemy import select

        from node.config import load_settings
        from node.index import Index, Send

        index = Index(load_settings(dep.config).storage.resolved_index_url)
        try:
            with index.session() as s:
                rows = s.execute(select(Send.state, Send.attempts)).all()
        finally:
            index.dispose()
        return rows if rows and all(st.value == "pending" and n >= 1 for st, n in rows) else None

    wait_until(tried_and_pending, 30, 0.5, what="failed delivery attempts while the PACS is down")
    dep.pacs.start()
    _assert_results_once(dep, sent)


@pytest.mark.slow
def test_redis_data_lost_then_node_restart_redispatches(deployment, tmp_path, pipeline_studies):
    """Redis restarted *empty* (no persistence, or a fail-over to an empty replica): queued
    messages are gone. The job table is the source of truth: restarting the node dispatches
    every unfinished job again, stale copies are dropped, and results arrive once.
    (Without the node restart, jobs whose message was lost stay QUEUED: see docs/deployment.md.)"""
    redis = RedisServer(tmp_path / "volatile-redis", appendonly=False).start()
    try:
        dep = _pipeline(deployment, queue={"broker_url": redis.url})
        dep.start_node()
        dep.add_worker("deid,gpu,ner,report")
        sent = _send_studies(dep, pipeline_studies)
        _running_job(dep)
        fault()
        redis.restart(down_s=1.0)  # every queued message is lost
        dep.stop_node()
        dep.start_node()
        _assert_results_once(dep, sent, timeout=280)
    finally:
        redis.stop()
