"""The pipeline canvas of one job.

``analyze`` jobs: the configured steps as a Celery ``chain`` (default prepare -> deid ->
analyze -> report); side steps (default ``ner``) run beside it in a ``group``. The last chain
step joins them through the job row (see :mod:`workers.tasks`), which keeps the embedded
filesystem transport free of a result backend (a ``chord`` would need one).

``not_analysed`` jobs (study skipped by selection): only the ``report`` step, which tells PACS
why nothing was analysed. None is returned when there is nothing to run (no report step
configured); the dispatcher then finishes the job at once.
"""

from __future__ import annotations

from celery import Celery, chain, group
from celery.canvas import Signature

from workers.app import task_name
from workers.tasks import ROLE_LAST, ROLE_MAIN, ROLE_SIDE


def steps_for(settings, kind: str) -> tuple[list[str], list[str]]:  # noqa: ANN001 - Settings
    """(chain steps, side steps) for a job kind."""
    if kind == "not_analysed":
        return [s for s in settings.queue.steps if s == "report"], []
    return list(settings.queue.steps), [s for s in settings.queue.side_steps
                                        if s not in settings.queue.steps]


def build(app: Celery, settings, job_id: int, token: str, kind: str,  # noqa: ANN001
          steps: list[str] | None = None) -> Signature | None:
    """The canvas for a job; ``steps`` overrides the configured chain (tests, tools)."""
    chain_steps, side = steps_for(settings, kind)
    if steps is not None:
        chain_steps = list(steps)
    if not chain_steps:
        return None
    sigs = []
    for i, step in enumerate(chain_steps):
        last = i == len(chain_steps) - 1
        args = ({}, job_id, token) if i == 0 else (job_id, token)
        sigs.append(app.signature(task_name(step), args=args, kwargs={
            "role": ROLE_LAST if last else ROLE_MAIN, "join": side if last else []}))
    main = chain(*sigs) if len(sigs) > 1 else sigs[0]
    if not side:
        return main
    beside = [app.signature(task_name(s), args=({}, job_id, token), kwargs={"role": ROLE_SIDE})
              for s in side]
    return group([main, *beside], app=app)
