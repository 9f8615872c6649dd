"""Ingest benchmark (not a test): DCMTK storescu -> our node, DCMTK storescp and Orthanc.

Sends the same >= 200 synthetic 512x512 int16 CT slices, uncompressed (Explicit VR LE) and RLE
Lossless, to each receiver on 127.0.0.1 in one association per run and prints images/s, MB/s and
the ratios node/Orthanc and node/storescp. Each receiver runs in its fastest configuration:
``TCP_NODELAY=1`` in the DCMTK/Orthanc environment (both read it), our node with durable
acknowledgement (fsync of file and folder, SQLite synchronous=FULL) and a 128 KiB max PDU.
Two references show where the node's time goes: ``node-nofsync`` (storage.fsync = false) and
``pynetdicom`` (a bare pynetdicom SCP that keeps nothing: the ceiling for a pynetdicom node).
Every run starts a fresh receiver with empty storage (re-sent instances would be no-ops).

    .venv/bin/python benchmarks/ingest.py [--count 240] [--reps 3] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from intake_helpers import (DCMTK_ENV, SeriesSpec, compress_rle, free_port,  # noqa: E402
                            make_head_ct, node_settings, running_node, wait_port)


def storescu_run(port: int, aec: str, files: list[Path], rle: bool) -> float:
    """Seconds storescu needs to send ``files`` on one association."""
    flags = ["-R", "-xr"] if rle else ["-R", "-xe"]
    cmd = ["storescu", "-aet", "BENCH", "-aec", aec, *flags, "127.0.0.1", str(port),
           *map(str, files)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=DCMTK_ENV, timeout=600)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"storescu to {aec} failed: {proc.stderr.strip()[:300]}")
    return elapsed


@contextmanager
def node_receiver(work: Path, profile=None) -> Iterator[tuple[int, str]]:
    settings = node_settings(work, dicom={"max_pdu": 131072},
                             storage={"fsync": True, "min_free_mb": 100})
    with running_node(settings) as node:
        yield node.port, "ICHNODE"


@contextmanager
def node_nofsync_receiver(work: Path, profile=None) -> Iterator[tuple[int, str]]:  # noqa: ANN001
    """Reference only: our node with storage.fsync = false (no durable acknowledgement)."""
    settings = node_settings(work, dicom={"max_pdu": 131072},
                             storage={"fsync": False, "min_free_mb": 100})
    with running_node(settings) as node:
        yield node.port, "ICHNODE"


@contextmanager
def bare_receiver(work: Path, profile=None) -> Iterator[tuple[int, str]]:  # noqa: ANN001
    """Reference only: a bare pynetdicom SCP (128 KiB PDU, TCP_NODELAY) that keeps nothing."""
    import socket

    from pynetdicom import AE, evt
    from pynetdicom.presentation import AllStoragePresentationContexts

    from node.scp import TRANSFER_SYNTAXES

    ae = AE("BARE")
    ae.maximum_pdu_size = 131072
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)

    def nodelay(event) -> None:  # noqa: ANN001
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
        (evt.EVT_CONN_OPEN, nodelay), (evt.EVT_C_STORE, lambda event: 0x0000)])
    try:
        yield server.server_address[1], "BARE"
    finally:
        ae.shutdown()


@contextmanager
def storescp_receiver(work: Path, profile=None) -> Iterator[tuple[int, str]]:  # noqa: ANN001
    port = free_port()
    out = work / "storescp"
    out.mkdir(parents=True)
    proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "+xa", "-od", str(out), str(port)],
                            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield port, "STORESCP"
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def orthanc_receiver(work: Path, profile=None) -> Iterator[tuple[int, str]]:  # noqa: ANN001
    port, http = free_port(), free_port()
    storage = work / "orthanc"
    storage.mkdir(parents=True)
    config = work / "orthanc.json"
    config.write_text(json.dumps({
        "Name": "bench", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
        "DicomAet": "ORTHANC", "DicomPort": port, "HttpPort": http,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False, "StorageCompression": False, "Plugins": [],
        "HttpServerEnabled": True, "DicomServerEnabled": True, "StableAge": 3600,
    }))
    proc = subprocess.Popen(["Orthanc", str(config)], env=DCMTK_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, timeout=60)
        yield port, "ORTHANC"
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


PROFILES: list[cProfile.Profile] = []


def profile_threads() -> None:
    """cProfile follows one thread: wrap the run() of pynetdicom's association and DUL threads."""
    from pynetdicom.association import Association
    from pynetdicom.dul import DULServiceProvider

    for cls in (Association, DULServiceProvider):
        original = cls.run

        def run(self, _original=original):  # noqa: ANN001
            prof = cProfile.Profile()
            PROFILES.append(prof)
            prof.runcall(_original, self)

        cls.run = run


