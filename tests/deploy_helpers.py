"""Shared pieces of the deployment tests: repository paths, the docker/ files parsed, config env
names checked against the Settings model, and real peers (redis-server, Orthanc, DCMTK, celery
workers, `ichnode serve`) started on loopback ports and always stopped.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


# ---- docker/ files ----------------------------------------------------------------------------

_INTERP = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str) -> str:
    """Resolve compose ``${VAR:-default}`` the way compose does with an empty environment."""
    return _INTERP.sub(lambda m: m.group(3) or "" if m.group(2) in (":-", "-") else "",
                       value).replace("$$", "$")


def load_compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text(encoding="utf-8"))


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages of a Dockerfile (continuations joined, comments dropped)."""
    text = path.read_text(encoding="utf-8")
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword == "FROM":
            parts = args.split()
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)),
                           parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(image, name))
        elif not stages:
            if keyword == "ARG" and "=" in args:
                k, v = args.split("=", 1)
                global_args[k.strip()] = v.strip()
        else:
            stages[-1].instructions.append(Instruction(keyword, args))
    return global_args, stages


def copy_sources(args: str) -> list[str] | None:
    """Sources of a COPY instruction from the build context (None for COPY --from=stage)."""
    words = shlex.split(args)
    if any(w.startswith("--from=") for w in words):
        return None
    words = [w for w in words if not w.startswith("--")]
    if words and words[0].startswith("["):
        words = yaml.safe_load(args[args.index("["):])
    return list(words[:-1])


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def ignored_by_dockerignore(rel: str, patterns: list[str]) -> bool:
    """Docker's matching, enough for our patterns: fnmatch per path, ``**`` any depth, a dir
    pattern covers everything below it, ``!`` re-includes."""
    from fnmatch import fnmatch

    def matches(pat: str) -> bool:
        pat = pat.rstrip("/")
        candidates = [rel] + [str(p) for p in Path(rel).parents if str(p) != "."]
        for cand in candidates:
            if fnmatch(cand, pat) or (pat.startswith("**/") and
                                      any(fnmatch(part, pat[3:]) for part in Path(cand).parts)):
                return True
        return False

    ignored = False
    for pat in patterns:
        if pat.startswith("!"):
            if matches(pat[1:]):
                ignored = False
        elif matches(pat):
            ignored = True
    return ignored


def env_name_is_setting(name: str) -> bool:
    """Whether ICHNODE_<SECTION>__<FIELD>[...] names a real field of node.config.Settings."""
    from pydantic import BaseModel

    from node.config import CONFIG_ENV, Settings

    if name == CONFIG_ENV:
        return True
    if not name.startswith("ICHNODE_"):
        return False
    parts = name[len("ICHNODE_"):].lower().split("__")
    model: Any = Settings
    i = 0
    while i < len(parts):
        fields = model.model_fields
        if parts[i] not in fields:
            return False
        annotation = fields[parts[i]].annotation
        i += 1
        if i == len(parts):
            return True
        if get_origin(annotation) is dict:  # e.g. destinations.<name>.<field>
            annotation = get_args(annotation)[1]
            i += 1  # the free-form key
            if i == len(parts):
                return True
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return False
        model = annotation
    return True


# ---- real peers -------------------------------------------------------------------------------

def start_orthanc(config: dict[str, Any], workdir: Path, env: dict[str, str] | None = None
                  ) -> "Proc":
    """Orthanc (Debian package) with ``config`` written to ``workdir``; caller stops it."""
    import json

    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "orthanc.json"
    cfg.write_text(json.dumps(config), encoding="utf-8")
    return Proc("orthanc", ["Orthanc", str(cfg)], workdir, env={**os.environ, **(env or {})},
                cwd=workdir)


