"""End-to-end figures of a deployment: node + Redis + `ichnode worker` processes + a PACS.

Real processes on loopback: `ichnode serve`, N × `ichnode worker` (each serving every queue),
our own redis-server, DCMTK storescu as scanners (several at once) and DCMTK storescp as the
PACS. Phantom head CT studies (models.phantom) are sent; for each study the latency is

    last slice received by the node (index)  ->  last result file stored at the PACS

when the pipeline has the report step (else -> job DONE in the index; the table says which).
The latency includes the assembly quiet period (--quiet, default 2 s; the product default is
60 s, add it). Each run starts a fresh node and fresh workers, and first sends one warm-up study
(not counted) so that model loading is not counted as latency.

Runs: 1 study with 1 worker; --concurrent studies (default 20) with 1 worker and with 2
workers. Studies per hour = studies / (first slice sent -> last result stored). Peak memory is
the highest resident set (whole process tree, sampled every 0.5 s) of the node and of each
worker. Prints a table; never asserts. Usage:

    .venv/bin/python benchmarks/e2e.py [--matrix 512] [--concurrent 20] [--senders 4]
        [--steps prepare,deid,analyze,report] [--quiet 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from deploy_helpers import (Deployment, RedisServer, as_epoch, job_rows,  # noqa: E402
                            phantom_studies, store_responses, storescu_async, usable_steps,
                            wait_until)


class PeakRss:
    """Samples the resident memory of process trees in a thread; keeps each one's peak."""

    def __init__(self, procs: dict, interval: float = 0.5) -> None:  # noqa: ANN001
        self.procs, self.interval = procs, interval
        self.peak = {name: 0.0 for name in procs}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, proc in self.procs.items():
                self.peak[name] = max(self.peak[name], proc.rss_mb())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def send_all(studies: list, port: int, senders: int) -> float:  # noqa: ANN001
    """Send the studies with ``senders`` storescu processes at once; returns the start time."""
    shares = [studies[i::senders] for i in range(senders) if studies[i::senders]]
    start = time.time()
    procs = [storescu_async([p for _, files in share for p in files], port, calling=f"CT{i}")
             for i, share in enumerate(shares)]
    for proc, share in zip(procs, shares):
        out = proc.communicate(timeout=900)[0]
        expected = sum(len(f) for _, f in share)
        ok = store_responses(out).count("Success")
        if ok != expected:
            raise RuntimeError(f"storescu: {ok}/{expected} instances stored\n{out[-1500:]}")
    return start


def wait_done(dep: Deployment, uids: set[str], with_pacs: bool, timeout: float) -> dict[str, float]:
    """Wait until every study's job finished (and its results reached the PACS); returns the
    end time per study."""
    def ended():
        rows = [r for r in job_rows(dep.config) if r["study"] in uids]
        if len(rows) < len(uids) or any(r["state"] not in ("done", "failed") for r in rows):
            return None
        failed = [r for r in rows if r["state"] == "failed"]
        if failed:
            raise RuntimeError(f"job failed: {failed[0]['reason']}")
        if not with_pacs:
            return {r["study"]: as_epoch(r["finished"]) for r in rows}
        # The report step's sends are delivered by the node's outbox: wait until the PACS has
        # results for every study and nothing is pending any more.
        by_study: dict[str, float] = {}
        for row in dep.pacs.received():
            if row["study"] in uids:
                by_study[row["study"]] = max(by_study.get(row["study"], 0.0), row["mtime"])
        if set(by_study) != uids or _pending_sends(dep):
            return None
        return by_study

    return wait_until(ended, timeout, 0.5, what="all studies finished")


def _pending_sends(dep: Deployment) -> int:
    from sqlalchemy import func, select

    from node.config import load_settings
    from node.index import Index, Send, SendState

    index = Index(load_settings(dep.config).storage.resolved_index_url)
    try:
        with index.session() as s:
            return s.execute(select(func.count()).select_from(Send)
                             .where(Send.state == SendState.PENDING)).scalar_one()
    finally:
        index.dispose()


