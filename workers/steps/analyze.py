"""gpu queue: triage + segmentation + measurements of one de-identified work item.

Reads ONLY the work-item folder (``previous["work_item"]``): ``volume.npz`` and the
``intracranial.npz`` mask the deid step found on the original voxels (a work item without
one, from an older node, gets the mask found on its own voxels). Writes there
``results.json`` (:class:`models.results.AnalysisResult`) and ``masks.npz`` (boolean
``hematoma``, ``ventricle_left``, ``ventricle_right`` and uint8 ``hematoma_subtype`` on the
volume's grid). Idempotent: a retry overwrites both files atomically.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from workers.context import StepContext, StepError

log = logging.getLogger(__name__)

RESULTS = "results.json"
INTRACRANIAL = "intracranial.npz"  # written by the deid step
MASKS = "masks.npz"


def run(ctx: StepContext, previous: dict) -> dict:
    from models.ich.bundle import BundleError
    from models.ich.inference import analyze_volume
    from models.preprocess.cavity import load_mask
    from models.preprocess.series import SeriesError
    from models.volume import Volume

    work_item = Path(previous["work_item"])
    volume_file = work_item / "volume.npz"
    if not volume_file.is_file():
        raise StepError(f"work item has no volume.npz ({work_item.name})")
    try:
        volume = Volume.load(volume_file)
    except (ValueError, KeyError, OSError) as exc:
        raise StepError(f"work item volume.npz is unreadable: {exc}") from exc
    intracranial = None
    if (work_item / INTRACRANIAL).is_file():
        try:
            intracranial = load_mask(work_item / INTRACRANIAL)
        except (ValueError, KeyError, OSError) as exc:
            raise StepError(f"work item intracranial.npz is unreadable: {exc}") from exc
    try:
        result, masks = analyze_volume(volume, ctx.settings, intracranial=intracranial)
    except SeriesError as exc:
        raise StepError(f"series not analysable: {exc}") from exc
    except BundleError as exc:
        # A broken model folder will not heal by retrying.
        raise StepError(f"model unusable: {exc}") from exc

    tmp = work_item / (MASKS + ".tmp.npz")
    np.savez_compressed(tmp, **masks)
    os.replace(tmp, work_item / MASKS)
    result.masks_file = MASKS
    tmp = work_item / (RESULTS + ".tmp")
    tmp.write_text(result.model_dump_json(indent=2))
    os.replace(tmp, work_item / RESULTS)
    log.info("analysed work item", extra={
        "job_id": ctx.job_id, "any": round(result.findings["any"].probability, 3),
        "hematoma_ml": result.hematoma_volume_ml, "seconds": result.seconds.get("total")})
    return {"work_item": str(work_item), "result": RESULTS}
