"""Step ``report`` (report queue, PHI zone): results back to PACS, routing, priority, notification.

1. Loads the gpu step's ``results.json`` + ``masks.npz`` from ``previous["work_item"]``; without
   them (study skipped, job failed, model error) builds a "not analysed" result with the reason.
2. Reads the ORIGINAL instances (``series.json`` of the job, else the study's instances in the
   index) in the masks' slice order and builds SEG, SR and overlay into ``ctx.job_dir/results``.
3. Computes priority (:mod:`node.priority`), evaluates routing rules (:mod:`node.routing`),
   stores the summary on the Study row, enqueues sends on the outbox (:class:`node.scu.Outbox`)
   to ``routing.results_to`` + rule destinations, and pushes the priority (:mod:`node.notify`).

Idempotent: result UIDs derive from (study, job), the outbox is unique per destination + SOP
Instance UID, and notification happens once per job (``priority_flags.notify.job``).
"""

from __future__ import annotations

import logging
from datetime import UTC
from pathlib import Path

from sqlalchemy import select

from models.results import AnalysisResult
from node.index import Instance, JobState, Series, Study, utcnow
from node.logs import uid_ref
from workers.context import StepContext, StepError

log = logging.getLogger(__name__)


def _study_state(ctx: StepContext) -> dict:
    with ctx.index.session() as s:
        job = ctx.job(s)
        if job is None:
            raise StepError("job no longer exists")
        study = s.get(Study, job.study_id)
        return {"study_id": study.id, "study_uid": study.study_uid, "entities": study.entities,
                "selected": study.selected_series_uid, "state_reason": study.state_reason,
                "job_reason": job.reason if job.state == JobState.FAILED else None,
                "job_kind": job.kind, "calling_ae": study.calling_ae}


def _load_result(previous: dict, info: dict) -> tuple[AnalysisResult | None, dict | None, str | None]:
    from workers.report.builder import load_masks

    work_item = previous.get("work_item")
    if work_item:
        path = Path(work_item) / previous.get("result", "results.json")
        if path.is_file():
            result = AnalysisResult.model_validate_json(path.read_text(encoding="utf-8"))
            masks = None
            if result.status == "ok" and result.masks_file and (Path(work_item) / result.masks_file).is_file():
                masks = load_masks(Path(work_item) / result.masks_file)
            return result, masks, result.reason
    reason = (previous.get("error") or previous.get("reason") or info["job_reason"]
              or info["state_reason"] or "no analysis result was produced")
    return AnalysisResult(status="not_analysed", reason=reason), None, reason


def _source_paths(ctx: StepContext, info: dict) -> list[Path]:
    from workers.report.sources import read_series_json

    spool = Path(ctx.settings.storage.spool_dir)
    series_json = ctx.job_dir / "series.json"
    if series_json.is_file():
        return read_series_json(series_json, spool)
    # No prepared series (skipped study, early failure): the selected series, else the largest.
    with ctx.index.session() as s:
        series = s.scalars(select(Series).where(Series.study_id == info["study_id"])).all()
        if not series:
            return []
        chosen = next((x for x in series if x.series_uid == info["selected"]), None)
        chosen = chosen or max(series, key=lambda x: x.instance_count or 0)
        rows = s.scalars(select(Instance.path).where(Instance.series_id == chosen.id)).all()
    return [spool / p for p in rows]


def _sources(ctx: StepContext, info: dict, keep_order: bool):
    from pydicom import dcmread

    from workers.report.sources import SourceError, load_sources

    listed = _source_paths(ctx, info)
    paths = [p for p in listed if p.is_file()]
    if not paths:
        raise StepError("no original instances of the study are left to report against")
    try:
        if keep_order and len(paths) == len(listed):  # series.json: the masks' slice order
            return [dcmread(p) for p in paths], True
        # Slices missing from the spool: masks no longer line up, so SR/overlay only.
        return load_sources(paths), not keep_order
    except (SourceError, OSError) as exc:
        raise StepError(f"original instances unusable: {exc}") from exc


