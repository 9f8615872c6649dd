"""Intake with real peers: DCMTK storescu/echoscu and pynetdicom SCUs against node.scp.DicomService."""

from __future__ import annotations

import hashlib
import subprocess

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit,
                         JPEGLosslessSV1, JPEGLSLossless,
                         RLELossless)
from pynetdicom import AE
from sqlalchemy import func, select

from node.index import AuditEvent, Instance, Series, Study, StudyState
from intake_helpers import (DCMTK_ENV, SeriesSpec, compress_rle, dataset_bytes, echoscu, have_dcmtk, make_head_ct,
                                  node_settings, running_node, storescu,
                           storescu_as_stored)

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="DCMTK (storescu/echoscu) not installed")


def _instances(index) -> dict[str, Instance]:
    with index.session() as s:
        return {i.sop_instance_uid: i for i in s.scalars(select(Instance))}


def test_storescu_head_ct_is_indexed_and_stored_as_sent(tmp_path):
    files = make_head_ct(tmp_path / "ct")
    settings = node_settings(tmp_path)
    with running_node(settings) as node:
        assert echoscu(node.port).returncode == 0
        result = storescu(node.port, files)
        assert result.returncode == 0, result.stderr
        rows = _instances(node.index)
        assert len(rows) == len(files)
        for path in files:
            ds = dcmread(path, stop_before_pixels=True)
            row = rows[ds.SOPInstanceUID]
            stored = node.spool.path_of(row.path)
            # Dataset part byte-identical to what storescu read from the source file.
            assert dataset_bytes(stored) == dataset_bytes(path)
            assert row.sha256 == hashlib.sha256(stored.read_bytes()).hexdigest()
            assert row.size == stored.stat().st_size
            assert row.transfer_syntax_uid == ExplicitVRLittleEndian
            assert row.calling_ae == "STORESCU"
            assert row.meta["ImagePositionPatient"] == pytest.approx(
                [float(v) for v in ds.ImagePositionPatient])
            assert row.meta["ImageType"] == list(ds.ImageType)
            assert row.meta["ConvolutionKernel"] == ds.ConvolutionKernel
            assert row.meta["SliceThickness"] == float(ds.SliceThickness)
            assert (row.meta["Rows"], row.meta["Columns"]) == (512, 512)
            assert row.meta["InstanceNumber"] == ds.InstanceNumber
            assert row.meta["BodyPartExamined"] == "HEAD"
            assert "PatientID" not in row.meta  # identity stays in the study row only
        with node.index.session() as s:
            study = s.scalars(select(Study)).one()
            assert study.state == StudyState.RECEIVING
            assert study.instance_count == len(files)
            assert study.patient_id == "PH0001"
            counts = sorted(s.execute(select(Series.description, Series.instance_count)).all())
            assert counts == [("HEAD 2.5mm BONE", 6), ("HEAD 5mm STD", 8), ("TOPOGRAM", 1)]
            audit = s.execute(select(AuditEvent.kind, AuditEvent.outcome)).all()
        assert audit.count(("instance", "ok")) == len(files)
        assert ("association", "accepted") in audit
        # No temporary files left behind.
        assert not list(node.spool.root.rglob("*.tmp"))
        assert echoscu(node.port).returncode == 0


def test_resend_is_idempotent_and_reopens_study(tmp_path):
    files = make_head_ct(tmp_path / "ct")[:4]
    settings = node_settings(tmp_path)
    with running_node(settings) as node:
        assert storescu(node.port, files).returncode == 0
        with node.index.session() as s:
            study = s.scalars(select(Study)).one()
            study.state = StudyState.COMPLETE
        first = _instances(node.index)
        # Identical re-send: success, no new rows, the study stays COMPLETE (nothing new).
        assert storescu(node.port, files).returncode == 0
        again = _instances(node.index)
        assert {k: v.id for k, v in again.items()} == {k: v.id for k, v in first.items()}
        with node.index.session() as s:
            assert s.scalars(select(Study)).one().state == StudyState.COMPLETE
            assert s.scalar(select(func.count()).select_from(Instance)) == 4
        # Different content under the same SOP Instance UID: newest wins, study re-opens.
        ds = dcmread(files[0])
        ds.SeriesDescription = "HEAD 5mm STD corrected"
        ds.save_as(files[0])
        assert storescu(node.port, [files[0]]).returncode == 0
        rows = _instances(node.index)
        uid = ds.SOPInstanceUID
        assert rows[uid].id == first[uid].id
        assert rows[uid].sha256 != first[uid].sha256
        assert dataset_bytes(node.spool.path_of(rows[uid].path)) == dataset_bytes(files[0])
        assert not node.spool.path_of(first[uid].path).exists()
        with node.index.session() as s:
            study = s.scalars(select(Study)).one()
            assert study.state == StudyState.RECEIVING
            assert study.instance_count == 4
            assert s.scalar(select(func.count()).select_from(AuditEvent)
                            .where(AuditEvent.outcome == "replaced")) == 1
        assert len(list(node.spool.root.rglob("*.dcm"))) == 4


