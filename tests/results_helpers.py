"""Small synthetic head-CT series and "model output" for the results tests.

The series is written with pydicom (CT Image Storage, signed 16-bit, rescale -1024) and can be
gantry-tilted with uneven slice spacing, the geometry that breaks naive SEG writers. Masks are
on the (k, j, i) grid of the position-sorted slices, exactly like the gpu step's masks.npz.
Also starts/stops the real peers the tests use (DCMTK storescp, Orthanc, an MLLP listener, an
HTTP receiver) on 127.0.0.1 with free ports.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.server
import json
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from models.results import AnalysisResult, ModelInfo, SubtypeResult, SUBTYPES


@dataclass
class SyntheticStudy:
    paths: list[Path]  # in acquisition (not sorted) order, like files arriving
    masks: dict[str, np.ndarray]  # (k, j, i) on position-sorted slices
    study_uid: str
    series_uid: str
    positions_z: list[float]
    spacing_xy: float
    meta: dict = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_ct_series(out_dir: Path, *, slices: int = 20, matrix: int = 64, tilt_deg: float = 0.0,
                    uneven: bool = False, subtypes: tuple[str, ...] = ("intraparenchymal",),
                    patient_id: str = "PAT-0001", seed: int = 0,
                    station: str = "CT1") -> SyntheticStudy:
    """A head-like CT series (ellipse brain, skull rim, ventricles, a bleed) + truth masks."""
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    spacing_xy = 3.5
    steps = [5.0] * (slices - 1)
    if uneven:
        steps = [5.0 if k % 4 else 7.5 for k in range(slices - 1)]
    z = np.concatenate([[0.0], np.cumsum(steps)]) - 40.0
    t = np.deg2rad(tilt_deg)
    # Tilted gantry: image plane rotated about x; table (slice) positions still move along z.
    row_dir = np.array([1.0, 0.0, 0.0])
    col_dir = np.array([0.0, np.cos(t), np.sin(t)])
    jj, ii = np.mgrid[0:matrix, 0:matrix]
    c = (matrix - 1) / 2
    r = ((ii - c) / (matrix * 0.42)) ** 2 + ((jj - c) / (matrix * 0.47)) ** 2
    masks = {n: np.zeros((slices, matrix, matrix), bool) for n in
             ("hematoma", "ventricle_left", "ventricle_right")}
    subtype_map = np.zeros((slices, matrix, matrix), np.uint8)
    hu = np.full((slices, matrix, matrix), -1000, np.int16)
    for k in range(slices):
        inside = r < 1.0
        brain = r < 0.8
        sl = np.where(inside, 1200, -1000).astype(np.int16)
        sl[brain] = 32 + rng.integers(-3, 4, size=int(brain.sum()))
        kk = (k - slices / 2) / (slices / 2)
        if abs(kk) < 0.5:  # ventricles on the middle slices
            for name, dx in (("ventricle_left", +0.12), ("ventricle_right", -0.12)):
                # Patient left = +x = larger column index with row direction (1,0,0).
                v = ((ii - c - dx * matrix) / (matrix * 0.06)) ** 2 + ((jj - c) / (matrix * 0.16)) ** 2 < 1
                masks[name][k] = v
                sl[v] = 5
        for n, sub in enumerate(subtypes):
            code = 1 + SUBTYPES.index(sub)
            if abs(kk) < 0.35:
                cx = c + (-0.22 + 0.3 * n) * matrix
                b = ((ii - cx) / (matrix * 0.08)) ** 2 + ((jj - c + 0.18 * matrix) / (matrix * 0.08)) ** 2 < 1
                b &= brain
                masks["hematoma"][k] |= b
                subtype_map[k][b] = code
                sl[b] = 70
        hu[k] = sl
    masks["hematoma_subtype"] = subtype_map
    order = rng.permutation(slices)  # files are written (and arrive) unsorted
    paths = []
    for n, k in enumerate(order):
        ds = _ct_dataset(hu[k], study_uid, series_uid, frame_uid, patient_id, station,
                         position=(-c * spacing_xy, -c * spacing_xy * np.cos(t), z[k] - c * spacing_xy * np.sin(t)),
                         orientation=(*row_dir, *col_dir), spacing=spacing_xy,
                         instance=int(k) + 1, tilt=tilt_deg)
        p = out_dir / f"ct_{n:03d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return SyntheticStudy(paths=paths, masks=masks, study_uid=study_uid, series_uid=series_uid,
                          positions_z=list(z), spacing_xy=spacing_xy)


def _ct_dataset(pixels: np.ndarray, study_uid: str, series_uid: str, frame_uid: str,
                patient_id: str, station: str, *, position, orientation, spacing: float,
                instance: int, tilt: float) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    sop_uid = generate_uid()
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = "20261123"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "101500"
    ds.AccessionNumber = "ACC-" + patient_id[-4:]
    ds.Modality = "CT"
    ds.Manufacturer = "SynthCT"
    ds.StationName = station
    ds.InstitutionName = "Test Hospital"
    ds.ReferringPhysicianName = "Doe^Referrer"
    ds.StudyDescription = "CT HEAD WITHOUT CONTRAST"
    ds.SeriesDescription = "Head 5mm soft tissue"
    ds.PatientName = "Test^Patient"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "M"
    ds.BodyPartExamined = "HEAD"
    ds.SliceThickness = "5"
    ds.KVP = "120"
    ds.GantryDetectorTilt = f"{tilt:g}"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.InstanceNumber = instance
    ds.AcquisitionNumber = 1
    ds.ImagePositionPatient = [round(float(v), 4) for v in position]
    ds.ImageOrientationPatient = [round(float(v), 6) for v in orientation]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [spacing, spacing]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
    ds.WindowCenter, ds.WindowWidth = "40", "80"
    ds.PixelData = (pixels.astype(np.int32) + 1024).astype(np.int16).tobytes()
    return ds


def analysis_result(masks: dict[str, np.ndarray], *, voxel_ml: float, present=("intraparenchymal",),
                    shift_mm: float = 2.0) -> AnalysisResult:
    """The gpu step's result built from ground-truth masks (the models are trained elsewhere)."""
    findings = {}
    for label in SUBTYPES:
        p = 0.93 if label in present else 0.04
        findings[label] = SubtypeResult(probability=p, present=p >= 0.5, threshold=0.5)
    any_p = 0.97 if present else 0.03
    findings["any"] = SubtypeResult(probability=any_p, present=any_p >= 0.5, threshold=0.5)
    vol = float(masks["hematoma"].sum()) * voxel_ml
    return AnalysisResult(
        models=[ModelInfo(name="ichnode-triage", version="0.1.0", sha256="a" * 64),
                ModelInfo(name="ichnode-segment", version="0.1.0",
                          sha256=hashlib.sha256(b"weights").hexdigest())],
        findings=findings,
        hematoma_volume_ml=round(vol, 2), hematoma_abc2_ml=round(vol * 1.2, 2),
        midline_shift_mm=shift_mm,
        ventricle_left_ml=round(float(masks["ventricle_left"].sum()) * voxel_ml, 2),
        ventricle_right_ml=round(float(masks["ventricle_right"].sum()) * voxel_ml, 2),
        max_hematoma_slice=int(np.argmax(masks["hematoma"].sum(axis=(1, 2)))),
        masks_file="masks.npz",
    )


