"""Job-queue commands: serve, worker, status, jobs, reprocess."""

from __future__ import annotations

import os
import shutil
from datetime import datetime
from typing import Optional

import typer

from node.cli.common import JSON_OPTION, STATE, console, fail, print_json, print_rows

JOB_COLUMNS = ("id", "study", "kind", "state", "step", "attempts", "created", "finished",
               "seconds", "reason")


def register(app: typer.Typer, train_app: typer.Typer, evaluate_app: typer.Typer) -> None:
    """Add this area's commands to the top-level app and the train/evaluate groups."""
    app.command("serve")(serve)
    app.command("worker")(worker)
    app.command("status")(status)
    app.command("jobs")(jobs)
    app.command("reprocess")(reprocess)


def _index():  # noqa: ANN202
    from sqlalchemy.exc import SQLAlchemyError

    from node.index import open_index

    try:
        return open_index(STATE.settings())
    except (SQLAlchemyError, OSError) as exc:
        fail(f"index unavailable: {type(exc).__name__}: {str(exc).splitlines()[0]}")


def serve() -> None:
    """Run the node in the foreground: DICOM service, assembly, dispatcher, sends, worker."""
    from node.config import mask_url
    from node.logs import setup_logging
    from node.server import NodeServer

    settings = STATE.settings()
    setup_logging(settings.log_level)

    def started(server: NodeServer) -> None:
        worker = (f"embedded worker pid {server.supervisor.pid}" if server.supervisor
                  else "external workers (ichnode worker)")
        console.print(f"ichnode listening: AE {settings.dicom.ae_title} on "
                      f"{settings.dicom.host}:{server.dicom.port}; broker "
                      f"{mask_url(settings.broker_url)}; {worker}", highlight=False)

    try:
        NodeServer(settings).serve_forever(started)
    except OSError as exc:
        fail(f"cannot start the node: {exc.strerror or exc}")


def worker(
    queues: Optional[str] = typer.Option(
        None, "--queues", "-Q", help="Comma-separated queues (deid,gpu,ner,report); default all"),
    concurrency: int = typer.Option(1, "--concurrency", "-c", min=1, max=64,
                                    help="Worker processes"),
) -> None:
    """Run a Celery worker for this node's queues (for workers on other hosts, e.g. gpu)."""
    from node.logs import setup_logging
    from workers.app import QUEUES, StepModuleMissing, check_step_modules, create_app, queue_name

    settings = STATE.settings()
    wanted = [q.strip() for q in (queues or ",".join(QUEUES)).split(",") if q.strip()]
    unknown = [q for q in wanted if q not in QUEUES]
    if unknown:
        fail(f"unknown queue(s) {', '.join(unknown)}; known: {', '.join(QUEUES)}")
    try:
        check_step_modules(settings)
    except StepModuleMissing as exc:
        fail(str(exc))
    setup_logging(settings.log_level)
    app = create_app(settings)
    app.worker_main([
        "worker", "-Q", ",".join(queue_name(settings, q) for q in wanted),
        "-c", str(concurrency), "-P", "prefork", "-l", settings.log_level.upper(),
        "-n", f"ichnode-{os.getpid()}@%h",
        # No peer chatter: jobs are tracked in the index, not through worker gossip.
        "--without-mingle", "--without-gossip", "--without-heartbeat",
    ])


def _queue_depths(settings) -> dict[str, object]:  # noqa: ANN001
    from workers.app import QUEUES, create_app, queue_name

    app = create_app(settings)
    depths: dict[str, object] = {}
    try:
        with app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, timeout=3)
            channel = conn.default_channel
            for q in QUEUES:
                name = queue_name(settings, q)
                depths[q] = channel.queue_declare(queue=name, passive=False).message_count
    except Exception as exc:  # noqa: BLE001 - any broker error is shown, not raised
        return {"error": f"broker unavailable ({type(exc).__name__})"}
    return depths