def measure(name: str, factory: Callable, files: list[Path], rle: bool, reps: int,
            warm: list[Path], profile: bool = False) -> float:
    best = float("inf")
    for rep in range(reps):
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
            with factory(Path(tmp), profile) as (port, aec):
                storescu_run(port, aec, warm, rle)  # first association: caches, imports
                PROFILES.clear()
                best = min(best, storescu_run(port, aec, files, rle))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=240, help="CT slices per run (>= 200)")
    ap.add_argument("--reps", type=int, default=3, help="runs per receiver; best is reported")
    ap.add_argument("--profile", action="store_true", help="cProfile our node (slower)")
    ap.add_argument("--only", action="append",
                    choices=("node", "storescp", "orthanc", "node-nofsync", "pynetdicom"),
                    help="receivers to run (default: all; the last two are references)")
    args = ap.parse_args()
    for tool in ("storescu", "storescp", "Orthanc"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found (apt-get install dcmtk orthanc)")
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmp = Path(tmp)
        plain = make_head_ct(tmp / "ct", series=(SeriesSpec("HEAD", args.count, 0.625, "H30s"),))
        rle = compress_rle(plain, tmp / "rle")
        warm_plain = make_head_ct(tmp / "warm", series=(SeriesSpec("W", 2, 5.0, "H30s"),))
        warm_rle = compress_rle(warm_plain, tmp / "warm_rle")
        sizes = {"uncompressed": sum(p.stat().st_size for p in plain),
                 "RLE": sum(p.stat().st_size for p in rle)}
        receivers = {"node": node_receiver, "storescp": storescp_receiver,
                     "orthanc": orthanc_receiver, "node-nofsync": node_nofsync_receiver,
                     "pynetdicom": bare_receiver}
        chosen = args.only or list(receivers)
        if args.profile:
            profile_threads()
        results: dict[tuple[str, str], float] = {}
        for kind, files, warm in (("uncompressed", plain, warm_plain), ("RLE", rle, warm_rle)):
            for name in chosen:
                seconds = measure(name, receivers[name], files, kind == "RLE", args.reps, warm,
                                  args.profile and name == "node")
                results[(name, kind)] = seconds
                mb = sizes[kind] / 1e6
                print(f"{kind:>12} {name:>12}: {len(files) / seconds:7.1f} images/s "
                      f"{mb / seconds:7.1f} MB/s  ({len(files)} images, {mb:.1f} MB, "
                      f"{seconds:.2f} s)", flush=True)
        print()
        for kind in ("uncompressed", "RLE"):
            node = results.get(("node", kind))
            for peer in ("orthanc", "storescp"):
                if node and (peer, kind) in results:
                    print(f"{kind:>12}: node / {peer} = {results[(peer, kind)] / node:.2f}x")
        if args.profile and PROFILES:
            stats = pstats.Stats(*PROFILES).sort_stats("tottime")
            stats.print_stats(30)
    print(f"\n(cpu cores: {os.cpu_count()}; shared machine: figures vary run to run)")


if __name__ == "__main__":
    main()