def wait_until(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):  # noqa: ANN001
    """Poll ``predicate`` until it returns something truthy; that value is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.0f}s")
        time.sleep(interval)


def ichnode_cmd(config: Path, *args: str) -> list[str]:
    return [str(VENV_BIN / "ichnode"), "--config", str(config), *args]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for child processes: no developer ICHNODE_* overrides leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICHNODE_")}
    env.update(extra)
    return env


def write_config(path: Path, *, root: Path, port: int, broker_url: str, queue_prefix: str = "",
                 steps: list[str] | None = None, side_steps: list[str] | None = None,
                 pacs: tuple[str, int] | None = None, **overrides: dict) -> Path:
    """A node/worker config file (YAML) for one test deployment."""
    cfg: dict[str, Any] = {
        "dicom": {"port": port, "max_associations": 20},
        "storage": {"root": str(root), "min_free_mb": 0},
        "assembly": {"quiet_period_s": 2.0, "poll_interval_s": 0.5},
        "queue": {"broker_url": broker_url, "embedded_worker": False, "queue_prefix": queue_prefix,
                  "dispatch_interval_s": 0.5, "retry_backoff_s": 1.0},
        "send": {"retry_backoff_s": 1.0, "max_backoff_s": 5.0},
        "log_level": "INFO",
    }
    if steps is not None:
        cfg["queue"]["steps"] = steps
    if side_steps is not None:
        cfg["queue"]["side_steps"] = side_steps
    if pacs is not None:
        cfg["destinations"] = {"pacs": {"ae_title": "TESTPACS", "host": "127.0.0.1",
                                        "port": pacs[1]}}
        cfg["routing"] = {"results_to": ["pacs"]}
    for section, values in overrides.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


class Proc:
    """A child process with its own log file; stopped by pid only."""

    def __init__(self, name: str, cmd: list[str], log_dir: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name, self.cmd = name, cmd
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                      env=env or clean_env(), cwd=cwd, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tree_pids(self) -> list[int]:
        """This process and its descendants (prefork children of a celery worker)."""
        pids, frontier = [], [self.pid]
        while frontier:
            pid = frontier.pop()
            pids.append(pid)
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            frontier.extend(int(c) for c in children)
        return pids

    def rss_mb(self) -> float:
        """Resident memory of the whole tree now (MB)."""
        total = 0
        for pid in self.tree_pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total / 1024

    def kill9(self, pid: int | None = None) -> None:
        os.kill(pid or self.pid, 9)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (warm shutdown), then SIGKILL the tree if it does not end."""
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                for pid in reversed(self.tree_pids()):
                    try:
                        os.kill(pid, 9)
                    except OSError:
                        pass
                self.popen.wait(timeout=5)
        # Orphaned prefork children (parent killed with -9) belong to our session: end them.
        self._kill_session_leftovers()
        self._log.close()
        return self.popen.returncode

    def _kill_session_leftovers(self) -> None:
        sid = self.pid  # start_new_session: the child is its session leader
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and int(entry.name) != os.getpid():  # field 6: session id
                try:
                    os.kill(int(entry.name), 9)
                except OSError:
                    pass

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class RedisServer:
    """Our own redis-server on a free loopback port (restartable, data in ``workdir``)."""

    def __init__(self, workdir: Path, *, appendonly: bool = True) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.appendonly = appendonly
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
               str(self.workdir), "--save", "", "--appendonly", "yes" if self.appendonly else "no",
               "--appendfsync", "always", "--protected-mode", "yes"]
        self.proc = Proc(f"redis-{self.port}", cmd, self.workdir)
        wait_for_port(self.port, 10)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


