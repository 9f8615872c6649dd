"""Routing rules (validation, evaluation), priority, and the notification channels on their own."""

from __future__ import annotations

import json

import hl7
import pytest
import yaml
from typer.testing import CliRunner

from models.results import AnalysisResult, SubtypeResult
from node.config import RoutingSection
from node.notify import build_oru, post_webhook, send_mllp
from node.priority import compute_priority
from node.routing import RulesError, build_facts, decide, parse_rules
from results_helpers import MLLPPeer, WebhookReceiver

LEAF = "{field: dicom.Modality, op: equals, value: CT}"


def _rules(text: str, dests=frozenset({"neuro"})):
    return parse_rules(yaml.safe_load(text), "rules.yaml", set(dests))


@pytest.mark.parametrize("text,where,what", [
    ("rules: [{name: a, when: {field: dicom.Modalty, op: equals, value: CT}, actions: [{notify: true}]}]",
     "rules[0].when.field", "unknown DICOM keyword 'Modalty'"),
    ("rules: [{name: a, when: {field: results.volume, op: '>', value: 3}, actions: [{notify: true}]}]",
     "rules[0].when.field", "unknown field"),
    ("rules: [{name: a, when: {field: dicom.Modality, op: like, value: CT}, actions: [{notify: true}]}]",
     "rules[0].when.op", "Input should be"),
    ("rules: [{name: a, when: {all: [" + LEAF + ", {field: results.any.probability, op: '>', value: high}]}, actions: [{notify: true}]}]",
     "rules[0].when.all[1]", "needs a number"),
    ("rules: [{name: a, when: {field: dicom.SeriesDescription, op: regex, value: '(a*)*b'}, actions: [{notify: true}]}]",
     "rules[0].when", "nested quantifier"),
    ("rules: [{name: a, when: {field: dicom.SeriesDescription, op: regex, value: '(unclosed'}, actions: [{notify: true}]}]",
     "rules[0].when", "invalid regex"),
    ("rules: [{name: a, when: " + LEAF + ", actions: [{forward: results, to: [pacs2]}]}]",
     "rules[0].actions[0].to", "unknown destination(s) pacs2"),
    ("rules: [{name: a, when: " + LEAF + ", actions: [{forward: results}]}]",
     "rules[0].actions[0]", "forward needs 'to'"),
    ("rules: [{name: a, when: " + LEAF + ", actions: [{notify: true}], exec: 'rm -rf /'}]",
     "rules[0].exec", "Extra inputs are not permitted"),
    ("rules: [{name: a, when: " + LEAF + ", actions: [{notify: true}]}, {name: a, when: " + LEAF + ", actions: [{notify: true}]}]",
     "rules[1].name", "duplicate rule name"),
])
def test_rule_errors_are_precise(text, where, what):
    with pytest.raises(RulesError) as err:
        _rules(text)
    msg = str(err.value)
    assert msg.startswith(f"rules.yaml: {where}: ") and what in msg


def _result(**kw) -> AnalysisResult:
    findings = {k: SubtypeResult(probability=p, present=p >= 0.5, threshold=0.5)
                for k, p in kw.pop("probs", {"any": 0.9, "subdural": 0.9, "epidural": 0.1}).items()}
    return AnalysisResult(findings=findings, **kw)


def test_evaluation_semantics():
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SeriesDescription = "Head 5mm"
    ds.StationName = "CT1"
    facts = build_facts(dataset=ds, result=_result(hematoma_volume_ml=42.0),
                        entities={"flags": {"anticoagulated": True}}, priority="URGENT")
    rules = _rules("""
rules:
  - {name: multi, when: {field: dicom.ImageType, op: equals, value: axial}, actions: [{notify: true}]}
  - {name: missing, when: {field: dicom.BodyPartExamined, op: not_equals, value: CHEST}, actions: [{notify: true}]}
  - {name: absent, when: {field: dicom.BodyPartExamined, op: exists, value: false}, actions: [{notify: true}]}
  - {name: numeric-on-text, when: {field: dicom.SeriesDescription, op: ">", value: 3}, actions: [{notify: true}]}
  - {name: regex, when: {field: dicom.SeriesDescription, op: regex, value: "^head\\\\s+\\\\d+mm$"}, actions: [{notify: true}]}
  - {name: regex-case, when: {field: dicom.SeriesDescription, op: regex, value: "(?i)^head"}, actions: [{notify: true}]}
  - {name: subtypes, when: {field: results.present_subtypes, op: contains, value: subdural}, actions: [{set_priority: STAT}]}
  - {name: not-edh, when: {not: {field: results.epidural.present, op: equals, value: true}}, actions: [{forward: results, to: [neuro]}]}
  - {name: ner, when: {all: [{field: ner.anticoagulated, op: equals, value: true}, {field: priority.level, op: in, value: [STAT, URGENT]}]}, actions: [{notify: true}], stop: true}
  - {name: after-stop, when: {field: dicom.Modality, op: exists}, actions: [{forward: original, to: [neuro]}]}
""")
    d = decide(rules, facts)
    assert d.fired == ["multi", "absent", "regex-case", "subtypes", "not-edh", "ner"]
    assert "missing" not in d.fired  # a missing value never satisfies not_equals
    assert "regex" not in d.fired  # case-sensitive unless (?i)
    assert d.priority == "STAT" and d.notify and d.forward["results"] == {"neuro"}
    assert d.forward["original"] == set()  # stop: later rules not evaluated
    assert "after-stop" not in d.trace
    assert d.trace["numeric-on-text"] == ["dicom.SeriesDescription > 3 (actual 'Head 5mm') -> false"]


