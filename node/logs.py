"""Structured logging without patient identity.

Log records carry only technical facts. UIDs are shown through :func:`uid_ref` (a short,
salted-free hash: enough to correlate lines, useless to re-identify). Never pass a patient name,
patient ID, birth date or accession number to a logger.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from datetime import UTC, datetime


def uid_ref(uid: str | None) -> str:
    """A short stable reference for a UID, for logs and audit rows."""
    if not uid:
        return "-"
    return "u" + hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:12]


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and any ``extra={...}`` fields."""

    _skip = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in self._skip and not key.startswith("_"):
                out[key] = value if isinstance(value, (int, float, bool, type(None))) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str = "INFO", *, json_lines: bool = True) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
    # pynetdicom logs whole datasets at DEBUG (PHI): keep it at WARNING whatever our level.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