def test_explicit_vr_le_preferred_when_sender_offers_implicit_first(tmp_path):
    path = make_head_ct(tmp_path / "ct")[0]
    settings = node_settings(tmp_path)
    with running_node(settings) as node:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(CTImageStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", node.port, ae_title="ICHNODE")
        assert assoc.is_established
        assert assoc.accepted_contexts[0].transfer_syntax[0] == ExplicitVRLittleEndian
        status = assoc.send_c_store(dcmread(path))
        assoc.release()
        assert status.Status == 0x0000
        row = next(iter(_instances(node.index).values()))
        assert row.transfer_syntax_uid == ExplicitVRLittleEndian


def _pixel_bytes(path) -> bytes:
    return dcmread(path).PixelData  # encapsulated fragments as in the file (not decoded)


BUNDLED_COMPRESSED = ("JPEG2000.dcm", "JPEG-lossy.dcm", "SC_rgb_jpeg_gdcm.dcm",
                      "SC_rgb_jpeg_dcmtk.dcm", "MR_small_jpeg_ls_lossless.dcm",
                      "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm")
COMPRESSED_SYNTAXES = {RLELossless, JPEG2000Lossless, JPEG2000, JPEGBaseline8Bit,
                       JPEGExtended12Bit, JPEGLosslessSV1, JPEGLSLossless}


def test_compressed_input_stored_as_received_from_storescu(tmp_path):
    ct = make_head_ct(tmp_path / "ct")[:3]
    rle = compress_rle(ct, tmp_path / "rle")
    bundled = [get_testdata_file(n, download=False) for n in BUNDLED_COMPRESSED]
    settings = node_settings(tmp_path)
    with running_node(settings) as node:
        # Each file proposed in its own transfer syntax only: no conversion by the sender.
        for result in storescu_as_stored(node.port, rle):
            assert result.returncode == 0, result.stderr
        rows = _instances(node.index)
        seen = set()
        for path in rle:  # pydicom wrote these; storescu sends them unchanged
            row = rows[dcmread(path, stop_before_pixels=True).SOPInstanceUID]
            assert row.transfer_syntax_uid == RLELossless
            assert dataset_bytes(node.spool.path_of(row.path)) == dataset_bytes(path)
        for path in bundled:
            # One at a time: several bundled files share a SOP Instance UID (newest wins).
            for result in storescu_as_stored(node.port, [path]):
                assert result.returncode == 0, result.stderr
            # storescu drops group lengths/padding of some bundled files while sending, so
            # compare what matters: same transfer syntax, same compressed pixel stream.
            ds = dcmread(path, stop_before_pixels=True)
            row = _instances(node.index)[ds.SOPInstanceUID]
            assert row.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
            assert _pixel_bytes(node.spool.path_of(row.path)) == _pixel_bytes(path)
            seen.add(row.transfer_syntax_uid)
        assert COMPRESSED_SYNTAXES - {RLELossless} <= seen | {RLELossless}, seen


def test_compressed_input_byte_identical_from_pynetdicom(tmp_path):
    from pynetdicom import _config

    bundled = [get_testdata_file(n, download=False) for n in BUNDLED_COMPRESSED]
    settings = node_settings(tmp_path)
    with running_node(settings) as node:
        ae = AE(ae_title="PYSCU")
        for path in bundled:
            meta = dcmread(path, stop_before_pixels=True).file_meta
            ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
        old, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
        try:  # chunked: pynetdicom sends the file's dataset bytes verbatim
            assoc = ae.associate("127.0.0.1", node.port, ae_title="ICHNODE")
            assert assoc.is_established
            seen = set()
            for path in bundled:  # one at a time: some share a SOP Instance UID
                assert assoc.send_c_store(path).Status == 0x0000
                row = _instances(node.index)[dcmread(path, stop_before_pixels=True).SOPInstanceUID]
                assert dataset_bytes(node.spool.path_of(row.path)) == dataset_bytes(path)
                seen.add(row.transfer_syntax_uid)
            assoc.release()
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = old
        assert seen == COMPRESSED_SYNTAXES


def test_concurrent_associations_same_study(tmp_path):
    files = make_head_ct(tmp_path / "ct", series=tuple(
        SeriesSpec(f"HEAD {n}", 6, 2.5, "H30s") for n in range(3)))
    by_series: dict[str, list] = {}
    for f in files:
        by_series.setdefault(f.name[:3], []).append(f)
    with running_node(node_settings(tmp_path)) as node:
        procs = [subprocess.Popen(["storescu", "-aec", "ICHNODE", "127.0.0.1", str(node.port),
                                   *map(str, group)], env=DCMTK_ENV, stderr=subprocess.PIPE)
                 for group in by_series.values()]
        assert [p.wait(60) for p in procs] == [0, 0, 0]
        with node.index.session() as s:
            study = s.scalars(select(Study)).one()
            assert study.instance_count == len(files) == 18
            assert sorted(s.scalars(select(Series.instance_count))) == [6, 6, 6]
        assert len(_instances(node.index)) == 18


def test_restart_removes_rows_whose_file_is_missing(tmp_path):
    files = make_head_ct(tmp_path / "ct")[:3]
    settings = node_settings(tmp_path)
    with running_node(settings) as node:
        assert storescu(node.port, files).returncode == 0
        lost = next(iter(_instances(node.index).values()))
        node.spool.path_of(lost.path).unlink()  # as if the crash hit before the file was durable
        index = node.index
    with running_node(settings, index=index) as node:
        rows = _instances(node.index)
        assert lost.sop_instance_uid not in rows and len(rows) == 2
        with node.index.session() as s:
            assert s.scalars(select(Study)).one().instance_count == 2
        # The sender's re-send (it never got an ACK) stores it again.
        assert storescu(node.port, files).returncode == 0
        assert len(_instances(node.index)) == 3
    index.dispose()