def test_priority_levels_and_thresholds():
    r = RoutingSection()
    assert compute_priority(_result(probs={"any": 0.1, "subdural": 0.1}), None, r).level == "ROUTINE"
    p = compute_priority(_result(hematoma_volume_ml=12.0, midline_shift_mm=1.0), None, r)
    assert p.level == "URGENT" and p.flags == {"ich_present": ["subdural"]}
    assert compute_priority(_result(hematoma_volume_ml=31.0), None, r).level == "STAT"
    assert compute_priority(_result(hematoma_volume_ml=31.0), None,
                            RoutingSection(stat_volume_ml=50)).level == "URGENT"
    assert compute_priority(_result(midline_shift_mm=5.5), None, r).flags["midline_shift_mm"] == 5.5
    ivh = compute_priority(_result(probs={"any": 0.9, "intraventricular": 0.8}), None, r)
    assert ivh.level == "STAT" and ivh.flags["ivh"] is True
    anticoag = {"entities": [{"label": "ANTICOAGULANT", "text": "warfarin"}]}
    assert compute_priority(_result(), anticoag, r).level == "STAT"
    assert compute_priority(_result(), anticoag, RoutingSection(stat_on_anticoagulation=False)).level == "URGENT"
    # Anticoagulation alone (no bleed) is recorded but does not raise the level.
    calm = compute_priority(_result(probs={"any": 0.1}), anticoag, r)
    assert calm.level == "ROUTINE" and calm.flags == {"anticoagulated": True}
    na = compute_priority(AnalysisResult(status="not_analysed", reason="not a head CT"), None,
                          RoutingSection(not_analysed_priority="URGENT"))
    assert na.level == "URGENT" and "not a head CT" in na.reasons[0]


def _payload(**kw):
    base = {"priority": "URGENT", "reasons": ["URGENT: bleed | with ^ separators & ~ \\ stuff"],
            "subtypes_present": ["subdural"], "hematoma_volume_ml": 12.5, "midline_shift_mm": 1.0,
            "analysed": True, "accession_number": "ACC|1", "study_instance_uid": "1.2.3"}
    base.update(kw)
    return base


def test_oru_escaping_round_trip_and_negative_ack():
    msg = build_oru(_payload(), patient_id="P^1", routing=RoutingSection())
    again = hl7.parse(str(msg))
    obx = {str(s[3][0][0]): s for s in again.segments("OBX")}
    assert str(again.segment("OBR")[3]) == "ACC\\F\\1"  # escaped, still one field
    assert "\\F\\" in str(obx["REASONS"][5]) and "\\S\\" in str(obx["REASONS"][5])
    assert str(obx["VOLUME"][6][0][0]) == "mL" and str(obx["VOLUME"][2]) == "NM"
    with MLLPPeer(ack_code="AE") as peer:
        with pytest.raises(RuntimeError, match="negative ACK AE"):
            send_mllp(msg, "127.0.0.1", peer.port, timeout=2)
        assert len(peer.messages) == 1


def test_webhook_signature_rejects_wrong_secret():
    import urllib.error

    with WebhookReceiver("right") as hook:
        with pytest.raises(urllib.error.HTTPError) as err:
            post_webhook(hook.url, _payload(), "wrong", timeout=2)
        assert err.value.code == 401 and hook.received[0]["valid"] is False
        assert post_webhook(hook.url, _payload(), "right", timeout=2) == 204


def test_routes_check_cli(tmp_path):
    from node.cli.main import app

    cfg = tmp_path / "ichnode.yaml"
    cfg.write_text(json.dumps({"storage": {"root": str(tmp_path / "var")},
                               "destinations": {"neuro": {"ae_title": "NEURO", "host": "127.0.0.1", "port": 104}}}))
    good = tmp_path / "good.yaml"
    good.write_text("rules:\n  - {name: a, when: " + LEAF + ", actions: [{forward: results, to: [neuro]}]}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - {name: a, when: " + LEAF + ", actions: [{forward: results, to: [nowhere]}]}\n")
    runner = CliRunner()
    res = runner.invoke(app, ["--config", str(cfg), "routes", "check", str(good), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["rules"][0]["actions"] == "forward results -> neuro"
    res = runner.invoke(app, ["--config", str(cfg), "routes", "check", str(bad)])
    assert res.exit_code == 1
    assert "rules[0].actions[0].to: unknown destination(s) nowhere" in res.output
    assert "Traceback" not in res.output


def test_negated_ner_entities_never_read_as_findings():
    from workers.report.entities import entity_list, flags

    entities = {"entities": [{"type": "DRUG", "text": "warfarin", "negated": True},
                             {"type": "HTN", "text": "hypertension", "uncertain": True}],
                "flags": {"anticoagulated": False, "hypertension": False}}
    assert entity_list(entities) == [("DRUG", "warfarin (negated)"),
                                     ("HTN", "hypertension (uncertain)")]
    assert flags(entities) == {"anticoagulated": False, "hypertension": False}
