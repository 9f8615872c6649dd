"""Bad input and refusals: each gets its precise status and the service keeps serving (C-ECHO)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification
from sqlalchemy import func, select

from intake_helpers import (DCMTK_ENV, SeriesSpec, echoscu, free_port, have_dcmtk, make_head_ct, node_settings,
                            running_node, storescu)
from node.index import AuditEvent, Index, Instance

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="DCMTK (storescu/echoscu) not installed")


@contextmanager
def _chunked_send():
    # pynetdicom then streams a file's dataset bytes as they are (truncated/garbage included).
    old, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


def _store(port: int, items, *, ae_title: str = "PYSCU") -> list[int | None]:
    """C-STORE each item (path or Dataset) on one association; the statuses."""
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="ICHNODE")
    assert assoc.is_established
    try:
        with _chunked_send():
            return [getattr(assoc.send_c_store(item), "Status", None) for item in items]
    finally:
        assoc.release()


def _counts(node) -> tuple[int, int]:
    with node.index.session() as s:
        rows = s.scalar(select(func.count()).select_from(Instance))
    files = len(list(node.spool.root.rglob("*.dcm"))) + len(list(node.spool.root.rglob("*.tmp")))
    return rows, files


def _serving(port: int, aet: str = "ECHOSCU") -> bool:
    return echoscu(port, aet=aet).returncode == 0


def _file_with(tmp_path: Path, name: str, dataset_bytes: bytes, *, sop_uid: str | None = None) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    path = tmp_path / name
    path.write_bytes(buf.getvalue() + dataset_bytes)
    return path


def test_truncated_and_garbage_datasets_cannot_be_understood(tmp_path):
    ct = make_head_ct(tmp_path / "ct")[:2]
    raw = ct[0].read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(raw[: int(len(raw) * 0.6)])  # cut inside the pixel data
    garbage = _file_with(tmp_path, "garbage.dcm", os.urandom(4096))
    with running_node(node_settings(tmp_path)) as node:
        assert _store(node.port, [truncated, garbage, ct[1]]) == [0xC000, 0xC000, 0x0000]
        assert _counts(node) == (1, 1)  # only the good one; nothing half-written
        with node.index.session() as s:
            failed = s.scalars(select(AuditEvent.detail).where(AuditEvent.outcome == "failed")).all()
        assert len(failed) == 2 and all(d.startswith("0xC000") for d in failed)
        assert _serving(node.port)


def test_missing_uids_and_mismatched_instance_uid_do_not_match_sop_class(tmp_path):
    ct = make_head_ct(tmp_path / "ct")[:2]
    no_study = dcmread(ct[0])
    del no_study.StudyInstanceUID
    # Meta (= the C-STORE request) names another SOP Instance UID than the dataset.
    ds = dcmread(ct[1])
    body = ct[1].read_bytes()[132 + 12 + ds.file_meta.FileMetaInformationGroupLength:]
    mismatched = _file_with(tmp_path, "mismatch.dcm", body, sop_uid=generate_uid())
    with running_node(node_settings(tmp_path)) as node:
        assert _store(node.port, [no_study, mismatched]) == [0xA900, 0xA900]
        assert _counts(node) == (0, 0)
        assert _serving(node.port)


def test_non_dicom_byte_stream_on_the_port(tmp_path):
    with running_node(node_settings(tmp_path)) as node:
        with socket.create_connection(("127.0.0.1", node.port)) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(2048))
            sock.settimeout(10)
            try:
                reply = sock.recv(16)  # an A-ABORT (type 0x07) or just a close
            except ConnectionResetError:
                reply = b""
        assert reply[:1] in (b"", b"\x07")
        assert _serving(node.port)


def test_unknown_sop_class_is_rejected_at_negotiation(tmp_path):
    with running_node(node_settings(tmp_path)) as node:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context("1.2.826.0.1.3680043.9.7433.99.1", ExplicitVRLittleEndian)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="ICHNODE")
        assert assoc.is_established
        rejected = {cx.abstract_syntax: cx.result for cx in assoc.rejected_contexts}
        assoc.release()
        # 0x03: abstract syntax not supported (PS3.8 9.3.3.2)
        assert rejected == {"1.2.826.0.1.3680043.9.7433.99.1": 0x03}
        assert _serving(node.port)


def test_calling_and_called_ae_checks(tmp_path):
    files = make_head_ct(tmp_path / "ct")[:1]
    settings = node_settings(tmp_path, dicom={"allowed_calling_aes": ["GOODSCU"]})
    with running_node(settings) as node:
        bad = storescu(node.port, files, aet="BADSCU")
        assert bad.returncode != 0
        assert "Calling AE Title Not Recognized" in bad.stderr
        wrong_called = storescu(node.port, files, aet="GOODSCU", aec="SOMEONE")
        assert "Called AE Title Not Recognized" in wrong_called.stderr
        assert _counts(node) == (0, 0)
        with node.index.session() as s:
            details = s.scalars(select(AuditEvent.detail).where(
                AuditEvent.kind == "association", AuditEvent.outcome == "rejected")).all()
        assert any("calling AE" in d and "1/1/3" in d for d in details)
        assert any("called AE" in d and "1/1/7" in d for d in details)
        assert storescu(node.port, files, aet="GOODSCU").returncode == 0
        assert _serving(node.port, aet="GOODSCU")


def test_address_allow_list(tmp_path):
    settings = node_settings(tmp_path, dicom={"allowed_addresses": ["127.0.0.2/32"]})
    with running_node(settings) as node:
        refused = echoscu(node.port)  # connects from 127.0.0.1
        assert refused.returncode != 0
        assert "Rejected Permanent, Source: Service User" in refused.stderr
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="ICHNODE",
                             bind_address=("127.0.0.2", 0))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()


def test_max_associations_local_limit(tmp_path):
    with running_node(node_settings(tmp_path, dicom={"max_associations": 1})) as node:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(Verification)
        first = ae.associate("127.0.0.1", node.port, ae_title="ICHNODE")
        assert first.is_established
        second = ae.associate("127.0.0.1", node.port, ae_title="ICHNODE")
        assert second.is_rejected
        rj = second.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
        first.release()
        time.sleep(0.2)  # the acceptor thread ends after the release
        assert _serving(node.port)


def test_peer_aborts_mid_association(tmp_path):
    files = make_head_ct(tmp_path / "ct", series=(SeriesSpec("HEAD", 40, 2.5, "H30s"),))
    with running_node(node_settings(tmp_path)) as node:
        # A-ABORT after one instance: what was acknowledged stays.
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="ICHNODE")
        assert assoc.send_c_store(dcmread(files[0])).Status == 0x0000
        assoc.abort()
        # storescu killed while sending: the TCP connection drops mid-transfer.
        proc = subprocess.Popen(["storescu", "-aec", "ICHNODE", "127.0.0.1", str(node.port),
                                 *map(str, files[1:])], env=DCMTK_ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while _counts(node)[0] < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(0.5)
        rows, files_on_disk = _counts(node)
        assert 5 <= rows < len(files)
        assert files_on_disk == rows  # no orphan, no temp file
        with node.index.session() as s:
            outcomes = s.scalars(select(AuditEvent.outcome).where(
                AuditEvent.kind == "association")).all()
        assert outcomes.count("aborted") >= 2
        assert _serving(node.port)


def test_unwritable_spool_is_out_of_resources_then_recovers(tmp_path):
    files = make_head_ct(tmp_path / "ct")[:1]
    with running_node(node_settings(tmp_path)) as node:
        spool = node.spool.root
        shutil.rmtree(spool)
        spool.write_text("not a folder")  # root can write anywhere: make the path unusable
        assert storescu(node.port, files).returncode != 0
        assert _store(node.port, [dcmread(files[0])]) == [0xA701]
        with node.index.session() as s:
            assert s.scalar(select(func.count()).select_from(Instance)) == 0
        assert _serving(node.port)
        spool.unlink()
        spool.mkdir()
        assert _store(node.port, [dcmread(files[0])]) == [0x0000]


def test_free_space_below_minimum_is_out_of_resources(tmp_path):
    files = make_head_ct(tmp_path / "ct")[:1]
    settings = node_settings(tmp_path, storage={"min_free_mb": 10**9})
    with running_node(settings) as node:
        assert _store(node.port, [dcmread(files[0])]) == [0xA700]
        assert _counts(node) == (0, 0)
        assert _serving(node.port)


def test_index_down_is_out_of_resources_and_leaves_no_file(tmp_path):
    files = make_head_ct(tmp_path / "ct")[:1]
    settings = node_settings(tmp_path)
    down = Index(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test")
    with running_node(settings, index=down) as node:
        assert _store(node.port, [dcmread(files[0])]) == [0xA702]
        assert not list(node.spool.root.rglob("*.dcm"))
        assert not list(node.spool.root.rglob("*.tmp"))
        assert _serving(node.port)
    down.dispose()
