"""Test fixtures of the job-queue area: small head-CT studies on disk and in the index, and
real Celery workers (Redis or the embedded filesystem transport) started as subprocesses."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from node.config import Settings
from node.index import Index, Instance, Series, Study, utcnow

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _phantom_slice(z_index: int, n: int, size: int) -> np.ndarray:
    """An axial head-like slice: air, skull ring (~1000 HU), brain (~35 HU), a small bleed."""
    yy, xx = np.mgrid[:size, :size]
    c = size / 2
    scale = 1.0 - abs(z_index - n / 2) / n  # head narrows towards top and bottom
    r = np.hypot((xx - c) / (0.36 * size * scale + 1), (yy - c) / (0.44 * size * scale + 1))
    img = np.full((size, size), -1000, np.int16)
    img[r < 1.0] = 1000
    img[r < 0.92] = 35
    img[np.hypot(xx - c * 1.2, yy - c) < size * 0.04] = 70
    return img


@dataclass
class SeriesSpec:
    number: int
    description: str = "Head 5mm"
    kernel: str = "H31s"
    thickness: float = 5.0
    slices: int = 20
    image_type: tuple = ("ORIGINAL", "PRIMARY", "AXIAL")
    orientation: tuple = (1, 0, 0, 0, 1, 0)
    body_part: str | None = "HEAD"
    modality: str = "CT"
    size: int = 512
    series_uid: str = field(default_factory=generate_uid)


def write_series(folder: Path, study_uid: str, spec: SeriesSpec, *, patient_id: str = "PAT1",
                 accession: str = "ACC1") -> list[Path]:
    """Write one CT series (explicit VR LE, int16, real geometry) and return the file paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    row = np.array(spec.orientation[:3], float)
    col = np.array(spec.orientation[3:], float)
    normal = np.cross(row, col)
    spacing = 0.48828125 * 512 / spec.size
    origin = np.array([-125.0, -125.0, -50.0])
    for k in range(spec.slices):
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = spec.series_uid
        ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid])
        ds.PatientName = "Test^Queue"
        ds.PatientID = patient_id
        ds.AccessionNumber = accession
        ds.StudyDate = "20260101"
        ds.StudyTime = "120000"
        ds.StudyDescription = "CT HEAD WO CONTRAST"
        ds.Modality = spec.modality
        ds.SeriesNumber = spec.number
        ds.InstanceNumber = spec.slices - k  # reversed on purpose: sorting must use positions
        ds.SeriesDescription = spec.description
        if spec.body_part:
            ds.BodyPartExamined = spec.body_part
        ds.ImageType = list(spec.image_type)
        ds.ConvolutionKernel = spec.kernel
        ds.SliceThickness = spec.thickness
        ds.ImageOrientationPatient = [float(v) for v in spec.orientation]
        ds.ImagePositionPatient = [round(float(v), 4) for v in origin + normal * k * spec.thickness]
        ds.PixelSpacing = [spacing, spacing]
        ds.Rows = ds.Columns = spec.size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.PixelData = _phantom_slice(k, spec.slices, spec.size).tobytes()
        path = folder / f"s{spec.number:03d}_{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def head_study(folder: Path, *, slices: int = 20,
               size: int = 512) -> tuple[str, dict[str, SeriesSpec], list[Path]]:
    """A head CT study: soft-tissue 5 mm, bone-kernel 5 mm, and a localizer (3 series)."""
    study_uid = generate_uid()
    specs = {
        "soft": SeriesSpec(2, "Head 5mm brain", "H31s", 5.0, slices, size=size),
        "bone": SeriesSpec(3, "Head 5mm bone", "H70h", 5.0, slices, size=size),
        "scout": SeriesSpec(1, "Topogram", "T20s", 1.0, 1, ("ORIGINAL", "PRIMARY", "LOCALIZER"),
                            (0, 1, 0, 0, 0, -1), size=size),
    }
    paths: list[Path] = []
    for spec in specs.values():
        paths += write_series(folder, study_uid, spec)
    return study_uid, specs, paths


def index_files(index: Index, settings: Settings, paths: list[Path], *,
                received_ago_s: float = 0.0) -> None:
    """Store files through the real intake spool (as the SCP does), then age the study."""
    from node.spool import Spool

    spool = Spool(settings, index)
    study_uids = set()
    for path in paths:
        study_uids.add(spool.store(path.read_bytes(), calling_ae="TESTSCU").header.study_uid)
    if received_ago_s:
        age_studies(index, study_uids, received_ago_s)


def age_studies(index: Index, study_uids, seconds: float) -> None:
    """Pretend the last instance of these studies arrived ``seconds`` ago."""
    when = utcnow() - timedelta(seconds=seconds)
    with index.session() as s:
        for study in s.query(Study).filter(Study.study_uid.in_(list(study_uids))):
            study.last_received = when


class WorkerProcess:
    """A real ``celery worker`` for our app, started as a subprocess with the given env."""

    def __init__(self, env: dict[str, str], log: Path, *, queues: str = "", concurrency: int = 1):
        self.env, self.log, self.queues, self.concurrency = env, log, queues, concurrency
        self.proc: subprocess.Popen | None = None

    def start(self) -> "WorkerProcess":
        args = [PYTHON, "-m", "node.cli.main", "worker", "--concurrency", str(self.concurrency)]
        if self.queues:
            args += ["--queues", self.queues]
        self._fh = open(self.log, "ab")
        self.proc = subprocess.Popen(args, cwd=REPO, env=self.env, stdout=self._fh,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited {self.proc.returncode}: "
                                   f"{self.log.read_text()[-3000:]}")
            if b"ready." in self.log.read_bytes():
                return
            time.sleep(0.2)
        raise TimeoutError("worker not ready: " + self.log.read_text()[-3000:])

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # warm shutdown of the main process
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if getattr(self, "_fh", None):
            self._fh.close()


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


def queue_settings(root: Path, **queue) -> tuple[Settings, Path, dict[str, str]]:
    """Settings for a mechanics test (chain = prepare only) written to a config file that a
    worker subprocess reads: returns (settings, config path, environment for the child)."""
    from workers.supervisor import write_settings_file

    queue = {"steps": ["prepare"], "side_steps": [], "retry_backoff_s": 0.5, **queue}
    settings = Settings(storage={"root": root, "min_free_mb": 0}, queue=queue,
                        assembly={"min_slices": 8})
    path = write_settings_file(settings, root / "config.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICHNODE_")}
    env.update({"ICHNODE_CONFIG": str(path), "PYTHONPATH": str(REPO)})
    return settings, path, env


def job_row(index: Index, job_id: int):
    from node.index import Job

    with index.session() as s:
        return s.get(Job, job_id)


def block_one_file(settings, index: Index, job_id: int) -> tuple[Path, Path]:  # noqa: ANN001
    """Swap one spool file of the selected series for a FIFO, so the step blocks opening it
    (a worker held mid-task on demand); returns (path, saved copy)."""
    with index.session() as s:
        study = s.get(Study, job_row(index, job_id).study_id)
        rel = s.execute(select(Instance.path).join(Series).where(
            Series.series_uid == study.selected_series_uid)).scalars().first()
    path = settings.storage.spool_dir / rel
    saved = path.with_suffix(".saved")
    os.replace(path, saved)
    os.mkfifo(path)
    return path, saved


def unblock(path: Path, saved: Path) -> None:
    tmp = path.with_suffix(".new")
    shutil.copyfile(saved, tmp)
    os.replace(tmp, path)  # the blocked open() keeps waiting on the old FIFO inode
