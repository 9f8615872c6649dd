"""The MLLP listener with a real HL7 client (hl7.client.MLLPClient) over 127.0.0.1."""

from __future__ import annotations

import socket
import time

import hl7
import pytest
from hl7.client import MLLPClient

from node.hl7_listener import Hl7Listener, extract_ids, extract_text
from node.index import ClinicalText, Study, open_index
from ner_helpers import free_port, hl7_message, make_settings


@pytest.fixture()
def listener(tmp_path):
    settings = make_settings(tmp_path, hl7_in={"port": free_port(), "read_timeout_s": 2,
                                               "max_message_bytes": 4096})
    index = open_index(settings)
    with Hl7Listener(settings, index) as lis:
        yield lis, index
    index.dispose()


def _send(port: int, message: str | bytes) -> hl7.Message:
    with MLLPClient("127.0.0.1", port) as client:
        reply = client.send_message(message)
    return hl7.parse(reply.strip(b"\x0b\x1c\r").decode("utf-8"))


def _msa(ack: hl7.Message) -> tuple[str, str, str]:
    msa = ack.segment("MSA")
    return str(msa[1]), str(msa[2]), str(msa[3]) if len(msa) > 3 else ""


def test_oru_text_is_stored_and_acknowledged(listener):
    lis, index = listener
    msg = hl7_message(lines=["72 yo M, sudden headache.", "Denies anticoagulant use."],
                      nte="GCS 14", control_id="C42")
    code, control, _ = _msa(_send(lis.port, msg))
    assert (code, control) == ("AA", "C42")
    with index.session() as s:
        row = s.query(ClinicalText).one()
        assert (row.source, row.patient_id, row.accession_number) == ("hl7", "P123", "ACC1")
        assert row.text.splitlines() == ["72 yo M, sudden headache.", "Denies anticoagulant use.", "GCS 14"]
        assert row.study_uid is None  # images not here yet


def test_mdm_with_txa_accession_links_to_an_existing_study(listener):
    lis, index = listener
    with index.session() as s:
        s.add(Study(study_uid="1.2.3.4", accession_number="ACC9", patient_id="P9"))
    msg = hl7_message("MDM^T02", patient_id="P9", accession="ACC9", lines=["患者男，70岁，头痛2小时。"])
    assert _msa(_send(lis.port, msg))[0] == "AA"
    with index.session() as s:
        row = s.query(ClinicalText).one()
        assert (row.accession_number, row.study_uid) == ("ACC9", "1.2.3.4")
        assert row.text == "患者男，70岁，头痛2小时。"


def test_text_after_the_ner_step_updates_the_study(listener):
    lis, index = listener
    with index.session() as s:
        s.add(Study(study_uid="1.2.3.5", accession_number="ACC5", patient_id="P5",
                    entities={"entities": [], "flags": {"anticoagulated": False}}))
    assert _msa(_send(lis.port, hl7_message(patient_id="P5", accession="ACC5",
                                            lines=["On warfarin for AF."])))[0] == "AA"
    deadline = time.monotonic() + 60
    flags = {}
    while time.monotonic() < deadline:
        with index.session() as s:
            flags = s.query(Study).filter_by(study_uid="1.2.3.5").one().entities["flags"]
        if flags.get("anticoagulated"):
            break
        time.sleep(0.3)
    assert flags["anticoagulated"] is True


@pytest.mark.parametrize("message, code, reason", [
    ("this is not hl7", "AR", "parseable"),
    (hl7_message("ADT^A01", lines=["x"]), "AR", "unsupported message type ADT"),
    (hl7_message(patient_id=None, accession=None, lines=["headache"]), "AE", "no patient ID"),
    (hl7_message(lines=[]), "AE", "empty text"),
    (hl7_message(lines=["\x01\x02\x03\x04\x05\x06"]), "AE", "binary"),
])
def test_bad_messages_get_error_acks(listener, message, code, reason):
    lis, index = listener
    got_code, _, got_reason = _msa(_send(lis.port, message))
    assert got_code == code and reason in got_reason
    with index.session() as s:
        assert s.query(ClinicalText).count() == 0


def test_oversize_message_is_rejected_and_listener_keeps_serving(listener):
    lis, _index = listener
    code, _, reason = _msa(_send(lis.port, hl7_message(lines=["x" * 8000])))
    assert (code, reason) == ("AR", "message too large")
    assert _msa(_send(lis.port, hl7_message(lines=["headache"])))[0] == "AA"


def test_idle_connection_is_closed_after_the_read_timeout(listener):
    lis, _index = listener
    with socket.create_connection(("127.0.0.1", lis.port), timeout=10) as sock:
        started = time.monotonic()
        assert sock.recv(1) == b""  # server closed the connection
        assert 1.5 < time.monotonic() - started < 8


def test_field_extraction_helpers():
    msg = hl7.parse(hl7_message(lines=["line one", "a \\T\\ b"]).replace("OBR|1||ACC1|", "OBR|1||FILLER|"))
    assert extract_ids(msg) == ("P123", "FILLER")
    assert extract_text(msg) == "line one\na & b"


def test_patient_only_text_links_to_a_recent_study_not_an_old_visit(listener):
    from datetime import UTC, datetime, timedelta

    lis, index = listener
    with index.session() as s:
        s.add(Study(study_uid="1.2.3.old", patient_id="P-OLD",
                    last_received=datetime.now(UTC) - timedelta(days=10)))
        s.add(Study(study_uid="1.2.3.new", patient_id="P-NEW"))
    for patient in ("P-OLD", "P-NEW"):
        msg = hl7_message(patient_id=patient, accession=None, lines=["headache"])
        assert _msa(_send(lis.port, msg))[0] == "AA"
    with index.session() as s:
        links = {r.patient_id: r.study_uid for r in s.query(ClinicalText)}
    assert links == {"P-OLD": None, "P-NEW": "1.2.3.new"}
