#!/bin/sh
# Container health probe (Dockerfile HEALTHCHECK and compose healthcheck).
#   node:   `ichnode status --json` must succeed (configuration loads, the index answers).
#           A crashed node ends the container (it is PID 1's only child), so this catches the
#           rest: an index (SQLite file / PostgreSQL) that cannot be read.
#   worker: a Celery worker on this host must answer a ping over the broker. `ichnode worker`
#           names itself ichnode-<pid>@<hostname>, and a container's hostname is its own.
set -eu

case "${CONTAINER_ROLE:-node}" in
    node)
        ichnode status --json >/dev/null
        ;;
    worker)
        exec python - <<'PY'
import os
import socket
import sys

from workers.app import app  # built from the same ICHNODE_* settings as the worker

host = socket.gethostname()
replies = app.control.ping(timeout=float(os.environ.get("PING_TIMEOUT_S", "5"))) or []
names = [name for reply in replies for name in reply]
sys.exit(0 if any(name.rsplit("@", 1)[-1] == host for name in names) else 1)
PY
        ;;
    *)
        echo "unknown CONTAINER_ROLE=${CONTAINER_ROLE}" >&2
        exit 2
        ;;
esac