def status(as_json: bool = JSON_OPTION) -> None:
    """Jobs by state, queue depths, spool disk, destinations, unconfirmed/failed sends."""
    from sqlalchemy import func, select

    from node.config import mask_url
    from node.index import Job, JobState, Send, SendState, Study

    settings = STATE.settings()
    index = _index()
    with index.session() as s:
        by_state = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        studies = dict(s.execute(select(Study.state, func.count()).group_by(Study.state)).all())
        sends = dict(s.execute(select(Send.state, func.count()).group_by(Send.state)).all())
        failing = s.execute(select(func.count()).select_from(Job).where(
            Job.state == JobState.RECEIVED, Job.reason.is_not(None))).scalar_one()
    index.dispose()
    spool = settings.storage.spool_dir
    spool.mkdir(parents=True, exist_ok=True)
    disk = shutil.disk_usage(spool)
    data = {
        "jobs": {st.value: n for st, n in by_state.items()},
        "jobs_waiting_for_broker": failing,
        "studies": {st.value: n for st, n in studies.items()},
        "broker": mask_url(settings.broker_url),
        "queues": _queue_depths(settings),
        "spool": {"path": str(spool.resolve()), "free_mb": disk.free // 2**20,
                  "total_mb": disk.total // 2**20, "min_free_mb": settings.storage.min_free_mb},
        "dicom": {"ae_title": settings.dicom.ae_title, "host": settings.dicom.host,
                  "port": settings.dicom.port},
        "destinations": {name: f"{d.ae_title}@{d.host}:{d.port}"
                         for name, d in settings.destinations.items()},
        "sends": {"unconfirmed": sum(n for st, n in sends.items()
                                     if st in (SendState.PENDING, SendState.SENT)),
                  "failed": sends.get(SendState.FAILED, 0),
                  **{st.value: n for st, n in sends.items()}},
    }
    if as_json:
        print_json(data)
        return
    rows = [{"item": "jobs",
             "value": ", ".join(f"{k} {v}" for k, v in data["jobs"].items()) or "none"},
            {"item": "jobs waiting for broker", "value": failing},
            {"item": "studies", "value": ", ".join(f"{k} {v}" for k, v in data["studies"].items())
             or "none"},
            {"item": "broker", "value": data["broker"]},
            {"item": "queues", "value": ", ".join(f"{k} {v}" for k, v in data["queues"].items())},
            {"item": "spool free", "value": f"{data['spool']['free_mb']} MB of "
                                            f"{data['spool']['total_mb']} MB"},
            {"item": "DICOM", "value": f"{settings.dicom.ae_title} on {settings.dicom.host}:"
                                       f"{settings.dicom.port}"},
            {"item": "destinations", "value": ", ".join(f"{k} {v}" for k, v in
                                                        data["destinations"].items()) or "none"},
            {"item": "sends unconfirmed / failed",
             "value": f"{data['sends']['unconfirmed']} / {data['sends']['failed']}"}]
    print_rows(rows, ["item", "value"], title="ichnode status")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def jobs(
    state: Optional[str] = typer.Option(None, "--state",
                                        help="received, queued, running, done, failed"),
    limit: int = typer.Option(50, "--limit", min=1, help="Newest N jobs"),
    as_json: bool = JSON_OPTION,
) -> None:
    """List jobs, newest first."""
    from sqlalchemy import select

    from node.index import Job, JobState, Study
    from node.logs import uid_ref

    if state is not None and state not in {s.value for s in JobState}:
        fail(f"unknown state {state!r}; one of: {', '.join(s.value for s in JobState)}")
    index = _index()
    with index.session() as s:
        query = select(Job, Study.study_uid).join(Study).order_by(Job.id.desc()).limit(limit)
        if state:
            query = query.where(Job.state == JobState(state))
        rows = [{"id": j.id, "study": uid if as_json else uid_ref(uid), "kind": j.kind,
                 "state": j.state.value, "step": j.step, "attempts": j.attempts,
                 "created": _iso(j.created_at), "queued": _iso(j.queued_at),
                 "finished": _iso(j.finished_at), "seconds": (j.timings or {}).get("total"),
                 "timings": j.timings, "reason": j.reason}
                for j, uid in s.execute(query).all()]
    index.dispose()
    columns = list(JOB_COLUMNS) + (["queued", "timings"] if as_json else [])
    print_rows(rows, columns, title="jobs", as_json=as_json)


def reprocess(study_uid: str = typer.Argument(..., help="Study Instance UID"),
              as_json: bool = JSON_OPTION) -> None:
    """Create a new job for a stored study (selection is run again)."""
    from node.assembly import Assembler

    index = _index()
    try:
        job = Assembler(STATE.settings(), index).reprocess(study_uid.strip())
    except LookupError:
        fail("no study with that Study Instance UID in the index")
    except ValueError as exc:
        fail(str(exc))
    finally:
        index.dispose()
    if as_json:
        print_json({"job": job.id, "kind": job.kind, "state": job.state.value})
    else:
        console.print(f"job {job.id} created ({job.kind}); the node dispatches it", highlight=False)
