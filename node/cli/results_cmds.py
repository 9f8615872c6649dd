"""Results-area commands: ``routes check``, ``routes test``, ``worklist``."""

from __future__ import annotations

from pathlib import Path

import typer

from node.cli.common import JSON_OPTION, STATE, console, fail, print_json, print_rows

routes_app = typer.Typer(help="Check routing rules and dry-run them on stored studies.",
                         no_args_is_help=True)
WORKLIST_COLUMNS = ("priority", "study", "received", "status", "findings", "volume_ml",
                    "shift_mm", "flags", "pushed", "latency_s")


def register(app: typer.Typer, train_app: typer.Typer, evaluate_app: typer.Typer) -> None:
    """Add this area's commands to the top-level app and the train/evaluate groups."""
    app.add_typer(routes_app, name="routes")
    routes_app.command("check")(routes_check)
    routes_app.command("test")(routes_test)
    app.command("worklist")(worklist)


def _index():  # noqa: ANN202
    from sqlalchemy.exc import SQLAlchemyError

    from node.index import open_index

    try:
        return open_index(STATE.settings())
    except (SQLAlchemyError, OSError) as exc:
        fail(f"index unavailable: {type(exc).__name__}: {str(exc).splitlines()[0]}")


def routes_check(
    file: Path = typer.Argument(..., help="Routing rules YAML file"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Validate a rules file (fields, operators, regexes, destinations) without sending anything."""
    from node.routing import RulesError, load_rules

    settings = STATE.settings()
    try:
        rules = load_rules(file, set(settings.destinations))
    except RulesError as exc:
        fail(str(exc))
    rows = [{"rule": r.name, "enabled": r.enabled, "stop": r.stop,
             "actions": "; ".join(_action_text(a) for a in r.actions)} for r in rules.rules]
    if as_json:
        print_json({"file": str(file), "ok": True, "rules": rows})
        return
    print_rows(rows, ("rule", "enabled", "stop", "actions"), title=str(file))
    console.print(f"[green]{len(rows)} rule(s) OK[/]")


def _action_text(a) -> str:  # noqa: ANN001
    if a.forward:
        return f"forward {a.forward} -> {', '.join(a.to)}"
    if a.set_priority:
        return f"priority {a.set_priority}"
    return "notify" if a.notify else "no notify"


def routes_test(
    study_uid: str = typer.Argument(..., help="Study Instance UID of a stored study"),
    rules_file: Path | None = typer.Option(None, "--rules", help="Rules file (default: routing.rules_file)"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show which rules a stored study fires and why (dry run: nothing is sent or changed)."""
    import pydicom
    from sqlalchemy import select

    from models.results import AnalysisResult
    from node.index import Instance, Series, Study
    from node.priority import compute_priority, higher
    from node.routing import RuleFile, RulesError, build_facts, decide, load_rules

    settings = STATE.settings()
    path = rules_file or settings.routing.rules_file
    try:
        rules = load_rules(Path(path), set(settings.destinations)) if path else RuleFile()
    except RulesError as exc:
        fail(str(exc))
    index = _index()
    with index.session() as s:
        study = s.scalars(select(Study).where(Study.study_uid == study_uid)).one_or_none()
        if study is None:
            fail("no such study in the index")
        first = s.scalars(select(Instance.path).join(Series, Series.id == Instance.series_id)
                          .where(Series.study_id == study.id).limit(1)).first()
        summary = study.results or {}
        dataset = None
        if first:
            try:
                dataset = pydicom.dcmread(Path(settings.storage.spool_dir) / first, stop_before_pixels=True)
            except (OSError, pydicom.errors.InvalidDicomError):
                dataset = None
        result = AnalysisResult.model_validate(summary["result"]) if summary.get("result") else None
        priority = compute_priority(result, study.entities, settings.routing) if result else None
        facts = build_facts(dataset=dataset, study=study, result=result, entities=study.entities,
                            priority=priority.level if priority else None)
    decision = decide(rules, facts)
    level = priority.level if priority else None
    if level and decision.priority:
        level = higher(level, decision.priority)
    out = {
        "study": study_uid, "analysed": result is not None and result.status == "ok",
        "rules": [{"rule": name, "fired": name in decision.fired, "why": lines}
                  for name, lines in decision.trace.items()],
        "forward": {k: sorted(v) for k, v in decision.forward.items()},
        "results_to": sorted(set(settings.routing.results_to) | decision.forward["results"]),
        "priority": level, "priority_reasons": priority.reasons if priority else [],
        "notify": bool(level and (level in settings.routing.notify_levels or decision.notify)),
    }
    if as_json:
        print_json(out)
        return
    if dataset is None:
        console.print("[yellow]no readable instance: dicom.* conditions see nothing[/]")
    for r in out["rules"]:
        mark = "[green]FIRES[/]" if r["fired"] else "[dim]no[/]"
        console.print(f"{mark} {r['rule']}")
        for line in r["why"]:
            console.print(f"    {line}", highlight=False, markup=False)
    for purpose, dests in out["forward"].items():
        if dests:
            console.print(f"forward {purpose} -> {', '.join(dests)}")
    console.print(f"results -> {', '.join(out['results_to']) or '(none)'}")
    console.print(f"priority: {level or '(not analysed yet)'}; notify: {'yes' if out['notify'] else 'no'}")


def worklist(
    as_json: bool = JSON_OPTION,
    show_all: bool = typer.Option(False, "--all", help="Include studies without a priority yet"),
    show_ids: bool = typer.Option(False, "--show-ids", help="Show Study UID and accession number"),
    limit: int = typer.Option(200, min=1, help="Most studies shown"),
) -> None:
    """Studies by priority (STAT first, then URGENT, ROUTINE; newest first within a level)."""
    from sqlalchemy import select

    from node.index import Study
    from node.logs import uid_ref
    from node.priority import RANK
    from workers.steps.report import latency_seconds

    index = _index()
    with index.session() as s:
        q = select(Study).order_by(Study.last_received.desc()).limit(limit * 5)
        studies = [st for st in s.scalars(q).all() if show_all or st.priority]
    studies.sort(key=lambda st: (RANK.get(st.priority or "", 9),
                                 -(st.last_received.timestamp() if st.last_received else 0)))
    rows = []
    for st in studies[:limit]:
        res = st.results or {}
        flags = (st.priority_flags or {}).get("flags", {})
        notify = (st.priority_flags or {}).get("notify", {})
        row = {
            "priority": st.priority or "-", "study": uid_ref(st.study_uid),
            "received": st.last_received.isoformat(timespec="seconds") if st.last_received else None,
            "status": res.get("status", st.state.value if st.state else None),
            "findings": ", ".join(res.get("subtypes_present", [])) or ("none" if res.get("status") == "ok" else "-"),
            "volume_ml": res.get("hematoma_volume_ml"), "shift_mm": res.get("midline_shift_mm"),
            "flags": ", ".join(sorted(flags)),
            "pushed": ("yes" if notify.get("ok") else "FAILED") if notify else "-",
            "latency_s": latency_seconds(st),
        }
        if show_ids:
            row.update({"study_uid": st.study_uid, "accession": st.accession_number})
        if as_json:
            row["flags"] = flags
            row["notify"] = notify
        rows.append(row)
    columns = WORKLIST_COLUMNS + (("study_uid", "accession") if show_ids else ())
    if as_json:
        columns = columns + ("notify",)
    print_rows(rows, columns, title="worklist", as_json=as_json)
