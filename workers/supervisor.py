"""The embedded worker: a ``celery worker`` subprocess for all queues, restarted if it dies.

The worker gets the node's effective settings through a private file (mode 0600, secrets
included) so a node configured in code or by environment starts an identical worker. When the
worker dies, it is restarted (with a growing delay if it keeps dying) and ``on_restart`` is
called — the node then re-dispatches unfinished jobs, because the filesystem transport loses
the messages a killed worker had taken.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, SecretStr

from workers.app import QUEUES

log = logging.getLogger("workers.supervisor")


def _plain(value: Any) -> Any:
    """Settings as plain JSON values with secrets revealed (the worker needs them)."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, BaseModel):
        return {name: _plain(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value.resolve())
    return value


def write_settings_file(settings, path: Path) -> Path:  # noqa: ANN001 - Settings
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(_plain(settings), fh)  # JSON is YAML: node.config reads it
    return path


def worker_command(config_file: Path, *, queues: str = "", concurrency: int = 1) -> list[str]:
    args = [sys.executable, "-m", "node.cli.main", "--config", str(config_file), "worker",
            "--concurrency", str(concurrency)]
    if queues:
        args += ["--queues", queues]
    return args


class WorkerSupervisor:
    """Runs and watches one worker subprocess (all queues)."""

    def __init__(self, settings,  # noqa: ANN001 - Settings
                 on_restart: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.on_restart = on_restart
        self.config_file = settings.storage.root.resolve() / "run" / "worker-settings.json"
        self.log_file = settings.storage.root.resolve() / "logs" / "worker.log"
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "WorkerSupervisor":
        write_settings_file(self.settings, self.config_file)
        self._spawn()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)
        self._thread.start()
        return self

    def _spawn(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.pop("ICHNODE_CONFIG", None)  # the settings file below is the whole configuration
        cmd = worker_command(self.config_file, queues=",".join(QUEUES),
                             concurrency=self.settings.queue.worker_concurrency)
        with open(self.log_file, "ab") as fh:
            # Own session: a Ctrl-C in the node's terminal reaches the node, which then stops
            # the worker in order (warm shutdown) instead of both racing.
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self._spawned_at = time.monotonic()
        log.info("embedded worker started", extra={"pid": self.proc.pid, "log": str(self.log_file)})

    def _watch(self) -> None:
        delay = 1.0
        while not self._stop.wait(0.5):
            code = self.proc.poll()
            if code is None:
                continue
            # Crash loop: back off up to a minute; a worker that stayed up a while resets it.
            delay = 1.0 if time.monotonic() - self._spawned_at > 60 else min(60.0, delay * 2)
            log.error("embedded worker exited, restarting",
                      extra={"pid": self.proc.pid, "code": code, "in_s": delay / 2})
            if self._stop.wait(delay / 2):
                return
            self._spawn()
            self.restarts += 1
            if self.on_restart:
                try:
                    self.on_restart()
                except Exception:  # noqa: BLE001 - the node keeps running; logged
                    log.exception("re-dispatch after worker restart failed")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        if not self.proc or self.proc.poll() is not None:
            return
        # SIGTERM to the main process only = warm shutdown: it lets the running task finish
        # (acks_late) and stops its pool; the process group is killed only as a last resort.
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("embedded worker did not stop in time, killing it")
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
