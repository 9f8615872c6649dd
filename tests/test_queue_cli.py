"""Queue CLI: clear one-line errors, JSON listings, and the worker's start-up checks."""

from __future__ import annotations

import json
import subprocess
import sys

from queue_helpers import REPO, free_port, head_study, index_files, queue_settings

from node.assembly import Assembler
from node.dispatcher import Dispatcher
from node.index import open_index


def _cli(env, *args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_worker_refuses_to_start_with_a_missing_step_module(tmp_path):
    _, _, env = queue_settings(tmp_path / "var")
    env["ICHNODE_QUEUE__STEPS"] = '["prepare", "nosuchstep"]'
    out = _cli(env, "worker")
    assert out.returncode == 1
    assert "configured step 'nosuchstep' has no module workers/steps/nosuchstep.py" in out.stderr
    assert "Traceback" not in out.stderr
    out = _cli(env, "worker", "--queues", "deid,cpu")
    assert out.returncode == 1 and "unknown queue(s) cpu" in out.stderr


def test_jobs_and_status_show_broker_outage(tmp_path):
    settings, _, env = queue_settings(tmp_path / "var",
                                      broker_url=f"redis://127.0.0.1:{free_port()}/0")
    index = open_index(settings)
    uid, _, paths = head_study(tmp_path / "in", slices=10, size=32)
    index_files(index, settings, paths, received_ago_s=3600)
    [job_id] = Assembler(settings, index).complete_due()
    assert Dispatcher(settings, index).dispatch_pending() == 0
    index.dispose()

    jobs = json.loads(_cli(env, "jobs", "--json").stdout)
    assert [(j["id"], j["state"], j["study"]) for j in jobs] == [(job_id, "received", uid)]
    assert "broker unavailable" in jobs[0]["reason"]
    table = _cli(env, "jobs", "--state", "received")
    assert table.returncode == 0 and uid not in table.stdout  # tables show hashed UIDs only
    status = json.loads(_cli(env, "status", "--json").stdout)
    assert status["jobs"] == {"received": 1} and status["jobs_waiting_for_broker"] == 1
    assert "broker unavailable" in status["queues"]["error"]
    assert status["spool"]["free_mb"] > 0
    bad = _cli(env, "jobs", "--state", "nope")
    assert bad.returncode == 1 and "unknown state 'nope'" in bad.stderr