def run(label: str, workdir: Path, redis: RedisServer, studies: list, warmup: tuple,
        *, workers: int, steps: list[str], quiet: float, senders: int) -> dict:  # noqa: ANN001
    with_pacs = "report" in steps
    dep = Deployment(workdir / label, broker_url=redis.url, queue_prefix=f"bench-{label}-",
                     steps=steps, pacs=with_pacs, assembly={"quiet_period_s": quiet})
    try:
        dep.start_node()
        for _ in range(workers):
            dep.add_worker("deid,gpu,ner,report")
        procs = {"node": dep.node, **{f"worker{i + 1}": w for i, w in enumerate(dep.workers)}}
        with PeakRss(procs) as rss:
            send_all([warmup], dep.port, 1)
            wait_done(dep, {warmup[0]}, with_pacs, 600)
            start = send_all(studies, dep.port, senders)
            uids = {uid for uid, _ in studies}
            ends = wait_done(dep, uids, with_pacs, 3600)
        rows = {r["study"]: r for r in job_rows(dep.config) if r["study"] in uids}
        latency = sorted(ends[uid] - as_epoch(rows[uid]["last_received"]) for uid in uids)
        span = max(ends.values()) - start
        steps_s = {}
        for r in rows.values():
            for step, secs in r["timings"].items():
                steps_s.setdefault(step, []).append(secs)
        return {
            "run": label, "studies": len(studies), "workers": workers,
            "latency_median_s": statistics.median(latency),
            "latency_p95_s": _percentile(latency, 95),
            "latency_max_s": latency[-1],
            "studies_per_hour": len(studies) / span * 3600,
            "span_s": span,
            "peak_rss_mb": {name: round(v) for name, v in rss.peak.items()},
            "step_median_s": {k: round(statistics.median(v), 2) for k, v in steps_s.items()},
        }
    finally:
        dep.stop()


def _percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation: a reported figure is one study's latency)."""
    rank = max(1, -(-len(values) * pct // 100))
    return sorted(values)[int(rank) - 1]


def print_table(results: list[dict], end_point: str, args) -> None:  # noqa: ANN001
    print(f"\nend point: {end_point}; quiet period {args.quiet:g} s included; "
          f"matrix {args.matrix}; senders {args.senders}")
    head = (f"{'run':<14}{'studies':>8}{'workers':>8}{'median s':>10}{'p95 s':>8}{'max s':>8}"
            f"{'studies/h':>11}{'node MB':>9}{'worker MB':>11}")
    print(head)
    print("-" * len(head))
    for r in results:
        worker_mb = max(v for k, v in r["peak_rss_mb"].items() if k.startswith("worker"))
        print(f"{r['run']:<14}{r['studies']:>8}{r['workers']:>8}{r['latency_median_s']:>10.1f}"
              f"{r['latency_p95_s']:>8.1f}{r['latency_max_s']:>8.1f}{r['studies_per_hour']:>11.0f}"
              f"{r['peak_rss_mb']['node']:>9}{worker_mb:>11}")
    print("\nmedian seconds per step (last run):",
          ", ".join(f"{k} {v}" for k, v in results[-1]["step_median_s"].items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--matrix", type=int, default=512, help="phantom matrix (512 = clinical)")
    ap.add_argument("--concurrent", type=int, default=20, help="studies sent at once")
    ap.add_argument("--senders", type=int, default=4, help="storescu processes sending at once")
    ap.add_argument("--steps", default=None,
                    help="pipeline chain (default: the product default, less analyze while "
                         "no model bundle is installed)")
    ap.add_argument("--quiet", type=float, default=2.0, help="assembly quiet period (s)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep files here (default: temp)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = ap.parse_args()
    steps = args.steps.split(",") if args.steps else usable_steps()
    delivered = "SEG + SR + overlay" if "analyze" in steps else "'not analysed' SR + overlay"
    end_point = (f"last slice received -> {delivered} stored at the PACS" if "report" in steps
                 else "last slice received -> job DONE")
    print(f"pipeline steps: {', '.join(steps)} (+ side steps as configured)")

    with tempfile.TemporaryDirectory(prefix="ichnode-e2e-") as tmp:
        workdir = args.workdir or Path(tmp)
        t = time.monotonic()
        studies = phantom_studies(workdir / "studies", args.concurrent + 1, matrix=args.matrix)
        print(f"{len(studies)} phantom studies ready in {time.monotonic() - t:.0f} s")
        warmup, batch = studies[0], studies[1:]
        redis = RedisServer(workdir / "redis").start()
        results = []
        try:
            plan = [("1 study", batch[:1], 1), (f"{args.concurrent} studies", batch, 1),
                    (f"{args.concurrent} studies", batch, 2)]
            for i, (label, chosen, workers) in enumerate(plan):
                t = time.monotonic()
                res = run(f"run{i}", workdir, redis, chosen, warmup, workers=workers,
                          steps=steps, quiet=args.quiet, senders=min(args.senders, len(chosen)))
                res["run"] = label
                results.append(res)
                print(f"{label} / {workers} worker(s): done in {time.monotonic() - t:.0f} s",
                      flush=True)
        finally:
            redis.stop()
    print_table(results, end_point, args)
    if args.json:
        args.json.write_text(json.dumps({"end_point": end_point, "steps": steps,
                                         "matrix": args.matrix, "results": results}, indent=2))


if __name__ == "__main__":
    main()
