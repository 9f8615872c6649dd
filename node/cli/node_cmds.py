"""CLI of intake and sending: ``studies``, ``study UID``, ``send``, ``echo``, ``sends``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from node.cli.common import JSON_OPTION, STATE, console, fail, print_json, print_rows

STUDY_COLUMNS = ("study_uid", "state", "instances", "series", "calling_ae", "first_received",
                 "last_received", "priority", "state_reason")
SERIES_COLUMNS = ("series_uid", "modality", "description", "body_part", "instances", "selected")
JOB_COLUMNS = ("id", "kind", "state", "step", "attempts", "reason", "created_at", "finished_at")
SEND_COLUMNS = ("id", "destination", "state", "attempts", "last_status", "purpose",
                "next_attempt_at", "sent_at", "committed_at", "reason", "path")


def _index():  # noqa: ANN202 - node.index.Index
    from node.index import open_index

    settings = STATE.settings()
    try:
        return open_index(settings)
    except Exception as exc:  # noqa: BLE001 - any database error is one line for the user
        fail(f"cannot open the index ({type(exc).__name__}): {str(exc).splitlines()[0][:200]}")


def _ts(value: Any) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


def _enum(value: Any) -> Any:
    return getattr(value, "value", value)


def _study_row(study, series_count: int) -> dict[str, Any]:  # noqa: ANN001
    return {
        "study_uid": study.study_uid, "state": _enum(study.state),
        "instances": study.instance_count, "series": series_count,
        "calling_ae": study.calling_ae, "first_received": _ts(study.first_received),
        "last_received": _ts(study.last_received), "priority": study.priority,
        "state_reason": study.state_reason,
    }


def _send_row(send) -> dict[str, Any]:  # noqa: ANN001
    return {
        "id": send.id, "destination": send.destination, "state": _enum(send.state),
        "attempts": send.attempts, "last_status": send.last_status, "purpose": send.purpose,
        "next_attempt_at": _ts(send.next_attempt_at), "sent_at": _ts(send.sent_at),
        "committed_at": _ts(send.committed_at),
        "reason": send.reason, "path": send.path, "study_uid": send.study_uid,
        "sop_instance_uid": send.sop_instance_uid,
    }


def studies(state: Optional[str] = typer.Option(None, "--state", help="Only studies in this state"),
            limit: int = typer.Option(100, "--limit", min=1, help="Most recent N studies"),
            as_json: bool = JSON_OPTION) -> None:
    """List received studies, most recent first."""
    from sqlalchemy import func, select

    from node.index import Series, Study, StudyState

    q = (select(Study, func.count(Series.id)).outerjoin(Series, Series.study_id == Study.id)
         .group_by(Study.id).order_by(Study.last_received.desc()).limit(limit))
    if state:
        try:
            q = q.where(Study.state == StudyState(state.lower()))
        except ValueError:
            fail(f"unknown state {state!r} (one of: {', '.join(s.value for s in StudyState)})")
    index = _index()
    with index.session() as s:
        rows = [_study_row(study, n) for study, n in s.execute(q).all()]
    print_rows(rows, STUDY_COLUMNS, title="studies", as_json=as_json)


def study(uid: str = typer.Argument(..., help="Study Instance UID"),
          as_json: bool = JSON_OPTION) -> None:
    """One study: series, selection log, jobs and sends."""
    from sqlalchemy import select

    from node.index import Job, Send, Series, Study

    index = _index()
    with index.session() as s:
        st = s.scalars(select(Study).where(Study.study_uid == uid.strip())).one_or_none()
        if st is None:
            fail(f"no study with UID {uid}")
        series = s.scalars(select(Series).where(Series.study_id == st.id)
                           .order_by(Series.id)).all()
        jobs = s.scalars(select(Job).where(Job.study_id == st.id).order_by(Job.id)).all()
        sends = s.scalars(select(Send).where(Send.study_uid == st.study_uid)
                          .order_by(Send.id)).all()
        data = _study_row(st, len(series))
        data["selected_series_uid"] = st.selected_series_uid
        data["selection_log"] = st.selection_log
        data["results"] = st.results
        data["series_list"] = [{
            "series_uid": se.series_uid, "modality": se.modality, "description": se.description,
            "body_part": se.body_part, "instances": se.instance_count,
            "selected": se.series_uid == st.selected_series_uid} for se in series]
        data["jobs"] = [{
            "id": j.id, "kind": j.kind, "state": _enum(j.state), "step": j.step,
            "attempts": j.attempts, "reason": j.reason, "created_at": _ts(j.created_at),
            "finished_at": _ts(j.finished_at)} for j in jobs]
        data["sends"] = [_send_row(x) for x in sends]
    if as_json:
        print_json(data)
        return
    for key in STUDY_COLUMNS + ("selected_series_uid",):
        console.print(f"[bold]{key}[/]: {data.get(key) if data.get(key) is not None else ''}",
                      highlight=False)
    print_rows(data["series_list"], SERIES_COLUMNS, title="series")
    if data["selection_log"]:
        console.print("[bold]selection log[/]")
        print_json(data["selection_log"])
    print_rows(data["jobs"], JOB_COLUMNS, title="jobs")
    print_rows(data["sends"], SEND_COLUMNS, title="sends")


def _expand(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            fail(f"{p}: no such file or folder")
    if not files:
        fail("no files to send")
    return files


def send(paths: list[Path] = typer.Argument(..., help="DICOM files or folders"),
         to: str = typer.Option(..., "--to", help="Destination name from the config"),
         resend: bool = typer.Option(False, "--resend", help="Send again what was sent already"),
         as_json: bool = JSON_OPTION) -> None:
    """Enqueue files for a destination and deliver them now; non-zero exit if any failed."""
    from sqlalchemy import select

    from node.index import Send, SendState
    from node.scu import Outbox, TargetError

    settings = STATE.settings()
    if to not in settings.destinations:
        known = ", ".join(sorted(settings.destinations)) or "none configured"
        fail(f"unknown destination {to!r} (known: {known})")
    files = _expand(paths)
    index = _index()
    outbox = Outbox(settings, index)
    try:
        ids = outbox.enqueue(to, files, purpose="manual", resend=resend)
    except TargetError as exc:
        fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - e.g. a file that is not DICOM
        fail(f"cannot enqueue: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    outbox.deliver_due(ids=ids)
    with index.session() as s:
        rows = [_send_row(r) for r in s.scalars(select(Send).where(Send.id.in_(ids))
                                                .order_by(Send.id))]
    print_rows(rows, ("id", "path", "state", "last_status", "attempts", "reason"),
               title=f"send to {to}", as_json=as_json)
    bad = [r for r in rows if r["state"] not in (SendState.SENT.value,
                                                  SendState.COMMITTED.value)]
    if bad:
        fail(f"{len(bad)} of {len(rows)} file(s) not delivered to {to} "
             f"(first: {bad[0]['reason'] or bad[0]['state']}); pending ones are retried by serve")


def echo(target: str = typer.Argument(..., help="Destination name or AE@host:port")) -> None:
    """C-ECHO a destination."""
    from node.scu import TargetError, echo as do_echo

    settings = STATE.settings()
    try:
        result = do_echo(target, settings)
    except TargetError as exc:
        fail(str(exc))
    if not result.ok:
        fail(f"C-ECHO {target}: {result.status}")
    console.print(f"C-ECHO {target}: [green]OK[/] ({result.status})", highlight=False)


def sends(state: Optional[str] = typer.Option(None, "--state", help="pending/sent/failed/..."),
          destination: Optional[str] = typer.Option(None, "--destination", "--to"),
          limit: int = typer.Option(200, "--limit", min=1, help="Most recent N rows"),
          as_json: bool = JSON_OPTION) -> None:
    """The outbox: what is to be sent, was sent or failed."""
    from sqlalchemy import select

    from node.index import Send, SendState

    q = select(Send).order_by(Send.id.desc()).limit(limit)
    if state:
        try:
            q = q.where(Send.state == SendState(state.lower()))
        except ValueError:
            fail(f"unknown state {state!r} (one of: {', '.join(s.value for s in SendState)})")
    if destination:
        q = q.where(Send.destination == destination)
    index = _index()
    with index.session() as s:
        rows = [_send_row(r) for r in s.scalars(q)]
    print_rows(rows, SEND_COLUMNS, title="sends", as_json=as_json)


def register(app: typer.Typer, train_app: typer.Typer, evaluate_app: typer.Typer) -> None:
    """Add this area's commands to the top-level app."""
    app.command("studies")(studies)
    app.command("study")(study)
    app.command("send")(send)
    app.command("echo")(echo)
    app.command("sends")(sends)
