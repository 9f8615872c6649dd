"""``ichnode serve``: the node's one long-running process.

Runs, each in its own thread: the DICOM service (intake), the assembler loop (quiet studies ->
selection -> jobs), the dispatcher loop (jobs -> Celery), the outbox delivery loop (sends to
PACS), the HL7 MLLP listener when ``hl7_in.enabled``, and in embedded mode a supervised
``celery worker`` subprocess for all queues.
On start it re-dispatches jobs that were queued or running when the node last stopped.
SIGINT/SIGTERM stop everything in order: intake first, then the loops, then the worker
(warm shutdown: a running task finishes; an unfinished one is re-dispatched next start).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Callable

from node.assembly import Assembler
from node.dispatcher import Dispatcher
from node.index import Index, open_index

log = logging.getLogger("node.server")

OUTBOX_INTERVAL_S = 1.0


class NodeServer:
    def __init__(self, settings) -> None:  # noqa: ANN001 - Settings
        self.settings = settings
        self.index: Index | None = None
        self.dicom = None
        self.assembler: Assembler | None = None
        self.dispatcher: Dispatcher | None = None
        self.supervisor = None
        self.hl7 = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "NodeServer":
        from node.scp import DicomService
        from node.scu import Outbox

        s = self.settings
        self.index = open_index(s)
        self.assembler = Assembler(s, self.index)
        self.dispatcher = Dispatcher(s, self.index)
        self.outbox = Outbox(s, self.index)
        self.dispatcher.redispatch_unfinished()  # node restart: nothing queued is forgotten
        if s.queue.embedded_worker:
            from workers.supervisor import WorkerSupervisor

            self.supervisor = WorkerSupervisor(s, on_restart=self._after_worker_restart).start()
        self._loop("assembler", s.assembly.poll_interval_s, self.assembler.complete_due)
        self._loop("dispatcher", s.queue.dispatch_interval_s, self.dispatcher.tick)
        self._loop("outbox", OUTBOX_INTERVAL_S, self.outbox.deliver_due)
        hl7_in = getattr(s, "hl7_in", None)
        if hl7_in is not None and hl7_in.enabled:
            from node.hl7_listener import Hl7Listener

            self.hl7 = Hl7Listener(s, self.index).start()
        self.dicom = DicomService(s, self.index).start()
        log.info("node started", extra={"ae_title": s.dicom.ae_title, "port": self.dicom.port,
                                        "embedded_worker": bool(self.supervisor)})
        return self

    def _after_worker_restart(self) -> None:
        # A killed embedded worker loses the messages it had taken (filesystem transport):
        # dispatch every unfinished job again; stale copies are dropped by the workers.
        self.dispatcher.redispatch_unfinished()

    def _loop(self, name: str, interval: float, fn: Callable[[], object]) -> None:
        def run() -> None:
            while not self._stop.is_set():
                try:
                    fn()
                except Exception:  # noqa: BLE001 - a loop must survive one bad round
                    log.exception("loop round failed", extra={"loop": name})
                self._stop.wait(interval)

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        if self.dicom is not None:
            self.dicom.stop()
        if self.hl7 is not None:
            self.hl7.stop()
        for thread in self._threads:
            thread.join(30)
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.index is not None:
            self.index.dispose()
        log.info("node stopped")

    def serve_forever(self, on_started: Callable[["NodeServer"], None] | None = None) -> None:
        """Start, then block until SIGINT/SIGTERM; always stops cleanly."""
        stop = threading.Event()

        def handler(signum, _frame) -> None:  # noqa: ANN001
            log.info("signal received, stopping", extra={"signal": signal.Signals(signum).name})
            stop.set()

        old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            if on_started:
                on_started(self)
            while not stop.wait(1.0):
                pass
        finally:
            self.stop()
            for sig, previous in old.items():
                signal.signal(sig, previous)
