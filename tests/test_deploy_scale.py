"""Multi-process scale on one machine, as on several hosts: one node, separate `ichnode worker`
processes for the PHI-zone queues (two of them, like two CPU hosts) and the gpu queue, the shared
Redis on 127.0.0.1:6379 (our own database number and key prefix, cleaned), one shared storage
root (the work-item folder every worker reads), studies sent at the same time by several DCMTK
storescu processes. Every study's job must finish exactly once and its results must reach the
PACS (DCMTK storescp, one file per delivery) exactly once.
"""

from __future__ import annotations

import os
import re
from collections import Counter

import pytest

from deploy_helpers import (Deployment, RedisDb, check_spool_integrity, phantom_studies,
                            store_responses, storescu_async, usable_steps, wait_until)

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(600)]

STUDIES = 6
SENDERS = 3
REDIS_DB = 11
SR_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.",)  # any Structured Report storage class
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture
def redis_db():
    db = RedisDb(REDIS_DB, prefix=f"ichnode-deploytest-{os.getpid()}-")
    if not db.available():
        pytest.skip("no Redis on 127.0.0.1:6379")
    db.clean()
    yield db
    db.clean()
    assert db.keys() == []


def test_concurrent_studies_across_worker_processes(tmp_path, redis_db):
    studies = phantom_studies(tmp_path / "studies", STUDIES, matrix=128)
    steps = usable_steps()
    dep = Deployment(tmp_path / "dep", broker_url=redis_db.url, queue_prefix=redis_db.prefix,
                     steps=steps, pacs="report" in steps)
    try:
        dep.start_node()
        # "Hosts": two PHI-zone CPU workers and one gpu worker, separate processes.
        cpu_a = dep.add_worker("deid,ner,report")
        cpu_b = dep.add_worker("deid,ner,report")
        gpu = dep.add_worker("gpu")

        # Several scanners at once: each storescu sends its share of the studies.
        shares = [studies[i::SENDERS] for i in range(SENDERS)]
        senders = [storescu_async([p for _, files in share for p in files], dep.port,
                                  calling=f"CT{i}") for i, share in enumerate(shares)]
        for sender, share in zip(senders, shares):
            out = sender.communicate(timeout=180)[0]
            expected = sum(len(files) for _, files in share)
            assert store_responses(out) == ["Success"] * expected, out[-1500:]

        sent = {uid: len(files) for uid, files in studies}

        def finished():
            c = dep.counts()
            jobs = [s for uid in sent for s in c["jobs"].get(uid, ["none"])]
            return c if all(s in ("done", "failed") for s in jobs) else None

        counts = wait_until(finished, 420, 1.0, what="every study's job finished")
        # Exactly once: one job per study, DONE; every instance indexed once, files intact.
        assert {uid: counts["jobs"][uid] for uid in sent} == {uid: ["done"] for uid in sent}, \
            dep.logs()
        assert counts["instances"] == sent
        assert check_spool_integrity(counts) == []

        # The work was spread over the processes (as over hosts) through the shared storage.
        def steps_done(proc) -> Counter:
            return Counter(re.findall(r'"msg": "step done", "job": \d+, "step": "(\w+)"',
                                      proc.log_text()))
        a, b, g = steps_done(cpu_a), steps_done(cpu_b), steps_done(gpu)
        assert a["deid"] + b["deid"] == STUDIES and a["deid"] and b["deid"], (a, b)
        if "analyze" in steps:
            assert g["analyze"] == STUDIES and not (set(g) - {"analyze"}), g
        work_items = list((dep.workdir / "var" / "work").iterdir())
        assert len(work_items) == STUDIES

        if "report" in steps:
            # Results reach the PACS exactly once per study (storescp keeps every delivery).
            def delivered():
                rows = dep.pacs.received()
                sr = Counter(r["study"] for r in rows if r["sop_class"].startswith(SR_CLASSES))
                return rows if all(sr[uid] >= 1 for uid in sent) else None

            rows = wait_until(delivered, 120, 1.0, what="results at the PACS")
            assert set(r["study"] for r in rows) == set(sent)
            sops = Counter(r["sop"] for r in rows)
            assert max(sops.values()) == 1, "a result instance was delivered twice"
            sr = Counter(r["study"] for r in rows if r["sop_class"].startswith(SR_CLASSES))
            assert sr == Counter({uid: 1 for uid in sent})
            if "analyze" in steps:
                seg = Counter(r["study"] for r in rows if r["sop_class"] == SEG_CLASS)
                assert seg == Counter({uid: 1 for uid in sent})
        print(f"scale: {STUDIES} studies, steps {steps}, deid per worker {a['deid']}/{b['deid']}")
    finally:
        dep.stop()
