"""Job-queue figures: worker start-up time, and jobs through a real worker (pipeline = prepare).

For each broker (embedded filesystem transport, Redis on 127.0.0.1:6379 db 13 with a private
key prefix) it starts one ``ichnode worker`` subprocess, dispatches N jobs (one 32-slice
512x512 head series each, stored through the real intake spool) and prints:
worker ready time, jobs/s, and the time per job that is not step time —
i.e. what the outbox + Celery add per job.

    .venv/bin/python benchmarks/queue_jobs.py [--jobs 10] [--slices 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from queue_helpers import (WorkerProcess, head_study, index_files, job_row,  # noqa: E402
                           queue_settings)

from node.assembly import Assembler  # noqa: E402
from node.dispatcher import Dispatcher  # noqa: E402
from node.index import JobState, open_index  # noqa: E402


def run(label: str, root: Path, jobs: int, slices: int, **queue) -> None:
    settings, _, env = queue_settings(root / "var", **queue)
    index = open_index(settings)
    ids = []
    for n in range(jobs):
        _, _, paths = head_study(root / f"in{n}", slices=slices)
        index_files(index, settings, paths, received_ago_s=3600)
        ids += Assembler(settings, index).complete_due()
    t0 = time.monotonic()
    worker = WorkerProcess(env, root / "worker.log").start()
    try:
        worker.wait_ready()
        ready = time.monotonic() - t0
        dispatcher = Dispatcher(settings, index)
        start = time.monotonic()
        dispatcher.dispatch_pending()
        while any(job_row(index, i).state not in (JobState.DONE, JobState.FAILED) for i in ids):
            time.sleep(0.05)
        total = time.monotonic() - start
    finally:
        worker.stop()
    rows = [job_row(index, i) for i in ids]
    failed = [r for r in rows if r.state != JobState.DONE]
    prep = [r.timings["prepare"] for r in rows if r.state == JobState.DONE]
    # One worker process runs the jobs one after the other: what is not step time is queue
    # time (publish, transport polling, outbox bookkeeping, chain hand-over).
    overhead = (total - sum(prep)) / max(1, len(prep))
    print(f"{label:>10}: worker ready {ready:5.1f} s | {jobs} jobs in {total:5.1f} s = "
          f"{jobs / total:5.2f} jobs/s | prepare median {statistics.median(prep):.2f} s | "
          f"queue overhead per job {overhead:.3f} s | failed {len(failed)}")
    index.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--slices", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run("embedded", Path(tmp) / "fs", args.jobs, args.slices)
        prefix = f"ichbench-{uuid.uuid4().hex[:8]}-"
        run("redis", Path(tmp) / "redis", args.jobs, args.slices,
            broker_url="redis://127.0.0.1:6379/13", queue_prefix=prefix)
        import redis

        client = redis.Redis(port=6379, db=13)
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)


if __name__ == "__main__":
    main()