def storescu(paths: list[Path], port: int, *, called: str = "ICHNODE", calling: str = "STORESCU",
             timeout: float = 120) -> subprocess.CompletedProcess:
    """Send files with DCMTK storescu (one association), as a scanner would."""
    cmd = ["storescu", "-v", "-aet", calling, "-aec", called, "-nh", "127.0.0.1", str(port),
           *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def store_responses(output: str) -> list[str]:
    """The status text of each C-STORE response storescu -v printed, e.g. 'Success'.
    (storescu exits 0 even when the peer refuses instances: the responses tell.)"""
    return re.findall(r"Received Store Response \(([^)]*)\)", output)


def storescu_async(paths: list[Path], port: int, *, called: str = "ICHNODE",
                   calling: str = "STORESCU") -> subprocess.Popen:
    cmd = ["storescu", "-v", "-aet", calling, "-aec", called, "-nh", "127.0.0.1", str(port),
           *map(str, paths)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


class StoreSCP:
    """DCMTK storescp as the results PACS: every C-STORE lands in its own file (+uf), so a
    delivery made twice shows up twice."""

    def __init__(self, workdir: Path, ae_title: str = "TESTPACS") -> None:
        self.port = free_port()
        self.workdir, self.ae_title = workdir, ae_title
        self.folder = workdir / "pacs"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc: Proc | None = None
        self.start()

    def start(self) -> None:
        """Listen (again) on the same port."""
        cmd = ["storescp", "-aet", self.ae_title, "+uf", "-od", str(self.folder), "+xa",
               str(self.port)]
        self.proc = Proc(f"storescp-{self.port}", cmd, self.workdir)
        wait_for_port(self.port, 10)

    def received(self) -> list[dict[str, Any]]:
        """One row per delivery: SOP class/instance, study UID, file mtime."""
        from pydicom import dcmread

        rows = []
        for path in sorted(self.folder.iterdir()):
            try:
                ds = dcmread(path, stop_before_pixels=True, specific_tags=[
                    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "Modality"])
            except Exception:  # noqa: BLE001 - a file still being written
                continue
            rows.append({"sop_class": str(ds.SOPClassUID), "sop": str(ds.SOPInstanceUID),
                         "study": str(ds.StudyInstanceUID), "modality": str(ds.get("Modality", "")),
                         "mtime": path.stat().st_mtime})
        return rows

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


def write_tiny_study(folder: Path, *, slices: int = 20, size: int = 32, study_uid: str | None = None,
                     patient_id: str = "DEPLOY1") -> tuple[str, list[Path]]:
    """A small axial CT series (int16, real geometry) for intake-only tests: fast to write and
    to send; not meant for the analysis models."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    yy, xx = np.mgrid[:size, :size]
    head = np.hypot(xx - size / 2, yy - size / 2) < size * 0.4
    paths = []
    for k in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.Modality, ds.PatientID, ds.PatientName = "CT", patient_id, "Deploy^Test"
        ds.AccessionNumber, ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "DEP1", "1", 2, k + 1
        ds.BodyPartExamined, ds.SeriesDescription = "HEAD", "Head 5mm"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SliceThickness, ds.PixelSpacing = 5.0, [7.0, 7.0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-112.0, -112.0, 5.0 * k]
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.where(head, 40, -1000).astype(np.int16).tobytes()
        path = folder / f"{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study_uid, paths


def index_counts(config: Path) -> dict[str, Any]:
    """What the node's index holds: instances per study, jobs per study by state."""
    from sqlalchemy import func, select

    from node.config import load_settings
    from node.index import Index, Instance, Job, Series, Study

    settings = load_settings(config)
    index = Index(settings.storage.resolved_index_url)
    try:
        with index.session() as s:
            per_study = dict(s.execute(
                select(Study.study_uid, func.count(Instance.id)).join(Series, Series.study_id == Study.id)
                .join(Instance, Instance.series_id == Series.id).group_by(Study.study_uid)).all())
            jobs: dict[str, list[str]] = {}
            for uid, state in s.execute(select(Study.study_uid, Job.state).join(Job)).all():
                jobs.setdefault(uid, []).append(state.value)
            files = [(p, size, sha) for p, size, sha in
                     s.execute(select(Instance.path, Instance.size, Instance.sha256)).all()]
    finally:
        index.dispose()
    return {"instances": per_study, "jobs": jobs, "files": files,
            "spool": settings.storage.spool_dir}


class Deployment:
    """A node + workers + results PACS on loopback, all real processes, all stopped by stop()."""

    def __init__(self, workdir: Path, *, broker_url: str, queue_prefix: str = "",
                 steps: list[str] | None = None, side_steps: list[str] | None = None,
                 pacs: bool = False, **overrides: dict) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.pacs = StoreSCP(workdir) if pacs else None
        self.config = write_config(workdir / "ichnode.yaml", root=workdir / "var", port=self.port,
                                   broker_url=broker_url, queue_prefix=queue_prefix, steps=steps,
                                   side_steps=side_steps,
                                   pacs=("TESTPACS", self.pacs.port) if self.pacs else None,
                                   **overrides)
        self.node: Proc | None = None
        self.workers: list[Proc] = []
        self._n = 0

    def start_node(self, timeout: float = 60) -> Proc:
        self._n += 1
        self.node = Proc(f"node-{self._n}", ichnode_cmd(self.config, "serve"), self.workdir / "logs")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.node.alive():
                raise RuntimeError(f"node exited: {self.node.log_text()[-2000:]}")
            if "ichnode listening" in self.node.log_text():
                return self.node
            time.sleep(0.2)
        raise TimeoutError("node did not start")

    def stop_node(self) -> None:
        if self.node is not None:
            self.node.stop()

    def add_worker(self, queues: str, concurrency: int = 1) -> Proc:
        self._n += 1
        proc = Proc(f"worker-{queues.replace(',', '_')}-{self._n}",
                    ichnode_cmd(self.config, "worker", "--queues", queues,
                                "--concurrency", str(concurrency)), self.workdir / "logs")
        self.workers.append(proc)
        wait_until(lambda: "ready" in proc.log_text() or not proc.alive(), 90,
                   what=f"worker {queues} ready")
        if not proc.alive():
            raise RuntimeError(f"worker exited: {proc.log_text()[-2000:]}")
        return proc

    def counts(self) -> dict[str, Any]:
        return index_counts(self.config)

    def stop(self) -> None:
        for proc in self.workers:
            proc.stop()
        self.stop_node()
        if self.pacs is not None:
            self.pacs.stop()

    def logs(self, tail: int = 3000) -> str:
        procs = [p for p in [self.node, *self.workers] if p is not None]
        return "\n".join(f"--- {p.name}\n{p.log_text()[-tail:]}" for p in procs)


def check_spool_integrity(counts: dict[str, Any]) -> list[str]:
    """Every indexed instance has its file, with the indexed size and hash; no temp files
    remain. Returns the problems (empty = nothing half-indexed)."""
    import hashlib

    problems = []
    spool: Path = counts["spool"]
    indexed = set()
    for rel, size, sha in counts["files"]:
        path = spool / rel
        indexed.add(path.resolve())
        if not path.is_file():
            problems.append(f"missing file {rel}")
            continue
        data = path.read_bytes()
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
            problems.append(f"file differs from index {rel}")
    if spool.is_dir():
        for path in spool.rglob("*"):
            if path.is_file() and path.resolve() not in indexed:
                problems.append(f"file not in index {path.relative_to(spool)}")
    return problems


# ---- fuzzed DICOM ---------------------------------------------------------------------------

FUZZ_SEEDS = ("CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
              "rtplan.dcm", "rtstruct.dcm", "test-SR.dcm", "image_dfl.dcm", "SC_rgb_rle.dcm",
              "JPEG2000.dcm", "UN_sequence.dcm", "badVR.dcm", "nested_priv_SQ.dcm",
              "waveform_ecg.dcm", "rtdose_1frame.dcm", "emri_small.dcm")


@dataclass
class FuzzCase:
    path: Path
    sop_class: str
    sop_uid: str
    transfer_syntax: str
    mutation: str


@dataclass
class FuzzResult:
    case: FuzzCase
    status: int | None  # None: no response (association aborted, connection lost)

    @property
    def sop_uid(self) -> str:
        return self.case.sop_uid

    @property
    def stored(self) -> bool:
        return self.status is not None and (self.status == 0 or self.status >> 12 == 0xB)


def _seed_files() -> list[Path]:
    """pydicom's bundled test files only (get_testdata_file would try to download others)."""
    import pydicom.data

    folder = Path(pydicom.data.__file__).parent / "test_files"
    return [folder / name for name in FUZZ_SEEDS if (folder / name).is_file()]


def _mutate(body: bytearray, rng, kind: str) -> bytearray:  # noqa: ANN001 - numpy Generator
    n = len(body)
    if kind == "flip":
        for pos in rng.integers(0, n, size=int(rng.integers(1, 24))):
            body[pos] ^= int(rng.integers(1, 256))
    elif kind == "truncate":
        del body[int(rng.integers(0, max(1, n - 1))):]
    elif kind == "insert":
        pos = int(rng.integers(0, n))
        body[pos:pos] = bytes(rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype="uint8"))
    elif kind == "length":  # an element length made huge or odd
        pos = int(rng.integers(0, max(1, n - 8)))
        body[pos + 4:pos + 8] = rng.choice([b"\xf0\xff\xff\xff", b"\xff\xff\xff\x7f",
                                            b"\x03\x00\x00\x00"])
    elif kind == "zero":
        start = int(rng.integers(0, n))
        stop = start + int(rng.integers(1, 512))
        body[start:stop] = bytes(len(body[start:stop]))
    return body


def build_corpus(folder: Path, *, count: int, seed: int) -> list[FuzzCase]:
    """``count`` mutated files from the seeds, deterministic for a seed. Each mutant has its
    own SOP Instance UID (in the file meta, which the C-STORE request carries) so that what
    the node acknowledged can be compared one by one with what it indexed."""
    import io

    import numpy as np
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    seeds = []
    for path in _seed_files():
        ds = dcmread(path, force=True)
        if "SOPClassUID" not in ds or "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
            continue
        seeds.append(ds)
    kinds = ("flip", "truncate", "insert", "length", "zero", "uid-mismatch", "drop-uid", "clean")
    cases = []
    for i in range(count):
        ds = seeds[i % len(seeds)].copy()
        ds.file_meta = ds.file_meta.copy()
        kind = kinds[int(rng.integers(0, len(kinds)))]
        sop = generate_uid(prefix=None, entropy_srcs=[str(seed), str(i)])
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        if kind == "uid-mismatch":  # request says one UID, dataset another
            ds.SOPInstanceUID = generate_uid(prefix=None, entropy_srcs=[str(seed), str(i), "x"])
        elif kind == "drop-uid":
            name = str(rng.choice(["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]))
            if name in ds:
                delattr(ds, name)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=False)
        raw = bytearray(buf.getvalue())
        # Keep the preamble + file meta intact (it picks the presentation context); mutate
        # only the data set that reaches the node.
        meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
        head, body = raw[:meta_end], raw[meta_end:]
        if kind in ("flip", "truncate", "insert", "length", "zero") and body:
            body = _mutate(body, rng, kind)
        out = folder / f"fuzz{i:04d}.dcm"
        out.write_bytes(bytes(head + body))
        cases.append(FuzzCase(out, str(ds.file_meta.MediaStorageSOPClassUID), sop,
                              str(ds.file_meta.TransferSyntaxUID), kind))
    return cases


def send_corpus(cases: list[FuzzCase], port: int, called: str = "ICHNODE") -> list[FuzzResult]:
    """Send each file's bytes as they are (no decoding) over as few associations as possible."""
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes, do not re-encode them
    try:
        ae = AE(ae_title="FUZZER")
        contexts = sorted({(c.sop_class, c.transfer_syntax) for c in cases})
        results: list[FuzzResult] = []
        pending = list(cases)
        while pending:
            # Up to 128 presentation contexts per association (PS3.8 limit).
            ae.requested_contexts = []
            batch_contexts = contexts[:128]
            for sop_class, ts in batch_contexts:
                ae.add_requested_context(sop_class, ts)
            assoc = ae.associate("127.0.0.1", port, ae_title=called)
            if not assoc.is_established:
                raise RuntimeError("the node refused the fuzzing association")
            while pending:
                case = pending[0]
                try:
                    rsp = assoc.send_c_store(case.path)
                    status = int(rsp.Status) if "Status" in rsp else None
                except (ValueError, RuntimeError):  # no accepted context for this one
                    status = None
                if not assoc.is_established and status is None:
                    break  # aborted: record and continue on a fresh association
                results.append(FuzzResult(pending.pop(0), status))
            else:
                assoc.release()
                continue
            results.append(FuzzResult(pending.pop(0), None))
        return results
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False


# ---- pipeline studies and measurements ---------------------------------------------------------

def usable_steps() -> list[str]:
    """The default pipeline chain, less ``analyze`` while the demo model bundles are absent
    (the report step then delivers a "not analysed" SR + overlay: still a full round trip)."""
    from node.config import QueueSection

    steps = list(QueueSection().steps)
    try:
        from models.ich.bundle import load_bundle

        for kind in ("triage", "segment"):
            load_bundle(None, kind)
    except Exception:  # noqa: BLE001 - BundleError, or the models area not importable yet
        steps = [s for s in steps if s != "analyze"]
    return steps


def phantom_studies(folder: Path, count: int, *, matrix: int = 128, first_seed: int = 5000,
                    ) -> list[tuple[str, list[Path]]]:
    """``count`` phantom head CT studies (different patients, some with hemorrhage) written
    as DICOM files; (StudyInstanceUID, files) each. Reused when already written."""
    import json

    from pydicom import dcmread

    from models.phantom import SUBTYPES, PhantomSpec, generate_study, write_dicom_series

    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / f"manifest-{matrix}-{first_seed}.json"
    known = json.loads(manifest.read_text()) if manifest.is_file() else {}
    out = []
    for n in range(count):
        key = str(n)
        if key in known and all(Path(p).is_file() for p in known[key]["files"]):
            out.append((known[key]["uid"], [Path(p) for p in known[key]["files"]]))
            continue
        subtypes = () if n % 3 == 0 else (SUBTYPES[n % len(SUBTYPES)],)
        study = generate_study(PhantomSpec(seed=first_seed + n, subtypes=subtypes, matrix=matrix,
                                           slice_thickness_mm=5.0))
        files = write_dicom_series(study, folder / f"m{matrix}-s{first_seed + n}",
                                   patient_id=f"DEP{first_seed + n}",
                                   accession=f"DA{first_seed + n}")
        uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        known[key] = {"uid": uid, "files": [str(p) for p in files]}
        out.append((uid, files))
    manifest.write_text(json.dumps(known))
    return out


def job_rows(config: Path) -> list[dict[str, Any]]:
    """Every job with its study UID, state, timings, and the study's last received instance."""
    from sqlalchemy import func, select

    from node.config import load_settings
    from node.index import Index, Instance, Job, Series, Study

    index = Index(load_settings(config).storage.resolved_index_url)
    try:
        with index.session() as s:
            last = dict(s.execute(
                select(Study.id, func.max(Instance.received_at)).join(Series, Series.study_id == Study.id)
                .join(Instance, Instance.series_id == Series.id).group_by(Study.id)).all())
            rows = []
            for job, uid in s.execute(select(Job, Study.study_uid).join(Study)).all():
                rows.append({"job": job.id, "study": uid, "state": job.state.value,
                             "finished": job.finished_at, "timings": job.timings or {},
                             "last_received": last.get(job.study_id), "reason": job.reason})
    finally:
        index.dispose()
    return rows


def as_epoch(value) -> float:  # noqa: ANN001 - datetime, naive UTC from SQLite
    from datetime import UTC

    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


class RedisDb:
    """A database number on the shared Redis (127.0.0.1:6379) used under a key prefix of our
    own; clean() deletes only our keys, never the whole database others may use."""

    def __init__(self, db: int, prefix: str, host: str = "127.0.0.1", port: int = 6379) -> None:
        import redis

        self.db, self.prefix = db, prefix
        self.url = f"redis://{host}:{port}/{db}"
        self.client = redis.Redis(host=host, port=port, db=db, socket_connect_timeout=2)

    def available(self) -> bool:
        try:
            return bool(self.client.ping())
        except Exception:  # noqa: BLE001 - redis.ConnectionError and friends
            return False

    def keys(self) -> list[bytes]:
        return list(self.client.scan_iter(match=f"{self.prefix}*", count=500))

    def clean(self) -> None:
        keys = self.keys()
        for i in range(0, len(keys), 500):
            self.client.delete(*keys[i:i + 500])
