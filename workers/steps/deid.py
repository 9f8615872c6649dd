"""Step ``deid`` (deid queue, PHI zone): the identity-free work item and a defaced DICOM copy.

Reads what ``prepare`` wrote to ``ctx.job_dir`` (``volume.npz``, ``series.json``), defaces the
volume (``deid.deface_mode``), and writes:

* ``ctx.work_item_dir(pseudo_id)`` — ``volume.npz`` (defaced voxels, affine, an allow-list of
  technical meta), ``intracranial.npz`` (the cranial-cavity mask the models' input is
  restricted to, found on the original voxels; defacing writes inside it only dense bone, as the
  one value the models see it as) and ``item.json`` (pseudonymous study/series/slice UIDs, geometry, defacing
  facts). No name, ID, date, accession number or original UID: this is all a gpu worker sees.
* ``ctx.job_dir/defaced/`` — the original instances with defaced pixels and a PS3.15 Annex E
  de-identified header (for research archives via routing).

The original <-> pseudonym mapping goes to the index (``pseudonyms`` table). Idempotent: the
pseudonyms are keyed hashes, files are replaced atomically, known mappings are not re-added.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pydicom

from models.preprocess.cavity import CavityNotFound, intracranial_mask, save_mask
from models.volume import Volume
from node.logs import uid_ref
from workers.context import StepContext, StepError
from workers.deid import pseudonyms
from workers.deid.deface import DefaceError, deface
from workers.deid.header import BurnedInAnnotationError, HeaderDeidentifier, ProfileOptions
from workers.deid.pseudonyms import Pseudonymizer
from workers.deid.series import write_copy

log = logging.getLogger(__name__)

ITEM_FILE = "item.json"
INTRACRANIAL_FILE = "intracranial.npz"
COPY_DIR = "defaced"
# Technical meta a model or a reviewer may use. Strings are allowed only for these keys; other
# keys pass only with a number or boolean value (an unknown string could be anything).
META_TEXT_KEYS = {"modality", "manufacturer", "model", "kernel"}


def safe_meta(meta: dict) -> dict:
    out: dict = {}
    for key, value in meta.items():
        if isinstance(value, bool) or isinstance(value, (int, float)) or value is None:
            out[key] = value
        elif isinstance(value, str) and key in META_TEXT_KEYS:
            out[key] = value[:64]
        elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
            out[key] = value
    return out


def _load_inputs(job_dir: Path) -> tuple[Volume, dict, list[Path]]:
    try:
        info = json.loads((job_dir / "series.json").read_text(encoding="utf-8"))
        volume = Volume.load(job_dir / "volume.npz")
    except (OSError, ValueError, KeyError) as exc:
        raise StepError(f"prepared inputs missing or unreadable ({type(exc).__name__})") from exc
    paths = [Path(s["path"]) for s in info["slices"]]
    if len(paths) != volume.hu.shape[0]:
        raise StepError(f"series.json lists {len(paths)} slices, volume has {volume.hu.shape[0]}")
    missing = sum(not p.is_file() for p in paths)
    if missing:
        raise StepError(f"{missing} source file(s) of the series are missing")
    return volume, info, paths


def _seed(pseudo: Pseudonymizer, series_uid: str) -> int:
    # MosMed's random ellipses: reproducible per series, unpredictable without the secret.
    return int.from_bytes(pseudo.digest("deface-seed", series_uid)[:8], "big")


def _write_work_item(work: Path, volume: Volume, intracranial, item: dict) -> None:  # noqa: ANN001
    tmp = work / "volume.tmp.npz"
    volume.save(tmp)
    os.replace(tmp, work / "volume.npz")
    tmp = work / "intracranial.tmp.npz"
    save_mask(tmp, intracranial)
    os.replace(tmp, work / INTRACRANIAL_FILE)
    tmp = work / (ITEM_FILE + ".tmp")
    tmp.write_text(json.dumps(item, indent=1), encoding="utf-8")
    os.replace(tmp, work / ITEM_FILE)


def _write_copy(job_dir: Path, paths: list[Path], hu, deidentifier: HeaderDeidentifier) -> int:
    final = job_dir / COPY_DIR
    tmp = job_dir / (COPY_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        copied = write_copy(paths, hu, tmp, deidentifier)
    except BurnedInAnnotationError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StepError(f"not de-identified: {exc}") from exc
    except (ValueError, AttributeError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StepError(f"defaced copy cannot be written: {exc}") from exc
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return len(copied)


def run(ctx: StepContext, previous: dict) -> dict:
    volume, info, paths = _load_inputs(ctx.job_dir)
    study_uid, series_uid = str(info["study_uid"]), str(info["series_uid"])
    originals = [str(s["sop_instance_uid"]) for s in info["slices"]]
    pseudo = Pseudonymizer.from_settings(ctx.settings)
    mode = ctx.settings.deid.deface_mode

    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    patient_id = str(first.get("PatientID", "") or "")
    deidentifier = HeaderDeidentifier(pseudo, ProfileOptions(defaced=mode != "off"))
    try:
        deidentifier.check_burned_in(first)
    except BurnedInAnnotationError as exc:
        raise StepError(f"not de-identified: {exc}") from exc

    defacing: dict = {"mode": mode}
    hu, intracranial = volume.hu, None
    if mode != "off":
        try:
            result = deface(volume, mode, seed=_seed(pseudo, series_uid))
        except DefaceError as exc:
            raise StepError(f"not defaced: {exc}") from exc
        hu, intracranial = result.volume.hu, result.intracranial
        defacing.update(replaced_voxels=int(result.replaced.sum()),
                        seconds=round(result.seconds, 3), **result.info)

    if intracranial is None:  # mosmed and off modes: the models still see only the cavity
        try:
            intracranial = intracranial_mask(volume)
        except CavityNotFound as exc:
            raise StepError(f"not analysable: {exc}") from exc

    n_copied = _write_copy(ctx.job_dir, paths, hu, deidentifier)

    pseudo_id = pseudo.work_id(study_uid, series_uid)
    work = ctx.work_item_dir(pseudo_id)
    meta = safe_meta(volume.meta)
    item = {
        "pseudo_id": pseudo_id,
        "study_uid": pseudo.uid(study_uid),
        "series_uid": pseudo.uid(series_uid),
        "slice_uids": [pseudo.uid(u) for u in originals],  # k order
        "shape": list(hu.shape),
        "spacing_mm": list(volume.spacing),
        "affine": volume.affine.tolist(),
        "meta": meta,
        "defacing": defacing,
    }
    _write_work_item(work, Volume(hu=hu, affine=volume.affine, meta=meta), intracranial, item)

    rows = [("uid", o, p) for o, p in deidentifier.uid_map.items()]
    rows += [("uid", u, pseudo.uid(u)) for u in [study_uid, series_uid, *originals]]
    rows.append(("work_item", series_uid, pseudo_id))
    if patient_id:
        rows.append(("patient_id", patient_id, pseudo.patient_id(patient_id)))
    pseudonyms.record(ctx.index, study_uid, rows)
    log.info("de-identified and defaced", extra={
        "job_id": ctx.job_id, "study": uid_ref(study_uid), "mode": mode, "slices": len(originals),
        "copied": n_copied, "replaced_voxels": defacing.get("replaced_voxels")})
    return {"work_item": str(work), "pseudo_id": pseudo_id}