def _original_paths(ctx: StepContext, study_id: int) -> list[Path]:
    spool = Path(ctx.settings.storage.spool_dir)
    with ctx.index.session() as s:
        rows = s.scalars(select(Instance.path).join(Series, Series.id == Instance.series_id)
                         .where(Series.study_id == study_id)).all()
    return [spool / p for p in rows]


def _enqueue(ctx: StepContext, info: dict, built, decision) -> dict:  # noqa: ANN001
    from node.scu import Outbox

    outbox = Outbox(ctx.settings, ctx.index)
    plan: dict[str, dict[str, list[Path]]] = {}
    results_to = set(ctx.settings.routing.results_to) | decision.forward["results"]
    for dest in sorted(results_to):
        plan.setdefault(dest, {})["results"] = built.paths
    for dest in sorted(decision.forward["original"]):
        plan.setdefault(dest, {})["original"] = _original_paths(ctx, info["study_id"])
    defaced = sorted((ctx.job_dir / "defaced").glob("**/*.dcm")) if (ctx.job_dir / "defaced").is_dir() else []
    for dest in sorted(decision.forward["defaced"]):
        if defaced:
            plan.setdefault(dest, {})["defaced"] = defaced
        else:
            log.warning("no defaced copy to forward", extra={"job": ctx.job_id, "destination": dest})
    counts: dict[str, int] = {}
    for dest, by_purpose in plan.items():
        for purpose, paths in by_purpose.items():
            if paths:
                ids = outbox.enqueue(dest, paths, purpose=purpose, study_uid=info["study_uid"])
                counts[f"{dest}:{purpose}"] = len(ids)
    return counts


def _summary(result: AnalysisResult, built, priority, level: str, decision) -> dict:  # noqa: ANN001
    return {
        "status": result.status, "reason": result.reason,
        "probabilities": {k: round(f.probability, 4) for k, f in result.findings.items()},
        "findings": {k: {"probability": round(f.probability, 4), "present": f.present}
                     for k, f in result.findings.items()},
        "subtypes_present": [k for k, f in result.findings.items() if k != "any" and f.present],
        "hematoma_volume_ml": result.hematoma_volume_ml, "hematoma_abc2_ml": result.hematoma_abc2_ml,
        "midline_shift_mm": result.midline_shift_mm, "ventricle_left_ml": result.ventricle_left_ml,
        "ventricle_right_ml": result.ventricle_right_ml,
        "models": [m.model_dump() for m in result.models],
        "segments": built.segments, "notes": built.notes,
        "objects": {"seg": built.seg is not None, "sr": built.sr is not None, "overlay": len(built.overlay)},
        "priority": level, "priority_reasons": priority.reasons, "priority_flags": priority.flags,
        "rules_fired": decision.fired,
        # The full result (without per-slice curves) lets `ichnode routes test` re-run the rules.
        "result": result.model_dump(mode="json", exclude={"findings": {"__all__": {"slice_probabilities"}}}),
    }