def read_all(paths) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in paths]


# ----------------------------------------------------------------------------- peers
class StoreSCP:
    """DCMTK storescp on 127.0.0.1 writing into a folder."""

    def __init__(self, folder: Path, ae_title: str = "PACS") -> None:
        self.folder, self.ae_title, self.port = folder, ae_title, free_port()
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "StoreSCP":
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["storescp", "--aetitle", self.ae_title, "--output-directory", str(self.folder),
             "--promiscuous", "--accept-all", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class Orthanc:
    """Debian Orthanc on loopback with a temp config: DICOM + REST, no auth."""

    def __init__(self, folder: Path, ae_title: str = "ORTHANC") -> None:
        self.folder, self.ae_title = folder, ae_title
        self.dicom_port, self.http_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Orthanc":
        self.folder.mkdir(parents=True, exist_ok=True)
        cfg = {
            "Name": "ichnode-test", "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"), "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port, "HttpPort": self.http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "Plugins": [],
            "HttpServerEnabled": True, "DicomServerEnabled": True, "UnknownSopClassAccepted": True,
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(cfg))
        self.proc = subprocess.Popen([shutil.which("Orthanc") or "/usr/sbin/Orthanc", str(path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.http_port, timeout=30)
        _wait_port(self.dicom_port, timeout=30)
        return self

    def get(self, url: str):
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{url}", timeout=10) as r:
            return json.loads(r.read())

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _wait_port(port: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port}")


class MLLPPeer:
    """A real MLLP listener (hl7.mllp asyncio server) that ACKs and keeps what it received."""

    def __init__(self, ack_code: str = "AA") -> None:
        self.port, self.ack_code = free_port(), ack_code
        self.messages: list = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server = None

    async def _handle(self, reader, writer) -> None:
        try:
            while not writer.is_closing():
                msg = await reader.readmessage()
                self.messages.append(msg)
                writer.writemessage(msg.create_ack(ack_code=self.ack_code))
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    def __enter__(self) -> "MLLPPeer":
        import hl7.mllp

        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            hl7.mllp.start_hl7_server(self._handle, host="127.0.0.1", port=self.port), self._loop)
        self._server = fut.result(10)
        return self

    def __exit__(self, *exc) -> None:
        async def _close():
            self._server.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(_close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class WebhookReceiver:
    """http.server on 127.0.0.1 that checks the HMAC signature of each POST."""

    def __init__(self, secret: str, fail_first: int = 0) -> None:
        self.secret, self.port, self.fail_first = secret.encode(), free_port(), fail_first
        self.received: list[dict] = []
        self.attempts = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.attempts += 1
                if outer.attempts <= outer.fail_first:
                    self.send_response(503)
                    self.end_headers()
                    return
                ts = self.headers.get("X-Ichnode-Timestamp", "")
                sig = self.headers.get("X-Ichnode-Signature", "")
                want = "sha256=" + hmac.new(outer.secret, ts.encode() + b"." + body,
                                            hashlib.sha256).hexdigest()
                ok = hmac.compare_digest(sig, want)
                outer.received.append({"valid": ok, "body": json.loads(body), "headers": dict(self.headers)})
                self.send_response(204 if ok else 401)
                self.end_headers()

            def log_message(self, *args):  # keep test output quiet
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def __enter__(self) -> "WebhookReceiver":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)


# ----------------------------------------------------------------------------- index
def register_study(settings, index, st: SyntheticStudy, *, calling_ae: str = "SCANNER",
                   job_state=None, job_reason: str | None = None, entities=None,
                   write_series_json: bool = True) -> tuple[int, int]:
    """Put a synthetic study into the spool + index like intake/prepare would; returns
    (study id, job id). ``series.json`` lists the slices in position order (the volume order)."""
    from datetime import timedelta

    from node.index import Instance, Job, JobState, Series, Study, utcnow
    from workers.report.sources import sort_by_position

    spool = Path(settings.storage.spool_dir)
    dest = spool / "studies" / st.study_uid[-12:]
    dest.mkdir(parents=True, exist_ok=True)
    datasets = []
    with index.session() as s:
        last = utcnow() - timedelta(seconds=3)
        study = Study(study_uid=st.study_uid, patient_id="PAT-0001", accession_number="ACC-0001",
                      calling_ae=calling_ae, instance_count=len(st.paths), last_received=last,
                      selected_series_uid=st.series_uid, entities=entities)
        series = Series(series_uid=st.series_uid, modality="CT", description="Head 5mm soft tissue",
                        body_part="HEAD", instance_count=len(st.paths))
        study.series.append(series)
        for p in st.paths:
            target = dest / p.name
            shutil.copyfile(p, target)
            ds = pydicom.dcmread(target, stop_before_pixels=True)
            datasets.append((ds, target))
            series.instances.append(Instance(
                sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                path=str(target.relative_to(spool)), size=target.stat().st_size,
                sha256=hashlib.sha256(target.read_bytes()).hexdigest(), calling_ae=calling_ae))
        job = Job(kind="analyze", state=job_state or JobState.RUNNING, step="report", reason=job_reason)
        study.jobs.append(job)
        s.add(study)
        s.flush()
        study_id, job_id = study.id, job.id
    if write_series_json:
        by_uid = {ds.SOPInstanceUID: path for ds, path in datasets}
        ordered = sort_by_position([ds for ds, _ in datasets])
        job_dir = settings.storage.root / "jobs" / str(job_id)
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "series.json").write_text(json.dumps({
            "study_uid": st.study_uid, "series_uid": st.series_uid,
            "slices": [{"sop_instance_uid": ds.SOPInstanceUID, "path": str(by_uid[ds.SOPInstanceUID])}
                       for ds in ordered]}))
    return study_id, job_id


def write_work_item(settings, st: SyntheticStudy, result: AnalysisResult, name: str = "w1") -> Path:
    """The gpu step's output folder: results.json + masks.npz (no identity)."""
    work = Path(settings.storage.work_dir) / name
    work.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(work / "masks.npz", **st.masks)
    result.masks_file = "masks.npz"
    (work / "results.json").write_text(result.model_dump_json())
    return work
