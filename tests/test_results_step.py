"""The report step end to end: index + spool -> SEG/SR/overlay -> outbox -> DCMTK storescp /
Orthanc, routing rules, priority, HL7 (real MLLP peer) and webhook (local HTTP receiver)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from node.config import Settings
from node.index import AuditEvent, JobState, Send, SendState, Study, open_index
from results_helpers import (MLLPPeer, Orthanc, StoreSCP, WebhookReceiver, analysis_result,
                             register_study, write_ct_series, write_work_item)
from workers.context import StepContext
from workers.report.sources import load_sources, slice_volumes_ml
from workers.steps import report

SECRET = "s3cret-hook-key"


def _settings(tmp_path: Path, *, dests: dict, rules: Path | None = None, **routing) -> Settings:
    return Settings(
        storage={"root": tmp_path / "var", "min_free_mb": 0},
        destinations={name: {"ae_title": ae, "host": "127.0.0.1", "port": port}
                      for name, (ae, port) in dests.items()},
        send={"retry_backoff_s": 0, "max_attempts": 2},
        routing={"results_to": ["pacs"] if "pacs" in dests else [], "rules_file": rules,
                 "webhook_secret": SECRET, "notify_backoff_s": 0.05, "notify_timeout_s": 2,
                 "stat_volume_ml": 1000, **routing})  # the synthetic bleeds are ~35 mL


def _study(tmp_path, settings, *, subtypes=("intraparenchymal",), shift=2.0, entities=None, **kw):
    st = write_ct_series(tmp_path / "incoming", subtypes=subtypes)
    index = open_index(settings)
    study_id, job_id = register_study(settings, index, st, entities=entities, **kw)
    sources = load_sources(st.paths)
    result = analysis_result(st.masks, voxel_ml=float(slice_volumes_ml(sources).mean()),
                             present=subtypes, shift_mm=shift)
    work = write_work_item(settings, st, result)
    return st, index, study_id, job_id, work, result


def _deliver(settings, index) -> None:
    from node.scu import Outbox

    Outbox(settings, index).deliver_due()


def test_step_builds_sends_and_pushes_priority(tmp_path):
    with StoreSCP(tmp_path / "pacs") as scp, MLLPPeer() as ris, WebhookReceiver(SECRET) as hook:
        settings = _settings(tmp_path, dests={"pacs": ("PACS", scp.port)}, hl7_host="127.0.0.1",
                             hl7_port=ris.port, webhook_url=hook.url)
        st, index, study_id, job_id, work, result = _study(
            tmp_path, settings, subtypes=("intraparenchymal", "intraventricular"), shift=6.5,
            entities={"entities": [{"label": "ANTICOAGULANT", "text": "apixaban"}]})
        out = report.run(StepContext(settings, index, job_id), {"work_item": str(work), "result": "results.json"})
        assert out["status"] == "ok" and out["priority"] == "STAT"
        assert out["notified"]["hl7"]["ok"] and out["notified"]["webhook"]["ok"]
        _deliver(settings, index)
        received = [pydicom.dcmread(p) for p in (tmp_path / "pacs").iterdir()]
        assert len(received) == out["objects"] == out["sends"]["pacs:results"]
        assert sorted({ds.Modality for ds in received}) == ["OT", "SEG", "SR"]
        assert {ds.StudyInstanceUID for ds in received} == {st.study_uid}
        with index.session() as s:
            study = s.get(Study, study_id)
            sends = s.scalars(select(Send)).all()
            assert {x.state for x in sends} == {SendState.SENT}
            assert study.priority == "STAT"
            flags = study.priority_flags["flags"]
            assert flags["ivh"] and flags["midline_shift_mm"] == 6.5 and flags["anticoagulated"]
            assert study.results["subtypes_present"] == ["intraparenchymal", "intraventricular"]
            assert study.priority_pushed_at is not None
            assert report.latency_seconds(study) > 0
    # HL7 ORU^R01 as the RIS got it.
    (msg,) = ris.messages
    assert str(msg.segment("MSH")[9]) == "ORU^R01^ORU_R01"
    assert str(msg.segment("OBR")[5]) == "S" and str(msg.segment("OBR")[3]) == "ACC-0001"
    assert str(msg.segment("PID")[3][0][0]) == "PAT-0001"
    obx = {str(seg[3][0][0]): str(seg[5]) for seg in msg.segments("OBX")}
    assert obx["PRIORITY"] == "STAT" and float(obx["MLS"]) == 6.5
    assert obx["SUBTYPES"] == "intraparenchymal, intraventricular"
    # Webhook: signed, and no patient identity in it.
    (got,) = hook.received
    assert got["valid"]
    body = got["body"]
    assert body["priority"] == "STAT" and body["accession_number"] == "ACC-0001"
    assert body["study_instance_uid"] == st.study_uid
    raw = json.dumps(body)
    assert "PAT-0001" not in raw and "Test^Patient" not in raw and "19600101" not in raw


def test_retry_does_not_page_twice_and_reuses_uids(tmp_path):
    with StoreSCP(tmp_path / "pacs") as scp, WebhookReceiver(SECRET, fail_first=1) as hook:
        settings = _settings(tmp_path, dests={"pacs": ("PACS", scp.port)}, webhook_url=hook.url)
        st, index, study_id, job_id, work, result = _study(tmp_path, settings)
        ctx = StepContext(settings, index, job_id)
        prev = {"work_item": str(work), "result": "results.json"}
        first = report.run(ctx, prev)
        assert first["priority"] == "URGENT"
        assert first["notified"]["webhook"]["ok"] and first["notified"]["webhook"]["attempts"] == 2
        uids1 = sorted(pydicom.dcmread(p).SOPInstanceUID for p in (ctx.job_dir / "results").iterdir())
        report.run(ctx, prev)  # a retried step
        uids2 = sorted(pydicom.dcmread(p).SOPInstanceUID for p in (ctx.job_dir / "results").iterdir())
        assert uids1 == uids2
        assert len(hook.received) == 1  # paged once
        with index.session() as s:
            assert len(s.scalars(select(Send)).all()) == len(uids1)  # outbox rows not duplicated


def test_not_analysed_failed_job_still_reports(tmp_path):
    with StoreSCP(tmp_path / "pacs") as scp:
        settings = _settings(tmp_path, dests={"pacs": ("PACS", scp.port)})
        st = write_ct_series(tmp_path / "incoming")
        index = open_index(settings)
        study_id, job_id = register_study(settings, index, st, job_state=JobState.FAILED,
                                          job_reason="analyze: model unusable: checksum mismatch",
                                          write_series_json=False)
        out = report.run(StepContext(settings, index, job_id), {})
        assert out["status"] == "not_analysed" and out["priority"] == "ROUTINE"
        _deliver(settings, index)
        received = [pydicom.dcmread(p) for p in (tmp_path / "pacs").iterdir()]
        assert sorted(ds.Modality for ds in received) == ["OT", "SR"]
        sr = next(ds for ds in received if ds.Modality == "SR")
        assert "NOT ANALYSED" in sr.SeriesDescription
        texts = [str(i.TextValue) for g in sr.ContentSequence if "ContentSequence" in g
                 for c in g.ContentSequence if "ContentSequence" in c
                 for i in c.ContentSequence if "TextValue" in i]
        assert any("checksum mismatch" in t for t in texts)
        with index.session() as s:
            study = s.get(Study, study_id)
            assert study.results["status"] == "not_analysed"
            assert study.priority_flags["flags"] == {"not_analysed": True}


RULES = """
rules:
  - name: big-or-shifted-to-neuro
    when:
      all:
        - {field: dicom.Modality, op: equals, value: CT}
        - {field: study.calling_ae, op: regex, value: "^SCAN"}
        - any:
            - {field: results.hematoma_volume_ml, op: ">", value: 0.5}
            - {field: results.midline_shift_mm, op: ">", value: 5}
    actions:
      - {forward: results, to: [neuro]}
      - {forward: original, to: [neuro]}
      - {set_priority: STAT}
  - name: research-copy-never
    when: {field: dicom.StationName, op: in, value: [CT9, CT8]}
    actions:
      - {forward: defaced, to: [neuro]}
