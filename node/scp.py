"""The DICOM service: Verification + Storage SCP (pynetdicom) with association control.

``DicomService(settings, index)`` listens on ``settings.dicom.host:port`` and hands every C-STORE
to :class:`node.spool.Spool`, answering Success only once the instance is on disk (fsync) and in
the index. Association policy (all decided before presentation contexts are negotiated, each
rejection with its PS3.8 A-ASSOCIATE-RJ result/source/reason and an audit row):

* peer address not in ``dicom.allowed_addresses`` -> rejected-permanent, service-user,
  no-reason-given (1, 1, 1): PS3.8 has no "address not allowed" reason;
* calling AE not in ``dicom.allowed_calling_aes`` -> (1, 1, 3) calling-AE-title-not-recognized;
* called AE not ours (``dicom.require_called_ae``) -> (1, 1, 7) called-AE-title-not-recognized;
* more than ``dicom.max_associations`` at once -> rejected-transient, service-provider
  (presentation), local-limit-exceeded (2, 3, 2).

Explicit VR Little Endian is first in every context's transfer-syntax list: pynetdicom accepts
the first of its own list that the peer offers, so a sender offering both keeps Explicit VR.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
from typing import Any

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.acse import ACSE
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification

from node.index import Index
from node.logs import uid_ref
from node.spool import Spool, StoreError

log = logging.getLogger("node.scp")

# Order matters: Explicit VR LE first (see module docstring).
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
]

# A-ASSOCIATE-RJ (result, source, reason) per PS3.8 9.3.4.
REJECT_ADDRESS = (0x01, 0x01, 0x01)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_LIMIT = (0x02, 0x03, 0x02)

PROCESSING_FAILURE = 0x0110
WARNING_SOP_CLASS_MISMATCH = 0xB007


def _parse_networks(values: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(v.strip(), strict=False) for v in values]


def _peer(ae_title: str | None, address: Any) -> str:
    host = address[0] if isinstance(address, tuple) else address
    return f"{(ae_title or '?').strip()}@{host}"[:64]


class _PolicyACSE(ACSE):
    """ACSE that applies our association policy before pynetdicom's own negotiation."""

    def __init__(self, assoc, service: "DicomService", address: Any) -> None:  # noqa: ANN001
        super().__init__(assoc)
        self._service = service
        self._address = address

    def _negotiate_as_acceptor(self) -> None:
        rq = self.requestor.primitive
        calling = (rq.calling_ae_title or "").strip()
        called = (rq.called_ae_title or "").strip()
        verdict = self._service._policy(calling, called, self._address, self.assoc.ae)
        if verdict is None:
            super()._negotiate_as_acceptor()
            return
        rsd, reason = verdict
        log.warning("association rejected: %s", reason,
                    extra={"peer": _peer(calling, self._address), "rj": "%d/%d/%d" % rsd})
        self._service._audit("association", "rejected", _peer(calling, self._address),
                             detail=f"{reason} (A-ASSOCIATE-RJ {rsd[0]}/{rsd[1]}/{rsd[2]})")
        self.requestor.ae_title = calling
        self.send_reject(*rsd)
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()