def run(ctx: StepContext, previous: dict) -> dict:
    from node.notify import push
    from node.priority import compute_priority, higher
    from node.routing import RuleFile, RulesError, build_facts, decide, rules_for
    from workers.report.builder import build_results

    info = _study_state(ctx)
    result, masks, reason = _load_result(previous, info)
    keep_order = (ctx.job_dir / "series.json").is_file()
    sources, aligned = _sources(ctx, info, keep_order)
    if masks is not None and not aligned:
        log.warning("spool slices missing: no SEG", extra={"job": ctx.job_id})
        masks = None
    entities = info["entities"]

    priority = compute_priority(result, entities, ctx.settings.routing)
    rules_error = None
    try:
        rules = rules_for(ctx.settings)
    except RulesError as exc:
        # Results still go to results_to: a broken rule file must not cost the radiologist the
        # result. The error is visible on the study, in the audit table and the log.
        rules, rules_error = RuleFile(), str(exc)
        log.error("routing rules unusable, results sent without rules", extra={"job": ctx.job_id})
        ctx.index.audit("routing", "failed", ref=uid_ref(info["study_uid"]), detail=rules_error[:500])
    with ctx.index.session() as s:
        study = s.get(Study, info["study_id"])
        facts = build_facts(dataset=sources[0], study=study, result=result, entities=entities,
                            priority=priority.level)
    decision = decide(rules, facts)
    level = higher(priority.level, decision.priority) if decision.priority else priority.level
    if level != priority.level:
        priority.reasons.append(f"{level}: routing rule(s) {', '.join(decision.fired)}")

    built = build_results(sources, result, masks, entities, ctx.job_dir / "results",
                          uid_seed=f"{info['study_uid']}/{ctx.job_id}", reason=reason,
                          priority=level, priority_reasons=priority.reasons)
    summary = _summary(result, built, priority, level, decision)
    if rules_error:
        summary["notes"] = summary["notes"] + [f"routing rules not applied: {rules_error}"]
    with ctx.index.session() as s:
        study = s.get(Study, info["study_id"])
        study.results, study.priority = summary, level
        study.priority_flags = {**(study.priority_flags or {}), "flags": priority.flags,
                                "reasons": priority.reasons}
    sends = _enqueue(ctx, info, built, decision)

    notified = _notify(ctx, info, summary, level, decision.notify, push)
    log.info("results built", extra={"job": ctx.job_id, "study": uid_ref(info["study_uid"]),
                                     "status": result.status, "priority": level,
                                     "objects": len(built.paths), "rules": len(decision.fired)})
    return {"results_dir": str(ctx.job_dir / "results"), "objects": len(built.paths),
            "status": result.status, "priority": level, "sends": sends, "notified": notified}


def _notify(ctx: StepContext, info: dict, summary: dict, level: str, forced: bool, push) -> dict:  # noqa: ANN001
    r = ctx.settings.routing
    if not (level in r.notify_levels or forced) or not (r.webhook_url or (r.hl7_host and r.hl7_port)):
        return {}
    with ctx.index.session() as s:
        study = s.get(Study, info["study_id"])
        done = (study.priority_flags or {}).get("notify", {})
        if done.get("job") == ctx.job_id and done.get("level") == level and done.get("ok"):
            return done.get("channels", {})  # a retried step does not page twice
        outcome = push(ctx.settings, study, summary)
    ok = any(o["ok"] for o in outcome.values())
    with ctx.index.session() as s:
        study = s.get(Study, info["study_id"])
        flags = dict(study.priority_flags or {})
        flags["notify"] = {"job": ctx.job_id, "level": level, "ok": ok, "channels": outcome}
        study.priority_flags = flags
        if ok:
            study.priority_pushed_at = utcnow()
    for channel, o in outcome.items():
        ctx.index.audit("notify", "ok" if o["ok"] else "failed", peer=channel,
                        ref=uid_ref(info["study_uid"]), detail=o.get("error"))
    return outcome


def report_not_analysed(settings, index, job_id: int, reason: str) -> dict:  # noqa: ANN001
    """Entry for the queue code: a job that FAILED still sends PACS a 'not analysed' SR."""
    ctx = StepContext(settings, index, job_id)
    return run(ctx, {"reason": reason})


def latency_seconds(study: Study) -> float | None:
    """Seconds from the last received instance to the priority push (None until pushed)."""
    if not study.priority_pushed_at or not study.last_received:
        return None
    a, b = study.last_received, study.priority_pushed_at
    if a.tzinfo is None:
        a = a.replace(tzinfo=UTC)
    if b.tzinfo is None:
        b = b.replace(tzinfo=UTC)
    return round((b - a).total_seconds(), 3)