"""


def test_rules_forward_and_raise_priority_and_routes_cli(tmp_path):
    from node.cli.main import app

    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    with StoreSCP(tmp_path / "pacs") as scp, StoreSCP(tmp_path / "neuro", "NEURO") as neuro:
        settings = _settings(tmp_path, dests={"pacs": ("PACS", scp.port), "neuro": ("NEURO", neuro.port)},
                             rules=rules)
        st, index, study_id, job_id, work, result = _study(tmp_path, settings)
        out = report.run(StepContext(settings, index, job_id), {"work_item": str(work), "result": "results.json"})
        assert out["priority"] == "STAT"  # rule raised URGENT to STAT
        with index.session() as s:
            assert s.get(Study, study_id).priority_flags["reasons"][-1].startswith("STAT: routing rule")
        assert out["sends"]["neuro:original"] == len(st.paths)
        assert "neuro:defaced" not in out["sends"]
        _deliver(settings, index)
        neuro_files = [pydicom.dcmread(p, stop_before_pixels=True) for p in (tmp_path / "neuro").iterdir()]
        assert sum(ds.Modality == "CT" for ds in neuro_files) == len(st.paths)
        assert {"SEG", "SR"} <= {ds.Modality for ds in neuro_files}
        # Dry run of the stored study: same decision, with reasons, nothing sent.
        cfg = tmp_path / "ichnode.yaml"
        cfg.write_text(json.dumps(json.loads(settings.model_dump_json(exclude={"routing": {"webhook_secret"}}))))
        runner = CliRunner()
        res = runner.invoke(app, ["--config", str(cfg), "routes", "test", st.study_uid, "--json"])
        assert res.exit_code == 0, res.output
        data = json.loads(res.output)
        fired = {r["rule"]: r for r in data["rules"]}
        assert fired["big-or-shifted-to-neuro"]["fired"] and not fired["research-copy-never"]["fired"]
        assert any("study.calling_ae regex" in line and "true" in line
                   for line in fired["big-or-shifted-to-neuro"]["why"])
        assert data["priority"] == "STAT" and data["forward"]["original"] == ["neuro"]
        with index.session() as s:
            before = len(s.scalars(select(Send)).all())
        res = runner.invoke(app, ["--config", str(cfg), "routes", "test", st.study_uid])
        assert res.exit_code == 0 and "FIRES big-or-shifted-to-neuro" in res.output
        with index.session() as s:
            assert len(s.scalars(select(Send)).all()) == before
        # worklist
        res = runner.invoke(app, ["--config", str(cfg), "worklist", "--json"])
        assert res.exit_code == 0
        (row,) = json.loads(res.output)
        assert row["priority"] == "STAT" and row["findings"] == "intraparenchymal"
        assert st.study_uid not in res.output  # ids only with --show-ids
        res = runner.invoke(app, ["--config", str(cfg), "routes", "test", "1.2.3.4"])
        assert res.exit_code == 1 and "no such study" in res.output


def test_notification_failure_is_visible(tmp_path):
    from node.cli.main import app
    from results_helpers import free_port

    with StoreSCP(tmp_path / "pacs") as scp:
        dead = free_port()  # nothing listens there
        settings = _settings(tmp_path, dests={"pacs": ("PACS", scp.port)}, hl7_host="127.0.0.1",
                             hl7_port=dead, notify_attempts=2)
        st, index, study_id, job_id, work, result = _study(tmp_path, settings)
        out = report.run(StepContext(settings, index, job_id), {"work_item": str(work), "result": "results.json"})
        assert out["notified"]["hl7"]["ok"] is False and out["notified"]["hl7"]["attempts"] == 2
        assert "ConnectionRefused" in out["notified"]["hl7"]["error"]
        with index.session() as s:
            study = s.get(Study, study_id)
            assert study.priority_pushed_at is None
            audit = s.scalars(select(AuditEvent).where(AuditEvent.kind == "notify")).all()
            assert [a.outcome for a in audit] == ["failed"]
        cfg = tmp_path / "ichnode.yaml"
        cfg.write_text(json.dumps(json.loads(settings.model_dump_json(exclude={"routing": {"webhook_secret"}}))))
        res = CliRunner().invoke(app, ["--config", str(cfg), "worklist", "--json"])
        (row,) = json.loads(res.output)
        assert row["pushed"] == "FAILED" and row["latency_s"] is None


@pytest.mark.slow
def test_results_land_in_original_study_in_orthanc(tmp_path):
    with Orthanc(tmp_path / "orthanc") as orthanc:
        settings = _settings(tmp_path, dests={"pacs": ("ORTHANC", orthanc.dicom_port)})
        st, index, study_id, job_id, work, result = _study(tmp_path, settings, subtypes=("subdural",))
        # The CT itself is in PACS first (as it would be), then our results follow.
        subprocess.run(["storescu", "-aec", "ORTHANC", "127.0.0.1", str(orthanc.dicom_port),
                        *map(str, st.paths)], check=True, capture_output=True, timeout=60)
        out = report.run(StepContext(settings, index, job_id), {"work_item": str(work), "result": "results.json"})
        _deliver(settings, index)
        studies = orthanc.get("/studies?expand")
        assert len(studies) == 1
        assert studies[0]["MainDicomTags"]["StudyInstanceUID"] == st.study_uid
        series = orthanc.get(f"/studies/{studies[0]['ID']}/series?expand")
        by_modality = {s["MainDicomTags"]["Modality"]: s for s in series}
        assert set(by_modality) == {"CT", "SEG", "SR", "OT"}
        assert len(by_modality["OT"]["Instances"]) == out["objects"] - 2
        with index.session() as s:
            assert {x.state for x in s.scalars(select(Send)).all()} == {SendState.SENT}


def test_broken_rules_file_does_not_lose_results(tmp_path):
    from node.cli.main import app

    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - {name: a, when: {field: dicom.Modality, op: equals, value: CT}, "
                     "actions: [{forward: results, to: [gone]}]}\n")
    with StoreSCP(tmp_path / "pacs") as scp:
        settings = _settings(tmp_path, dests={"pacs": ("PACS", scp.port)}, rules=rules)
        st, index, study_id, job_id, work, result = _study(tmp_path, settings)
        out = report.run(StepContext(settings, index, job_id), {"work_item": str(work), "result": "results.json"})
        assert out["sends"] == {"pacs:results": out["objects"]}
        _deliver(settings, index)
        assert len(list((tmp_path / "pacs").iterdir())) == out["objects"]
        with index.session() as s:
            notes = s.get(Study, study_id).results["notes"]
            assert any("unknown destination(s) gone" in n for n in notes)
            assert s.scalars(select(AuditEvent).where(AuditEvent.kind == "routing")).one().outcome == "failed"
        cfg = tmp_path / "ichnode.yaml"
        cfg.write_text(json.dumps(json.loads(settings.model_dump_json(exclude={"routing": {"webhook_secret"}}))))
        res = CliRunner().invoke(app, ["--config", str(cfg), "config", "check"])
        assert res.exit_code == 1 and "rules[0].actions[0].to: unknown destination(s) gone" in res.output


def test_missing_spool_slice_gives_sr_without_seg(tmp_path):
    settings = _settings(tmp_path, dests={})
    st, index, study_id, job_id, work, result = _study(tmp_path, settings)
    ctx = StepContext(settings, index, job_id)
    slices = json.loads((ctx.job_dir / "series.json").read_text())["slices"]
    Path(slices[3]["path"]).unlink()  # one original slice lost: masks no longer line up
    out = report.run(ctx, {"work_item": str(work), "result": "results.json"})
    names = sorted(p.name for p in (ctx.job_dir / "results").iterdir())
    assert "seg.dcm" not in names and "sr.dcm" in names and out["status"] == "ok"
    with index.session() as s:
        assert s.get(Study, study_id).results["objects"]["seg"] is False
