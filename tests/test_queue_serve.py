"""End to end: ``ichnode serve`` as a subprocess, DCMTK storescu sends a head CT, the study
completes, the job runs through the embedded worker (pipeline shortened to ``prepare`` via
ICHNODE_QUEUE__STEPS), and the CLI shows it. Also: stop the node with a job queued, start it
again, the job finishes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from queue_helpers import REPO, free_port, head_study, wait_for

pytestmark = pytest.mark.slow


def _env(root: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICHNODE_")}
    env.update({
        "PYTHONPATH": str(REPO),
        "ICHNODE_STORAGE__ROOT": str(root),
        "ICHNODE_STORAGE__MIN_FREE_MB": "0",
        "ICHNODE_DICOM__PORT": str(port),
        "ICHNODE_ASSEMBLY__QUIET_PERIOD_S": "2",
        "ICHNODE_ASSEMBLY__POLL_INTERVAL_S": "0.5",
        "ICHNODE_QUEUE__STEPS": '["prepare"]',
        "ICHNODE_QUEUE__SIDE_STEPS": "[]",
        "ICHNODE_QUEUE__DISPATCH_INTERVAL_S": "0.5",
        **extra,
    })
    return env


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


class Serve:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        self._fh = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "node.cli.main", "serve"], cwd=REPO,
                                     env=env, stdout=self._fh, stderr=subprocess.STDOUT)

    def wait_listening(self) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError("serve exited: " + self.log.read_text()[-3000:])
            return b"ichnode listening" in self.log.read_bytes()
        wait_for(ready, 60, what="serve listening")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._fh.close()
        return self.proc.returncode


def _storescu(port: int, paths: list[Path]) -> None:
    out = subprocess.run(["storescu", "-aec", "ICHNODE", "-aet", "CTSCANNER", "127.0.0.1",
                          str(port), *map(str, paths)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def _jobs(env) -> list[dict]:
    out = _cli(env, "jobs", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _worker_pids(log: Path) -> set[int]:
    pids = set()
    for line in log.read_text().splitlines():
        if '"embedded worker started"' in line:
            pids.add(json.loads(line)["pid"])
    return pids


def test_serve_storescu_to_done_job(tmp_path):
    port, hl7_port = free_port(), free_port()
    env = _env(tmp_path / "var", port, ICHNODE_HL7_IN__ENABLED="true",
               ICHNODE_HL7_IN__PORT=str(hl7_port))
    uid, specs, paths = head_study(tmp_path / "in", slices=20)
    node = Serve(env, tmp_path / "serve.log")
    try:
        node.wait_listening()
        assert f"127.0.0.1:{port}" in node.log.read_text()
        socket.create_connection(("127.0.0.1", hl7_port), timeout=5).close()  # MLLP listener
        t0 = time.monotonic()
        _storescu(port, paths)
        jobs = wait_for(lambda: [j for j in _jobs(env) if j["state"] in ("done", "failed")],
                        90, interval=1.0, what="job finished")
        elapsed = time.monotonic() - t0
        assert len(jobs) == 1 and jobs[0]["state"] == "done", jobs
        assert jobs[0]["study"] == uid and jobs[0]["kind"] == "analyze"
        assert jobs[0]["timings"]["prepare"] > 0
        job_dir = tmp_path / "var" / "jobs" / str(jobs[0]["id"])
        info = json.loads((job_dir / "series.json").read_text())
        assert info["series_uid"] == specs["soft"].series_uid and len(info["slices"]) == 20
        status = json.loads(_cli(env, "status", "--json").stdout)
        assert status["jobs"] == {"done": 1} and status["studies"] == {"selected": 1}
        assert set(status["queues"]) == {"deid", "gpu", "ner", "report"}
        print(f"storescu start -> job done: {elapsed:.1f} s (quiet period 2 s)")
    finally:
        code = node.stop()
    assert code == 0
    for pid in _worker_pids(node.log):  # the embedded worker stopped with the node
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_node_restart_with_queued_job_then_it_finishes(tmp_path):
    port = free_port()
    root = tmp_path / "var"
    uid, specs, paths = head_study(tmp_path / "in", slices=20)
    # First run without a worker: the job is queued but nothing runs it.
    node = Serve(_env(root, port, ICHNODE_QUEUE__EMBEDDED_WORKER="false"), tmp_path / "a.log")
    try:
        node.wait_listening()
        _storescu(port, paths)
        wait_for(lambda: [j for j in _jobs(_env(root, port)) if j["state"] == "queued"], 60,
                 interval=1.0, what="job queued")
    finally:
        assert node.stop() == 0
    # Start again (embedded worker on): the job is re-dispatched and finishes.
    node = Serve(_env(root, port), tmp_path / "b.log")
    try:
        node.wait_listening()
        jobs = wait_for(lambda: [j for j in _jobs(_env(root, port)) if j["state"] == "done"], 90,
                        interval=1.0, what="job done after restart")
        assert len(jobs) == 1 and jobs[0]["study"] == uid
        assert "unfinished jobs dispatched again" in node.log.read_text()
    finally:
        assert node.stop() == 0
    reprocess = _cli(_env(root, port), "reprocess", uid, "--json")
    assert reprocess.returncode == 0 and json.loads(reprocess.stdout)["kind"] == "analyze"
    bad = _cli(_env(root, port), "reprocess", "1.2.3")
    assert bad.returncode == 1 and "no study" in bad.stderr and "Traceback" not in bad.stderr
