"""HL7 v2 MLLP listener: clinical text (ORU / MDM, OBX text and NTE comments) for the NER step.

Each message is stored as a ClinicalText row with the patient ID (PID-3) and accession number
(first of OBR-18, OBR-3, ORC-3, TXA-15, TXA-14) so that the NER step can match it to the study
whether the images arrive before or after it. Answers are original-mode ACKs: AA when stored,
AE when the message is understood but unusable (no identifiers, no text, binary or oversize
text), AR when it is not an acceptable message (unparseable, wrong type, too large); MSA-3
says why. Messages are bounded (``hl7_in.max_message_bytes``) and idle connections time out.
The text and identifiers are PHI: logs carry only message type, outcome and counts.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime

import hl7
from hl7.mllp import InvalidBlockError, start_hl7_server
from sqlalchemy import select

from node.config import Settings
from node.index import ClinicalText, Index, Study, open_index
from workers.steps.ner import PATIENT_MATCH_WINDOW

log = logging.getLogger(__name__)
ACCEPTED_TYPES = ("ORU", "MDM")
TEXT_VALUE_TYPES = ("TX", "FT", "ST")
ACCESSION_FIELDS = (("OBR", 18), ("OBR", 3), ("ORC", 3), ("TXA", 15), ("TXA", 14))


@dataclass
class Outcome:
    code: str  # AA, AE, AR
    reason: str = ""
    text_id: int | None = None
    study_id: int | None = None  # a study that already exists for this text


def _first_component(msg: hl7.Message, segment: str, field: int) -> str:
    try:
        seg = msg.segment(segment)
    except KeyError:
        return ""
    if len(seg) <= field:
        return ""
    value = str(seg[field]).split(msg.separators[2])[0]  # first repetition
    return value.split(msg.separators[3])[0].strip()


def extract_ids(msg: hl7.Message) -> tuple[str | None, str | None]:
    """(patient ID, accession number) of the message, or None where absent."""
    patient = _first_component(msg, "PID", 3) or None
    accession = None
    for segment, field in ACCESSION_FIELDS:
        accession = _first_component(msg, segment, field)
        if accession:
            break
    return patient, accession or None


def extract_text(msg: hl7.Message) -> str:
    """OBX-5 of text value types (repetitions = lines) and NTE-3 comments, unescaped."""
    lines: list[str] = []
    rep = msg.separators[2]
    for segment_id, field in (("OBX", 5), ("NTE", 3)):
        try:
            segments = msg.segments(segment_id)
        except KeyError:
            continue
        for seg in segments:
            if segment_id == "OBX" and (len(seg) <= 2 or str(seg[2]).strip() not in TEXT_VALUE_TYPES):
                continue
            if len(seg) <= field:
                continue
            raw = str(seg[field])
            for part in raw.split(rep):
                text = msg.unescape(part).replace("\\.br\\", "\n").strip()
                if text:
                    lines.append(text)
    return "\n".join(lines)


def _decode(block: bytes) -> str:
    for encoding in ("utf-8", "gb18030"):
        try:
            return block.decode(encoding)
        except UnicodeDecodeError:
            continue
    return block.decode("latin-1")


def _ack(msg: hl7.Message | None, outcome: Outcome) -> bytes:
    if msg is None:
        # Nothing to copy from: a minimal ACK that still names the outcome.
        text = f"MSH|^~\\&|ICHNODE||||||ACK|ICHNODE-ACK|P|2.5\rMSA|{outcome.code}||{outcome.reason}\r"
        return text.encode("utf-8")
    ack = msg.create_ack(outcome.code, application="ICHNODE")
    if outcome.reason:
        ack.segment("MSA").assign_field(outcome.reason.replace("|", "/")[:80], 3)
    return str(ack).encode("utf-8")


def store_message(index: Index, msg: hl7.Message, *, max_chars: int) -> Outcome:
    """Check one parsed message and store its text; the outcome says how to acknowledge."""
    from models.ner.textcheck import NerInputError, check_text

    try:
        kind = str(msg.segment("MSH")[9]).split(msg.separators[3])[0]
    except (KeyError, IndexError):
        return Outcome("AR", "no MSH-9 message type")
    if kind not in ACCEPTED_TYPES:
        return Outcome("AR", f"unsupported message type {kind or '(empty)'}: ORU or MDM expected")
    patient, accession = extract_ids(msg)
    if not patient and not accession:
        return Outcome("AE", "no patient ID (PID-3) or accession number (OBR-18/OBR-3/TXA-15)")
    try:
        text = check_text(extract_text(msg), max_chars=max_chars)
    except NerInputError as exc:
        return Outcome("AE", f"clinical text unusable: {exc}")
    with index.session() as session:
        study = None
        if accession:
            study = session.scalar(select(Study).where(Study.accession_number == accession).limit(1))
        if study is None and patient and not accession:
            # Only a recent study of the patient: an old visit's study must not take the text.
            recent = datetime.now(UTC) - PATIENT_MATCH_WINDOW
            candidate = session.scalar(select(Study).where(Study.patient_id == patient)
                                       .order_by(Study.last_received.desc()).limit(1))
            last = candidate.last_received if candidate else None
            if last is not None and (last if last.tzinfo else last.replace(tzinfo=UTC)) >= recent:
                study = candidate
        row = ClinicalText(source="hl7", accession_number=accession, patient_id=patient,
                           study_uid=study.study_uid if study else None, text=text)
        session.add(row)
        session.flush()
        return Outcome("AA", "", row.id, study.id if study and study.entities is not None else None)


class Hl7Listener:
    """The MLLP server; ``start()`` runs it on a background thread, ``stop()`` ends it."""

    def __init__(self, settings: Settings, index: Index | None = None) -> None:
        self.settings = settings
        self.cfg = settings.hl7_in
        self.index = index or open_index(settings)
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # -- connection handling
    async def _handle(self, reader, writer) -> None:  # noqa: ANN001 - hl7.mllp streams
        peer = writer.get_extra_info("peername")
        try:
            while True:
                try:
                    block = await asyncio.wait_for(reader.readblock(), self.cfg.read_timeout_s)
                except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    break
                except ValueError:  # over the size limit: the stream is no longer in sync
                    writer.writeblock(_ack(None, Outcome("AR", "message too large")))
                    await writer.drain()
                    log.warning("hl7 message rejected", extra={"reason": "too large", "peer": str(peer)})
                    break
                except InvalidBlockError:
                    writer.writeblock(_ack(None, Outcome("AR", "invalid MLLP block")))
                    await writer.drain()
                    break
                outcome, reply = await self._process(block)
                writer.writeblock(reply)
                await writer.drain()
                if outcome.study_id is not None and self.cfg.ner_on_arrival:
                    asyncio.get_running_loop().run_in_executor(None, self._refresh, outcome.study_id)
        finally:
            writer.close()

    async def _process(self, block: bytes) -> tuple[Outcome, bytes]:
        text = _decode(block).replace("\r\n", "\r").replace("\n", "\r")
        try:
            msg = hl7.parse(text)
            msg.segment("MSH")
        except Exception:  # noqa: BLE001 - any parser failure is the sender's bad message
            outcome = Outcome("AR", "not a parseable HL7 v2 message")
            log.warning("hl7 message rejected", extra={"reason": outcome.reason})
            return outcome, _ack(None, outcome)
        try:
            outcome = await asyncio.to_thread(store_message, self.index, msg,
                                              max_chars=self._max_chars())
        except Exception as exc:  # noqa: BLE001 - database trouble: tell the sender to retry
            # Type only: database errors quote the statement's parameters (PHI).
            log.error("hl7 message not stored", extra={"error": type(exc).__name__})
            outcome = Outcome("AE", f"not stored: {type(exc).__name__}")
        log.info("hl7 message", extra={"ack": outcome.code, "reason": outcome.reason or None,
                                       "text_id": outcome.text_id})
        return outcome, _ack(msg, outcome)

    def _max_chars(self) -> int:
        from models.ner.textcheck import MAX_CHARS

        return MAX_CHARS

    def _refresh(self, study_id: int) -> None:
        # Text that arrives after the images: re-run NER for that study now.
        try:
            from workers.steps.ner import analyse_study

            analyse_study(self.settings, self.index, study_id)
        except Exception as exc:  # noqa: BLE001 - the text is stored; the next NER run will use it
            log.error("ner refresh failed", extra={"study_id": study_id, "error": type(exc).__name__})

    # -- lifecycle
    async def serve(self) -> None:
        self._server = await start_hl7_server(self._handle, self.cfg.host, self.cfg.port,
                                              limit=self.cfg.max_message_bytes)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("hl7 listener started", extra={"host": self.cfg.host, "port": self.port})
        self._ready.set()
        async with self._server:
            await self._server.serve_forever()

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self.serve())
        except asyncio.CancelledError:
            pass
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            self._ready.set()
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()

    def start(self, timeout: float = 10.0) -> "Hl7Listener":
        self._thread = threading.Thread(target=self._run, name="hl7-listener", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("hl7 listener did not start")
        if self._error is not None:
            raise self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop = self._loop
        if loop is not None and loop.is_running():
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        if self._thread is not None:
            self._thread.join(timeout)
        log.info("hl7 listener stopped")

    def __enter__(self) -> "Hl7Listener":
        return self.start()

    def __exit__(self, *_exc) -> None:  # noqa: ANN002
        self.stop()


def serve_forever(settings: Settings) -> None:
    """Run the listener in the foreground until interrupted (``ichnode hl7-listen``)."""
    listener = Hl7Listener(settings)
    try:
        asyncio.run(listener.serve())
    except KeyboardInterrupt:
        pass
