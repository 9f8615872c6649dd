"""What a pipeline step gets: settings, the index and the job it works on.

Steps are plain functions ``run(ctx, previous) -> dict`` in :mod:`workers.steps`; the Celery
tasks in :mod:`workers.tasks` only build a context, call the step and record the outcome on
the job row. Small JSON dicts travel through the broker; arrays travel through folders:

* ``ctx.job_dir``  (PHI zone): ``var/jobs/<job id>/`` — the prepared original volume
  (``volume.npz``), ``series.json`` (sorted slice list: SOP Instance UIDs and spool paths),
  the defaced de-identified DICOM copy (``defaced/``), built results (``results/``).
* ``ctx.work_item_dir(pseudo_id)`` (no identity): ``var/work/<pseudonymous id>/`` —
  ``volume.npz`` (defaced), ``item.json`` (pseudonymous ids, geometry), then the gpu step's
  ``results.json`` and ``masks.npz``. This folder is all a gpu worker ever reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from node.config import Settings
from node.index import Index, Job


class StepError(Exception):
    """A permanent failure of a step (bad input): the job fails with this reason, no retry."""


@dataclass
class StepContext:
    settings: Settings
    index: Index
    job_id: int

    @cached_property
    def job_dir(self) -> Path:
        path = self.settings.storage.root / "jobs" / str(self.job_id)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def work_item_dir(self, pseudo_id: str) -> Path:
        path = self.settings.storage.work_dir / pseudo_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def job(self, session) -> Job:  # noqa: ANN001 - sqlalchemy Session
        return session.get(Job, self.job_id)
