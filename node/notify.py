"""Pushing a study's priority out: HL7 v2 ORU^R01 over MLLP to the RIS, and a signed JSON webhook.

HL7 (PHI zone -> RIS, which owns the order): MSH, PID (patient ID only, to match the order),
OBR (accession number as filler order number, OBR-5 priority S/A/R), OBX rows: priority,
reasons, subtypes present, hematoma volume (mL), midline shift (mm), Study Instance UID.
Messages are built and the ACK parsed with the ``hl7`` package; MLLP framing over a plain
socket with timeouts (``hl7.client.MLLPClient`` has none).

Webhook: POST JSON with ``X-Ichnode-Timestamp`` and ``X-Ichnode-Signature: sha256=<hex>``
= HMAC-SHA256(routing.webhook_secret, timestamp + "." + body). The body holds only what a RIS
or on-call system needs to find the order: accession number and Study Instance UID, the
priority with its reasons and the measurements; never patient name, patient ID or birth date.

Each channel is tried ``routing.notify_attempts`` times with doubling backoff; the outcome of
every channel is kept on the study (``priority_flags.notify``) and in the audit table.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime

import hl7

from node.logs import uid_ref

log = logging.getLogger("node.notify")

SB, EB, CR = b"\x0b", b"\x1c", b"\x0d"
OBR_PRIORITY = {"STAT": "S", "URGENT": "A", "ROUTINE": "R"}


def _esc(value) -> str:  # noqa: ANN001
    """HL7 v2 escaping of the separators inside a field value."""
    text = "" if value is None else str(value)
    text = text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\")
    return text.replace("&", "\\T\\").replace("~", "\\R\\").replace("\r", " ").replace("\n", " ")


def _ts(dt: datetime | None = None) -> str:
    return (dt or datetime.now(UTC)).strftime("%Y%m%d%H%M%S")


def build_oru(payload: dict, *, patient_id: str | None, routing, control_id: str | None = None) -> hl7.Message:  # noqa: ANN001
    """An ORU^R01 (v2.5.1) carrying the priority and findings of one study."""
    control_id = control_id or hl7.generate_message_control_id()
    acc = _esc(payload.get("accession_number"))
    level = payload["priority"]
    status = "F" if payload.get("analysed") else "X"  # X: no result can be obtained
    segs = [
        f"MSH|^~\\&|ICHNODE|{_esc(routing.hl7_sending_facility)}|{_esc(routing.hl7_receiving_application)}|"
        f"|{_ts()}||ORU^R01^ORU_R01|{_esc(control_id)}|P|2.5.1",
        f"PID|1||{_esc(patient_id)}^^^^MR",
        f"OBR|1||{acc}|ICHAI^ICH AI triage^L|{OBR_PRIORITY[level]}|||||||||||||||||{_ts()}||CT|{status}",
    ]
    obx = [("ST", "PRIORITY^Worklist priority^L", level, ""),
           ("TX", "REASONS^Priority reasons^L", "; ".join(payload.get("reasons", [])), ""),
           ("ST", "SUBTYPES^Hemorrhage subtypes present^L", ", ".join(payload.get("subtypes_present", [])) or "none", "")]
    if payload.get("hematoma_volume_ml") is not None:
        obx.append(("NM", "VOLUME^Hematoma volume^L", payload["hematoma_volume_ml"], "mL^milliliter^UCUM"))
    if payload.get("midline_shift_mm") is not None:
        obx.append(("NM", "MLS^Midline shift^L", payload["midline_shift_mm"], "mm^millimeter^UCUM"))
    if not payload.get("analysed"):
        obx.append(("TX", "NOTANALYSED^Not analysed^L", payload.get("not_analysed_reason") or "", ""))
    obx.append(("ST", "STUDYUID^Study Instance UID^L", payload.get("study_instance_uid"), ""))
    for n, (vt, ident, value, unit) in enumerate(obx, start=1):
        ident_esc = ident  # identifiers above are literal components, already HL7-safe
        segs.append(f"OBX|{n}|{vt}|{ident_esc}||{_esc(value)}|{unit}|||||{'F' if status == 'F' else 'X'}")
    return hl7.parse("\r".join(segs))


def send_mllp(message: hl7.Message | str, host: str, port: int, timeout: float) -> hl7.Message:
    """Send one message framed by MLLP and return the parsed ACK (raises on no/negative ACK)."""
    data = SB + str(message).encode("utf-8") + EB + CR
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        buf = b""
        while EB + CR not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("peer closed the connection before an ACK")
            buf += chunk
    raw = buf.split(SB, 1)[-1].split(EB, 1)[0].decode("utf-8", "replace")
    ack = hl7.parse(raw)
    code = str(ack.segment("MSA")[1])
    if code not in ("AA", "CA"):
        text = str(ack.segment("MSA")[3]) if len(ack.segment("MSA")) > 3 else ""
        raise RuntimeError(f"negative ACK {code} {text}".strip())
    return ack


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def post_webhook(url: str, payload: dict, secret: str, timeout: float) -> int:
    body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    ts = str(int(time.time()))
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "ichnode",
        "X-Ichnode-Timestamp": ts, "X-Ichnode-Signature": sign(secret.encode(), ts, body)})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - configured URL
        return resp.status


def _with_retries(fn, attempts: int, backoff: float) -> dict:  # noqa: ANN001
    error = None
    for n in range(1, attempts + 1):
        try:
            detail = fn()
            return {"ok": True, "attempts": n, "detail": detail, "at": datetime.now(UTC).isoformat()}
        except (OSError, RuntimeError, ValueError, urllib.error.URLError, hl7.ParseException) as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
            if n < attempts:
                time.sleep(backoff * 2 ** (n - 1))
    return {"ok": False, "attempts": attempts, "error": error, "at": datetime.now(UTC).isoformat()}


def payload_for(study, summary: dict) -> dict:  # noqa: ANN001 - index.Study
    """The webhook/HL7 content (see module doc for what is and is not in it)."""
    return {
        "event": "ichnode.priority", "version": 1,
        "study_instance_uid": study.study_uid, "accession_number": study.accession_number,
        "priority": summary["priority"], "reasons": summary.get("priority_reasons", []),
        "flags": summary.get("priority_flags", {}),
        "analysed": summary.get("status") == "ok",
        "not_analysed_reason": summary.get("reason"),
        "subtypes_present": summary.get("subtypes_present", []),
        "probabilities": summary.get("probabilities", {}),
        "hematoma_volume_ml": summary.get("hematoma_volume_ml"),
        "midline_shift_mm": summary.get("midline_shift_mm"),
        "last_received": study.last_received.isoformat() if study.last_received else None,
    }


def push(settings, study, summary: dict) -> dict:  # noqa: ANN001
    """Send to every configured channel; returns {channel: outcome}. Never raises."""
    r = settings.routing
    payload = payload_for(study, summary)
    out: dict[str, dict] = {}
    if r.hl7_host and r.hl7_port:
        msg = build_oru(payload, patient_id=study.patient_id, routing=r)
        out["hl7"] = _with_retries(
            lambda: str(send_mllp(msg, r.hl7_host, r.hl7_port, r.notify_timeout_s).segment("MSA")[1]),
            r.notify_attempts, r.notify_backoff_s)
    if r.webhook_url:
        secret = r.webhook_secret.get_secret_value()
        out["webhook"] = _with_retries(
            lambda: post_webhook(r.webhook_url, payload, secret, r.notify_timeout_s),
            r.notify_attempts, r.notify_backoff_s)
    for channel, o in out.items():
        log.log(logging.INFO if o["ok"] else logging.WARNING, "priority push",
                extra={"channel": channel, "ok": o["ok"], "attempts": o["attempts"],
                       "study": uid_ref(study.study_uid), "level": payload["priority"],
                       "error": o.get("error")})
    return out
