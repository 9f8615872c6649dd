"""``ichnode demo``: the whole product on one machine, no servers needed.

1. generate phantom head CT studies (several hemorrhage subtypes and a normal one),
2. start a local receiving "PACS" (a pynetdicom Storage SCP in this process),
3. start ``ichnode serve`` (embedded broker and worker) as a subprocess with a demo config,
4. send the studies by C-STORE, as a scanner would,
5. wait until SEG/SR/overlay of every study arrived at the PACS, then print a table per study
   and write overlay previews. Exit status 0 only if every study's results arrived.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydicom import dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # SC and its multi-frame variants
DEMO_CASES = (
    ("normal", ()),
    ("subdural", ("subdural",)),
    ("intraparenchymal+IVH", ("intraparenchymal", "intraventricular")),
    ("epidural", ("epidural",)),
)


@dataclass
class Arrival:
    """What the demo PACS received for one study."""

    modalities: dict[str, int] = field(default_factory=dict)
    first_result_at: float | None = None
    last_result_at: float | None = None
    files: list[Path] = field(default_factory=list)


class DemoPacs:
    """A minimal Storage SCP that keeps what it receives, by study."""

    def __init__(self, folder: Path, port: int, ae_title: str = "DEMOPACS") -> None:
        self.folder = folder
        self.port = port
        self.ae_title = ae_title
        self.arrivals: dict[str, Arrival] = {}
        self._lock = threading.Lock()
        self._server = None

    def _on_store(self, event) -> int:  # noqa: ANN001 - pynetdicom event
        ds = event.dataset
        ds.file_meta = event.file_meta
        path = self.folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        now = time.monotonic()
        with self._lock:
            arrival = self.arrivals.setdefault(str(ds.StudyInstanceUID), Arrival())
            arrival.modalities[ds.Modality] = arrival.modalities.get(ds.Modality, 0) + 1
            arrival.first_result_at = arrival.first_result_at or now
            arrival.last_result_at = now
            arrival.files.append(path)
        return 0x0000

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()

    def has_results(self, study_uid: str) -> bool:
        arrival = self.arrivals.get(study_uid)
        return bool(arrival and arrival.modalities.get("SR"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_demo_config(out: Path, node_port: int, pacs_port: int) -> Path:
    config = {
        "dicom": {"ae_title": "ICHNODE", "port": node_port, "host": "127.0.0.1"},
        "storage": {"root": str((out / "var").resolve()), "min_free_mb": 50},
        "assembly": {"quiet_period_s": 3.0, "poll_interval_s": 0.5},
        "queue": {"retry_backoff_s": 1.0},
        "send": {"retry_backoff_s": 1.0, "max_backoff_s": 5.0},
        "destinations": {"demo-pacs": {"ae_title": "DEMOPACS", "host": "127.0.0.1",
                                       "port": pacs_port}},
        "routing": {"results_to": ["demo-pacs"]},
    }
    path = out / "ichnode-demo.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def generate_studies(out: Path, thickness_mm: float) -> dict[str, tuple[str, list[Path]]]:
    """Phantom studies for the demo: name -> (StudyInstanceUID, files)."""
    from models.phantom import PhantomSpec, generate_study, write_dicom_series

    studies = {}
    for n, (name, subtypes) in enumerate(DEMO_CASES):
        spec = PhantomSpec(seed=1000 + n, subtypes=subtypes, slice_thickness_mm=thickness_mm)
        study = generate_study(spec)
        files = write_dicom_series(study, out / "scanner" / name,
                                   patient_name=f"DEMO^{name.upper()}", patient_id=f"DEMO{n:03d}",
                                   accession=f"ACC{n:05d}")
        studies[name] = (str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID), files)
    return studies


def send_study(files: list[Path], port: int) -> float:
    """C-STORE the files like a scanner would; returns the time the last slice was acknowledged."""
    ae = AE(ae_title="DEMOCT")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")  # CT Image Storage
    assoc = ae.associate("127.0.0.1", port, ae_title="ICHNODE")
    if not assoc.is_established:
        raise RuntimeError("the node refused the association")
    try:
        for path in files:
            status = assoc.send_c_store(dcmread(path))
            if getattr(status, "Status", None) != 0x0000:
                raise RuntimeError(f"C-STORE failed with status {status}")
    finally:
        assoc.release()
    return time.monotonic()


def _wait_for_echo(port: int, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    ae = AE(ae_title="DEMOCT")
    ae.add_requested_context(Verification)
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"ichnode serve exited with status {server.returncode}")
        assoc = ae.associate("127.0.0.1", port, ae_title="ICHNODE")
        if assoc.is_established:
            status = assoc.send_c_echo()
            assoc.release()
            if getattr(status, "Status", None) == 0x0000:
                return
        time.sleep(0.5)
    raise RuntimeError("the node did not answer C-ECHO in time")


def _results_delivered(index, study_uid: str) -> bool:  # noqa: ANN001 - node.index.Index
    """Every result object queued for the study reached the PACS (or one failed for good)."""
    from sqlalchemy import select

    from node.index import Send, SendState

    with index.session() as s:
        states = s.scalars(select(Send.state).where(Send.study_uid == study_uid,
                                                    Send.purpose == "results")).all()
    return bool(states) and all(st != SendState.PENDING for st in states)


def _finding_text(results: dict | None) -> tuple[str, str, str, str]:
    if not results:
        return "no result", "", "", ""
    if results.get("status") == "not_analysed":
        return "NOT ANALYSED (reason below)", "", "", ""
    findings = results.get("findings") or {}
    present = [f"{k} {v['probability']:.2f}" for k, v in findings.items()
               if k != "any" and v.get("present")]
    anyp = findings.get("any", {}).get("probability")
    threshold = findings.get("any", {}).get("threshold")
    label = ", ".join(present) or "no hemorrhage"
    vol = results.get("hematoma_volume_ml")
    shift = results.get("midline_shift_mm")
    # The threshold beside the probability: 0.78 reads as "no hemorrhage" only next to 0.95.
    anytext = "" if anyp is None else f"{anyp:.2f}" + ("" if threshold is None else f" / {threshold:.2f}")
    return (label, anytext,
            "" if vol is None else f"{vol:.1f}", "" if shift is None else f"{shift:.1f}")


def _write_previews(arrival: Arrival, out: Path) -> list[Path]:
    """PNG copies of the overlay (Secondary Capture) images a viewer would show."""
    from PIL import Image

    written = []
    for path in arrival.files:
        ds = dcmread(path)
        if not str(ds.SOPClassUID).startswith(SECONDARY_CAPTURE_PREFIX) or "PixelData" not in ds:
            continue
        pixels = ds.pixel_array
        frames = pixels if pixels.ndim == 4 else pixels[None]
        for n, frame in enumerate(frames):
            # Named like a viewer orders them: series, instance (the summary image is first).
            target = out / f"{int(ds.SeriesNumber)}_{int(ds.InstanceNumber):03d}_{n}.png"
            Image.fromarray(frame).save(target)
            written.append(target)
    return written


def run_demo(out: Path, *, thickness_mm: float = 5.0, timeout_s: float = 900.0) -> int:
    from rich.console import Console
    from rich.table import Table

    from node.config import load_settings
    from node.index import Study, open_index

    console = Console(width=max(Console().width, 150))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    node_port, pacs_port = _free_port(), _free_port()
    pacs = DemoPacs(out / "pacs", pacs_port)
    pacs.start()
    config = write_demo_config(out, node_port, pacs_port)
    console.print(f"[bold]ichnode demo[/] — work folder {out}")
    t0 = time.monotonic()
    studies = generate_studies(out, thickness_mm)
    console.print(f"generated {len(studies)} phantom studies in {time.monotonic() - t0:.1f} s")

    log = open(out / "node.log", "wb")
    env = dict(os.environ, ICHNODE_CONFIG=str(config))
    server = subprocess.Popen([sys.executable, "-m", "node.cli.main", "serve"], stdout=log,
                              stderr=subprocess.STDOUT, env=env)
    last_slice: dict[str, float] = {}
    try:
        _wait_for_echo(node_port, server, 120)
        console.print(f"node listening on 127.0.0.1:{node_port}; sending studies by C-STORE")
        for name, (_uid, files) in studies.items():
            last_slice[name] = send_study(files, node_port)
            console.print(f"  sent {name}: {len(files)} slices")
        settings = load_settings(config)
        index = open_index(settings)
        deadline = time.monotonic() + timeout_s
        pending = set(studies)
        with console.status("waiting for results at the PACS...") as status:
            while pending and time.monotonic() < deadline and server.poll() is None:
                for name in list(pending):
                    uid = studies[name][0]
                    if pacs.has_results(uid) and _results_delivered(index, uid):
                        pending.discard(name)
                status.update(f"waiting for results at the PACS... {len(pending)} to go")
                time.sleep(1.0)
        table = Table(title="ichnode demo — results at the PACS")
        for col in ("study", "findings", "P(any) / threshold", "volume mL", "shift mm", "priority",
                    "objects at PACS", "last slice → results (s)"):
            table.add_column(col)
        previews = out / "previews"
        previews.mkdir(exist_ok=True)
        with index.session() as s:
            rows = {st.study_uid: st for st in s.query(Study).all()}
        for name, (uid, _files) in studies.items():
            study = rows.get(uid)
            arrival = pacs.arrivals.get(uid, Arrival())
            label, anyp, vol, shift = _finding_text(study.results if study else None)
            elapsed = ("" if arrival.last_result_at is None
                       else f"{arrival.last_result_at - last_slice[name]:.1f}")
            objects = ", ".join(f"{m}×{c}" for m, c in sorted(arrival.modalities.items()))
            table.add_row(name, label, anyp, vol, shift, (study.priority or "") if study else "",
                          objects or "none", elapsed)
            if arrival.files:
                (previews / name).mkdir(exist_ok=True)
                _write_previews(arrival, previews / name)
        console.print(table)
        not_analysed = {name: (rows[uid].results or {}).get("reason")
                        for name, (uid, _f) in studies.items()
                        if rows.get(uid) and (rows[uid].results or {}).get("status") != "ok"}
        for name, reason in not_analysed.items():
            console.print(f"[yellow]{name}: not analysed — {reason}[/]", highlight=False)
        console.print(f"overlay previews: {previews}; node log: {out / 'node.log'}")
        if pending:
            console.print(f"[red]results missing for: {', '.join(sorted(pending))}[/]")
        # Every demo phantom is analysable: a "not analysed" answer means the pipeline is broken.
        return 1 if pending or not_analysed else 0
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        pacs.stop()
