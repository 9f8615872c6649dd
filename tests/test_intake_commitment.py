"""Storage Commitment Push Model: Outbox N-ACTION + N-EVENT-REPORT handling, against real
Orthanc (reports on a new association to our SCP) and DCMTK storescp (no commitment support)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from datetime import UTC, timedelta
from pathlib import Path

import pytest
from pynetdicom import AE
from sqlalchemy import select

from intake_helpers import free_port, have_dcmtk, make_head_ct, node_settings, storescp, \
    wait_port
from node import commitment
from node.index import AuditEvent, Send, SendState, open_index, utcnow
from node.scu import Outbox

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


class Orthanc:
    """Debian Orthanc on loopback; ``modalities`` lets it send N-EVENT-REPORTs back to us."""

    def __init__(self, folder: Path, modalities: dict) -> None:
        self.folder, self.modalities = folder, modalities
        self.dicom_port, self.http_port = free_port(), free_port()

    def __enter__(self) -> "Orthanc":
        self.folder.mkdir(parents=True, exist_ok=True)
        cfg = {
            "Name": "ichnode-commit-test", "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"), "DicomAet": "ORTHANC",
            "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
            "DicomCheckCalledAet": False, "DicomModalities": self.modalities,
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(cfg))
        self.proc = subprocess.Popen([ORTHANC, str(path)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        try:
            wait_port(self.http_port, timeout=30)
            wait_port(self.dicom_port, timeout=30)
        except Exception:
            self.__exit__()
            raise
        return self

    def rest(self, url: str, method: str = "GET"):  # noqa: ANN201
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{url}", method=method)
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body else None

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


pytestmark = pytest.mark.skipif(not shutil.which("Orthanc") and not Path(ORTHANC).exists(),
                                reason="orthanc not installed")


def _settings(tmp_path, dest_port, *, commit=True, **send):  # noqa: ANN001, ANN202
    return node_settings(
        tmp_path,
        dicom={"port": free_port()},
        destinations={"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": dest_port,
                               "storage_commitment": commit}},
        send={"retry_backoff_s": 10, "max_attempts": 5, **send})


def _utc(dt):  # noqa: ANN001, ANN202 - SQLite hands back naive datetimes (stored as UTC)
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _rows(index) -> list[Send]:  # noqa: ANN001
    with index.session() as s:
        return list(s.scalars(select(Send).order_by(Send.id)))


# Orthanc sends its N-EVENT-REPORT from its job engine on a new association; on a loaded CI
# machine that once took longer than 15 s. The waits return as soon as the report is applied.
REPORT_WAIT_S = 60.0


def _wait_states(index, want: set[SendState], timeout: float = REPORT_WAIT_S) -> list[Send]:  # noqa: ANN001
    end = time.monotonic() + timeout
    while True:
        rows = _rows(index)
        if {r.state for r in rows} <= want or time.monotonic() > end:
            return rows
        time.sleep(0.1)


def test_orthanc_commits_on_new_association(tmp_path):
    files = make_head_ct(tmp_path / "ct", size=64)[:3]
    node_port = free_port()
    with Orthanc(tmp_path / "orthanc", {"node": ["ICHNODE", "127.0.0.1", node_port]}) as pacs:
        settings = _settings(tmp_path, pacs.dicom_port, commit_wait_s=10)
        index = open_index(settings)
        from node.scp import DicomService

        service = DicomService(settings, index, port=node_port).start()
        try:
            outbox = Outbox(settings, index)
            outbox.enqueue("pacs", files, purpose="results")
            assert outbox.deliver_due() == 3
            rows = _wait_states(index, {SendState.COMMITTED})
        finally:
            service.stop()
        assert [r.state for r in rows] == [SendState.COMMITTED] * 3
        assert all(r.committed_at is not None and r.reason is None for r in rows)
        assert len(pacs.rest("/instances")) == 3
        with index.session() as s:
            audit = s.scalars(select(AuditEvent).where(AuditEvent.kind == "commitment")).all()
        assert sorted(a.outcome for a in audit) == ["committed"] * 3
        # a committed row is not sent again, not even after the commit timeout
        assert outbox.deliver_due(utcnow() + timedelta(days=1)) == 0
        index.dispose()


def test_orthanc_failed_reference_goes_back_to_pending(tmp_path):
    files = make_head_ct(tmp_path / "ct", size=64)[:3]
    node_port = free_port()
    with Orthanc(tmp_path / "orthanc", {"node": ["ICHNODE", "127.0.0.1", node_port]}) as pacs:
        # deliver without commitment first, then lose one instance on the PACS side
        plain = _settings(tmp_path, pacs.dicom_port, commit=False)
        index = open_index(plain)
        outbox = Outbox(plain, index)
        outbox.enqueue("pacs", files)
        assert outbox.deliver_due() == 3
        lost = _rows(index)[1]
        for oid in pacs.rest("/instances"):
            tags = pacs.rest(f"/instances/{oid}")["MainDicomTags"]
            if tags["SOPInstanceUID"] == lost.sop_instance_uid:
                pacs.rest(f"/instances/{oid}", method="DELETE")
        assert len(pacs.rest("/instances")) == 2

        settings = _settings(tmp_path, pacs.dicom_port, commit=True)
        from node.scp import DicomService

        service = DicomService(settings, index, port=node_port).start()
        try:
            ae = AE(ae_title="ICHNODE")
            ae.add_requested_context(commitment.SOP_CLASS)
            assoc = ae.associate("127.0.0.1", pacs.dicom_port, ae_title="ORTHANC")
            assert assoc.is_established
            refs = [(r.sop_class_uid, r.sop_instance_uid) for r in _rows(index)]
            uid, error = commitment.request(assoc, refs)
            assoc.release()
            assert error is None and uid
            assert commitment.wait(uid, REPORT_WAIT_S), "no N-EVENT-REPORT from Orthanc"
        finally:
            service.stop()
        rows = {r.id: r for r in _rows(index)}
        assert rows[lost.id].state == SendState.PENDING
        assert "storage commitment failed" in rows[lost.id].reason
        assert _utc(rows[lost.id].next_attempt_at) > utcnow()  # retried with backoff
        others = [r for i, r in rows.items() if i != lost.id]
        assert [r.state for r in others] == [SendState.COMMITTED] * 2

        # the retry re-sends it (new C-STORE) and Orthanc has it again
        outbox = Outbox(settings.model_copy(update={"send": settings.send.model_copy(
            update={"commit_wait_s": 0})}), index)
        assert outbox.deliver_due(utcnow() + timedelta(seconds=60)) == 1
        assert len(pacs.rest("/instances")) == 3
        index.dispose()


@pytest.mark.skipif(not have_dcmtk(), reason="DCMTK (storescp) not installed")
def test_unconfirmed_sends_are_resent_after_commit_timeout(tmp_path):
    # storescp stores but knows no Storage Commitment: rows stay SENT (unconfirmed)
    files = make_head_ct(tmp_path / "ct", size=64)[:2]
    port = free_port()
    settings = _settings(tmp_path, port, commit_timeout_s=30, commit_wait_s=0)
    index = open_index(settings)
    outbox = Outbox(settings, index)
    outbox.enqueue("pacs", files)
    with storescp(port, tmp_path / "rx", aet="ORTHANC"):
        assert outbox.deliver_due() == 2
        rows = _rows(index)
        assert [r.state for r in rows] == [SendState.SENT] * 2
        assert outbox.deliver_due(utcnow() + timedelta(seconds=10)) == 0  # not yet timed out
        assert outbox.deliver_due(utcnow() + timedelta(seconds=31)) == 2  # re-sent
    rows = _rows(index)
    assert [r.state for r in rows] == [SendState.SENT] * 2
    assert all(r.attempts == 2 for r in rows)
    with index.session() as s:
        outcomes = [a.outcome for a in s.scalars(
            select(AuditEvent).where(AuditEvent.kind == "commitment"))]
    assert outcomes.count("timeout") == 2 and "failed" in outcomes
    index.dispose()


class SyncCommitPeer:
    """A pynetdicom Storage + Storage Commitment SCP that reports on the *same* association
    (PS3.4 J.3.3 allows both); ``fail`` names SOP Instance UIDs it reports as failed."""

    def __init__(self, fail: set[str] = frozenset()) -> None:
        from pynetdicom import evt
        from pynetdicom.presentation import AllStoragePresentationContexts

        self.fail, self.stored = set(fail), set()
        self.ae = AE(ae_title="ORTHANC")
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax)
        self.ae.add_supported_context(commitment.SOP_CLASS)
        self.port = free_port()
        self.handlers = [(evt.EVT_C_STORE, self._store), (evt.EVT_N_ACTION, self._action)]

    def _store(self, event):  # noqa: ANN001, ANN202
        self.stored.add(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def _action(self, event):  # noqa: ANN001, ANN202
        import threading

        from pydicom.dataset import Dataset

        info = event.action_information
        report = Dataset()
        report.TransactionUID = info.TransactionUID
        ok, bad = [], []
        for ref in info.ReferencedSOPSequence:
            item = Dataset()
            item.ReferencedSOPClassUID = ref.ReferencedSOPClassUID
            item.ReferencedSOPInstanceUID = ref.ReferencedSOPInstanceUID
            uid = str(ref.ReferencedSOPInstanceUID)
            if uid in self.fail or uid not in self.stored:
                item.FailureReason = 0x0110
                bad.append(item)
            else:
                ok.append(item)
        report.ReferencedSOPSequence = ok
        if bad:
            report.FailedSOPSequence = bad
        assoc = event.assoc

        def send() -> None:  # after our N-ACTION response, still on this association
            time.sleep(0.2)
            assoc.send_n_event_report(report, 2 if bad else 1, commitment.SOP_CLASS,
                                      commitment.SOP_INSTANCE)

        threading.Thread(target=send, daemon=True).start()
        return 0x0000, None

    def __enter__(self) -> "SyncCommitPeer":
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=self.handlers)
        return self

    def __exit__(self, *exc) -> None:
        self.ae.shutdown()


def test_report_on_same_association_commits_and_fails(tmp_path):
    files = make_head_ct(tmp_path / "ct", size=64)[:3]
    peer = SyncCommitPeer()
    settings = _settings(tmp_path, peer.port, commit_wait_s=10)
    index = open_index(settings)
    outbox = Outbox(settings, index)
    outbox.enqueue("pacs", files)
    peer.fail.add(_rows(index)[0].sop_instance_uid)
    with peer:
        start = time.monotonic()
        assert outbox.deliver_due() == 3
        assert time.monotonic() - start < 8  # returned on the report, not after commit_wait_s
    rows = _rows(index)
    assert rows[0].state == SendState.PENDING and "0x0110" in rows[0].reason
    assert [r.state for r in rows[1:]] == [SendState.COMMITTED] * 2
    index.dispose()
