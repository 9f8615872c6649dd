"""Step ``prepare`` (deid queue, PHI zone): the selected series as a volume in the job folder.

Reads the selected series' spool files (localizers excluded, as in selection) with
:func:`models.preprocess.series.load_series` and writes to ``ctx.job_dir``:

* ``volume.npz`` — :meth:`models.volume.Volume.save` (voxels in HU, affine, technical meta);
* ``series.json`` — the slices in volume order: SOP Instance UIDs and spool paths, plus the
  study/series UIDs (PHI zone only: this folder never leaves the node).

Idempotent: files are written to a temporary name and renamed, so a re-run replaces them.
An unusable series raises :class:`StepError` with the reason (no retry).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sqlalchemy import select

from node.index import Instance, Series, Study
from node.selection import is_localizer
from workers.context import StepContext, StepError


def _selected_files(ctx: StepContext) -> tuple[str, str, dict[str, Path]]:
    spool = Path(ctx.settings.storage.spool_dir)
    with ctx.index.session() as s:
        job = ctx.job(s)
        if job is None:
            raise StepError("job no longer exists")
        study = s.get(Study, job.study_id)
        if not study.selected_series_uid:
            raise StepError(f"study has no selected series ({study.state_reason or 'skipped'})")
        rows = s.execute(select(Instance.sop_instance_uid, Instance.path, Instance.meta)
                         .join(Series, Series.id == Instance.series_id)
                         .where(Series.series_uid == study.selected_series_uid)).all()
        study_uid, series_uid = study.study_uid, study.selected_series_uid
    files = {uid: spool / path for uid, path, meta in rows if not is_localizer(meta or {})}
    if not files:
        raise StepError("selected series has no image instances in the index")
    missing = [p for p in files.values() if not p.exists()]
    if missing:
        raise StepError(f"{len(missing)} spool file(s) of the selected series are missing")
    return study_uid, series_uid, files


def _write_atomic(path: Path, write) -> None:  # noqa: ANN001 - callable(Path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    write(tmp)
    os.replace(tmp, path)


def run(ctx: StepContext, previous: dict) -> dict:
    from models.preprocess.series import SeriesError, load_series

    study_uid, series_uid, files = _selected_files(ctx)
    try:
        volume = load_series(sorted(files.values()),
                             min_slices=ctx.settings.assembly.min_slices)
    except SeriesError as exc:
        raise StepError(f"selected series cannot be loaded: {exc}") from exc
    out = ctx.job_dir
    _write_atomic(out / "volume.npz", volume.save)
    slices = [{"sop_instance_uid": uid, "path": str(files[uid])}
              for uid in volume.sop_instance_uids]
    info = {"study_uid": study_uid, "series_uid": series_uid, "shape": list(volume.hu.shape),
            "spacing_mm": list(volume.spacing), "affine": volume.affine.tolist(), "slices": slices}
    _write_atomic(out / "series.json",
                  lambda p: p.write_text(json.dumps(info, indent=1), encoding="utf-8"))
    return {"job_dir": str(out), "slices": len(slices)}