class DicomService:
    """Verification + Storage SCP writing to the spool and index."""

    def __init__(self, settings, index: Index, *, port: int | None = None) -> None:  # noqa: ANN001
        self.settings = settings
        self.cfg = settings.dicom
        self.index = index
        self.spool = Spool(settings, index)
        self._bind_port = self.cfg.port if port is None else port
        self._networks = _parse_networks(self.cfg.allowed_addresses)
        self._allowed_aes = {a.strip() for a in self.cfg.allowed_calling_aes}
        self._server = None
        self._counts: dict[int, list[int]] = {}  # id(assoc) -> [stored, failed]
        self._counts_lock = threading.Lock()
        self.ae = self._build_ae()

    # ------------------------------------------------------------------ set-up
    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.cfg.ae_title)
        ae.maximum_associations = self.cfg.max_associations
        ae.maximum_pdu_size = self.cfg.max_pdu
        ae.acse_timeout = self.cfg.acse_timeout
        ae.dimse_timeout = self.cfg.dimse_timeout
        ae.network_timeout = self.cfg.network_timeout
        # AE-title checks are ours (_policy) so that each rejection is audited with its reason.
        ae.require_called_aet = False
        ae.require_calling_aet = []
        ae.add_supported_context(Verification, TRANSFER_SYNTAXES[:3])
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        # Storage Commitment reports (N-EVENT-REPORT) for what the outbox sent: the peer
        # proposes the SCP role for itself (PS3.4 J.3.3.1), which we accept.
        ae.add_supported_context(StorageCommitmentPushModel, TRANSFER_SYNTAXES[:3],
                                 scu_role=True, scp_role=True)
        return ae

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.cfg.tls_cert:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.cfg.tls_cert), str(self.cfg.tls_key or self.cfg.tls_cert))
        if self.cfg.tls_ca:
            ctx.load_verify_locations(str(self.cfg.tls_ca))
            ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: peers need a certificate we trust
        return ctx

    def start(self) -> "DicomService":
        """Start listening in background threads (non-blocking)."""
        if self._server is not None:
            return self
        self.spool.root.mkdir(parents=True, exist_ok=True)
        try:
            self.spool.repair_recent()
        except Exception as exc:  # noqa: BLE001 - an index outage must not stop the listener
            log.warning("spool check skipped: %s", type(exc).__name__)
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_N_EVENT_REPORT, self._on_report),
        ]
        self._server = self.ae.start_server((self.cfg.host, self._bind_port), block=False,
                                            evt_handlers=handlers,
                                            ssl_context=self._ssl_context())
        log.info("DICOM service listening", extra={"ae_title": self.cfg.ae_title,
                                                   "host": self.cfg.host, "port": self.port})
        return self

    def stop(self) -> None:
        """Stop listening and abort associations still open."""
        if self._server is None:
            return
        self.ae.shutdown()
        self._server = None
        self.spool.close()
        log.info("DICOM service stopped")

    @property
    def port(self) -> int:
        if self._server is not None:
            return int(self._server.server_address[1])
        return self._bind_port

    def __enter__(self) -> "DicomService":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ policy
    def _policy(self, calling: str, called: str, address: Any,
                ae: AE) -> tuple[tuple[int, int, int], str] | None:
        """None to go on negotiating, else (A-ASSOCIATE-RJ result/source/reason, why)."""
        if self._networks:
            host = address[0] if isinstance(address, tuple) else str(address)
            try:
                ip = ipaddress.ip_address(host.split("%", 1)[0])
                allowed = any(ip in net for net in self._networks)
            except ValueError:
                allowed = False
            if not allowed:
                return REJECT_ADDRESS, "peer address not allowed"
        if self._allowed_aes and calling not in self._allowed_aes:
            return REJECT_CALLING_AE, "calling AE title not recognised"
        if self.cfg.require_called_ae and called != self.cfg.ae_title:
            return REJECT_CALLED_AE, "called AE title not recognised"
        acceptors = [a for a in ae.active_associations if a.is_acceptor]
        if len(acceptors) > ae.maximum_associations:
            return REJECT_LIMIT, "local limit exceeded (max_associations)"
        return None

    # ------------------------------------------------------------------ events
    def _on_conn_open(self, event) -> None:  # noqa: ANN001
        assoc = event.assoc
        assoc.acse = _PolicyACSE(assoc, self, event.address)
        try:  # small C-STORE responses must not wait for Nagle/delayed-ACK
            assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass

    def _on_accepted(self, event) -> None:  # noqa: ANN001
        peer = _peer(event.assoc.requestor.ae_title, event.assoc.requestor.address)
        with self._counts_lock:
            self._counts[id(event.assoc)] = [0, 0]
        self._audit("association", "accepted", peer)
        log.info("association accepted", extra={"peer": peer})

    def _finish(self, event, outcome: str) -> None:  # noqa: ANN001
        with self._counts_lock:
            stored, failed = self._counts.pop(id(event.assoc), [0, 0])
        peer = _peer(event.assoc.requestor.ae_title, event.assoc.requestor.address)
        if outcome != "released":
            self._audit("association", outcome, peer, detail=f"stored={stored} failed={failed}")
        log.info("association %s", outcome,
                 extra={"peer": peer, "stored": stored, "failed": failed})

    def _on_released(self, event) -> None:  # noqa: ANN001
        self._finish(event, "released")

    def _on_aborted(self, event) -> None:  # noqa: ANN001
        self._finish(event, "aborted")

    def _on_echo(self, event) -> int:  # noqa: ANN001
        return 0x0000

    def _count(self, event, ok: bool) -> None:  # noqa: ANN001
        with self._counts_lock:
            counts = self._counts.get(id(event.assoc))
            if counts is not None:
                counts[0 if ok else 1] += 1

    def _on_store(self, event) -> int:  # noqa: ANN001
        req = event.request
        calling = (event.assoc.requestor.ae_title or "").strip()
        sop_uid = str(req.AffectedSOPInstanceUID or "")
        try:
            stored = self.spool.store(event.encoded_dataset(), calling_ae=calling,
                                      expected_sop_instance_uid=sop_uid)
        except StoreError as exc:
            self._count(event, False)
            log.warning("instance refused: %s", exc.reason,
                        extra={"sop": uid_ref(sop_uid), "status": f"0x{exc.status:04X}"})
            self._audit("instance", "failed", _peer(calling, event.assoc.requestor.address),
                        ref=uid_ref(sop_uid), detail=f"0x{exc.status:04X} {exc.reason}")
            return exc.status
        except Exception:  # a bug must not take the service down: log it, refuse this one
            self._count(event, False)
            log.exception("instance failed unexpectedly", extra={"sop": uid_ref(sop_uid)})
            return PROCESSING_FAILURE
        self._count(event, True)
        log.debug("instance %s", stored.outcome, extra={"sop": uid_ref(sop_uid)})
        if str(req.AffectedSOPClassUID or "") != stored.header.sop_class_uid:
            # Kept (the dataset's own SOP class is indexed) but the sender should know.
            return WARNING_SOP_CLASS_MISMATCH
        return 0x0000

    def _on_report(self, event):  # noqa: ANN001, ANN202
        from node.scu import _handle_report  # the outbox owns what its reports mean

        return _handle_report(self.settings, self.index, event)

    def _audit(self, kind: str, outcome: str, peer: str | None, *, ref: str | None = None,
               detail: str | None = None) -> None:
        try:
            self.index.audit(kind, outcome, peer=peer, ref=ref, detail=detail)
        except Exception as exc:  # the index may be the thing that is down
            log.warning("audit row not written: %s", type(exc).__name__)


__all__ = ["DicomService", "TRANSFER_SYNTAXES"]
