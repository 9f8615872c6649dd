"""The Celery app, built from the node's settings.

Production: Redis (``queue.broker_url = redis://...``). Embedded default: kombu's
``filesystem://`` transport under ``<storage.root>/broker`` — no server, the same tasks, and a
worker process that ``ichnode serve`` supervises. Only JSON travels (job ids and small dicts);
arrays go through the job and work-item folders.

Reliability settings: late acknowledgement + reject on worker lost (a task whose process dies
is redelivered), prefetch 1 (a worker holds no more than it runs), a hard time limit per task.
The node's job table stays the source of truth: every message carries the job's dispatch
token, and a message whose token is no longer the job's current one is dropped (see
:mod:`workers.tasks`), so re-dispatching a job after a crash can never run it twice in parallel.
"""

from __future__ import annotations

import base64
import importlib
import json
from pathlib import Path

from celery import Celery, signals
from kombu import Exchange, Queue

from node.config import Settings

#: Queue of each known step (by design: deid and report in the PHI zone, gpu without identity).
STEP_QUEUES = {"prepare": "deid", "deid": "deid", "analyze": "gpu", "ner": "ner",
               "report": "report"}
QUEUES = ("deid", "gpu", "ner", "report")
TASK_PREFIX = "ichnode.step."


class StepModuleMissing(RuntimeError):
    """A configured step has no module in workers/steps (raised when a worker starts)."""


def task_name(step: str) -> str:
    return TASK_PREFIX + step


def queue_name(settings: Settings, queue: str) -> str:
    return settings.queue.queue_prefix + queue


def step_queue(step: str) -> str:
    return STEP_QUEUES.get(step, "deid")


def configured_steps(settings: Settings) -> list[str]:
    return list(dict.fromkeys([*settings.queue.steps, *settings.queue.side_steps]))


def filesystem_folders(settings: Settings) -> dict[str, Path]:
    base = settings.broker_dir.resolve()
    return {"data_folder_in": base / "queue", "data_folder_out": base / "queue",
            "processed_folder": base / "processed", "control_folder": base / "control"}


def _transport_options(settings: Settings) -> dict:
    q = settings.queue
    if settings.embedded_broker:
        folders = filesystem_folders(settings)
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        return {**{k: str(v) for k, v in folders.items()}, "store_processed": False,
                "polling_interval": 0.25}
    # Redis: an unacknowledged message comes back after visibility_timeout (why this value:
    # QueueSection.broker_visibility_timeout_s).
    options = {"visibility_timeout": q.broker_visibility_timeout_s,
               "socket_connect_timeout": 3, "socket_timeout": 10}
    if q.queue_prefix:
        options["global_keyprefix"] = q.queue_prefix
    return options


def _route(name: str) -> dict:
    return {"queue": name, "exchange": name, "routing_key": name}


def _queue(name: str) -> Queue:
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def create_app(settings: Settings) -> Celery:
    """A Celery app for these settings with all step tasks registered."""
    app = Celery("ichnode", set_as_current=False)
    q = settings.queue
    routes = {task_name(step): _route(queue_name(settings, step_queue(step)))
              for step in {*STEP_QUEUES, *configured_steps(settings)}}
    app.conf.update(
        broker_url=settings.broker_url,
        result_backend=q.result_backend or None,
        task_ignore_result=not q.result_backend,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=q.task_timeout_s,
        task_soft_time_limit=max(1.0, q.task_timeout_s * 0.95),
        # Each queue its own direct exchange and routing key: a gpu-only worker on another
        # host must never receive deid/report work (PHI zone).
        task_queues=[_queue(queue_name(settings, name)) for name in QUEUES],
        task_default_queue=queue_name(settings, "deid"),
        task_routes=routes,
        broker_transport_options=_transport_options(settings),
        broker_connection_timeout=3,
        broker_connection_retry_on_startup=True,
        # The filesystem transport has no broadcast worth using; Redis keeps remote control.
        worker_enable_remote_control=not settings.embedded_broker,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        task_publish_retry=False,
    )
    app.ichnode_settings = settings
    from workers import tasks

    tasks.register(app)
    return app


def tokens_in_broker(app: Celery, tokens: set[str]) -> set[str] | None:
    """The dispatch tokens among ``tokens`` that still have a message in the broker: waiting in
    one of our queues or held, unacknowledged, by a worker. None when the transport cannot tell:
    the embedded filesystem transport deletes a message file as soon as a worker takes it."""
    if not tokens:
        return set()
    with app.connection_for_read() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, timeout=3)
        if conn.transport.driver_type != "redis":
            return None
        raw = _redis_messages(conn.default_channel, [q.name for q in app.conf.task_queues])
    found: set[str] = set()
    for item in raw:
        body = _message_body(item)
        found.update(token for token in tokens if token in body)
    return found


def _redis_messages(channel, queues: list[str]) -> list[bytes]:  # noqa: ANN001 - kombu Channel
    """Every message in our queue lists (all priority sub-lists) and in the unacked hash.
    Keys are prefixed by hand: kombu's prefixing client only prefixes the commands it uses."""
    prefix = channel.global_keyprefix
    client = channel.client
    with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            for pri in channel.priority_steps:
                key = f"{queue}{channel.sep}{pri}" if pri else queue
                pipe.lrange(prefix + key, 0, -1)
        pipe.hvals(prefix + channel.unacked_key)
        return [item for items in pipe.execute() for item in items]


def _message_body(raw: bytes) -> str:
    """The decoded body (task args, with the token, and the rest of the chain) of one stored
    message: a queue entry is the message, an unacked entry ``[message, exchange, key]``."""
    try:
        data = json.loads(raw)
        message = data[0] if isinstance(data, list) else data
        body = message.get("body", "")
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body).decode("utf-8", "replace")
        return body if isinstance(body, str) else ""
    except (ValueError, TypeError, AttributeError, IndexError):
        return ""  # not one of ours (another app on the same keys): never matches a token


def check_step_modules(settings: Settings) -> None:
    """Import every configured step module; a missing one stops the worker with its name."""
    for step in configured_steps(settings):
        try:
            module = importlib.import_module(f"workers.steps.{step}")
        except ModuleNotFoundError as exc:
            if exc.name == f"workers.steps.{step}":
                raise StepModuleMissing(f"configured step {step!r} has no module "
                                        f"workers/steps/{step}.py") from exc
            raise
        if not callable(getattr(module, "run", None)):
            raise StepModuleMissing(f"workers/steps/{step}.py has no run(ctx, previous)")


@signals.worker_init.connect
def _on_worker_init(sender=None, **_kw) -> None:  # noqa: ANN001
    app = getattr(sender, "app", None)
    settings = getattr(app, "ichnode_settings", None)
    if settings is not None:
        check_step_modules(settings)


def __getattr__(name: str):  # ``celery -A workers.app`` looks for ``app``
    if name == "app":
        from node.config import load_settings

        globals()["app"] = create_app(load_settings())
        return globals()["app"]
    raise AttributeError(name)
