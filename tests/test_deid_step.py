"""The deid step: what a gpu worker receives carries no identity; the copy is defaced and clean."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pydicom
import pytest

from deid_helpers import box_head, write_series
from models.preprocess.series import load_series
from models.volume import Volume
from node.config import Settings
from node.index import open_index
from workers.context import StepContext, StepError
from workers.deid.pseudonyms import originals_for, pseudonyms_for_study
from workers.steps import deid as deid_step


def prepare_job(tmp_path, hu, affine, identity=None):
    """What the prepare step leaves in the job folder (volume.npz, series.json)."""
    identity, paths = write_series(hu, affine, tmp_path / "spool", identity)
    volume = load_series(paths)
    settings = Settings(storage={"root": tmp_path / "var"})
    index = open_index(settings)
    ctx = StepContext(settings=settings, index=index, job_id=7)
    by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in paths}
    volume.save(ctx.job_dir / "volume.npz")
    info = {"study_uid": identity.study_uid, "series_uid": identity.series_uid,
            "slices": [{"sop_instance_uid": u, "path": str(by_uid[u])}
                       for u in volume.sop_instance_uids]}
    (ctx.job_dir / "series.json").write_text(json.dumps(info))
    return ctx, identity, volume


def _texts_of(path):
    """Every byte a reader of ``path`` could see, decompressed (npz members included)."""
    if path.suffix == ".npz":
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                yield name.encode()
                yield zf.read(name)
        with np.load(path) as data:
            for name in data.files:
                yield np.asarray(data[name]).tobytes()
    else:
        yield path.name.encode()
        yield path.read_bytes()


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("job")
    hu, affine = box_head((24, 80, 80))
    ctx, identity, volume = prepare_job(tmp, hu, affine)
    out = deid_step.run(ctx, {"job_dir": str(ctx.job_dir)})
    yield ctx, identity, volume, out
    ctx.index.dispose()


def test_gpu_inputs_carry_no_identity(done):
    ctx, identity, volume, out = done
    work = ctx.settings.storage.work_dir / out["pseudo_id"]
    assert out["work_item"] == str(work) and work.is_dir()
    needles = identity.strings() + list(volume.sop_instance_uids) + ["1953-04-17"]
    needles += [identity.patient_id.split("-")[1]]
    haystacks = [json.dumps(out).encode(), str(work).encode()]
    files = sorted(p for p in work.rglob("*") if p.is_file())
    assert {p.name for p in files} == {"volume.npz", "intracranial.npz", "item.json"}
    for path in files:
        haystacks.extend(_texts_of(path))
    for needle in needles:
        for hay in haystacks:
            assert needle.encode() not in hay, f"{needle!r} reached the gpu worker"
            # numpy may store text as UTF-32 (dtype '<U'): look for that form as well
            assert needle.encode("utf-32-le") not in hay, f"{needle!r} (utf-32) leaked"


def test_work_item_content(done):
    ctx, identity, volume, out = done
    work = ctx.settings.storage.work_dir / out["pseudo_id"]
    item = json.loads((work / "item.json").read_text())
    defaced = Volume.load(work / "volume.npz")
    assert defaced.hu.shape == volume.hu.shape and np.allclose(defaced.affine, volume.affine)
    assert len(item["slice_uids"]) == volume.hu.shape[0]
    assert all(u.startswith("2.25.") for u in item["slice_uids"] + [item["study_uid"]])
    assert item["defacing"]["mode"] == "ichnode" and item["defacing"]["replaced_voxels"] > 0
    assert defaced.meta["kernel"] == "H31s" and "image_orientation" in defaced.meta
    changed = defaced.hu != volume.hu
    assert changed.any() and item["defacing"]["replaced_voxels"] >= changed.sum()


def test_defaced_copy_is_deidentified_and_matches_work_item(done):
    ctx, identity, volume, out = done
    work = ctx.settings.storage.work_dir / out["pseudo_id"]
    item = json.loads((work / "item.json").read_text())
    defaced = Volume.load(work / "volume.npz")
    files = sorted((ctx.job_dir / "defaced").glob("*.dcm"))
    assert len(files) == volume.hu.shape[0]
    for k, path in enumerate(files):
        raw = path.read_bytes()
        for needle in identity.strings() + [volume.sop_instance_uids[k]]:
            assert needle.encode() not in raw
        ds = pydicom.dcmread(path)
        assert ds.SOPInstanceUID == item["slice_uids"][k]
        assert ds.StudyInstanceUID == item["study_uid"]
        assert ds.PatientIdentityRemoved == "YES"
        assert "113102" in [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.array_equal(hu, defaced.hu[k])


def test_mapping_recorded_and_relinks(done):
    ctx, identity, volume, out = done
    rows = pseudonyms_for_study(ctx.index, identity.study_uid)
    kinds = {r["kind"] for r in rows}
    assert {"uid", "patient_id", "work_item"} <= kinds
    back = originals_for(ctx.index, out["pseudo_id"])
    assert back[0]["original"] == identity.series_uid
    item = json.loads((ctx.settings.storage.work_dir / out["pseudo_id"] / "item.json").read_text())
    first = originals_for(ctx.index, item["slice_uids"][0])
    assert first[0]["original"] == volume.sop_instance_uids[0]
    # A re-run is idempotent: same pseudonyms, no duplicate rows.
    again = deid_step.run(ctx, {})
    assert again == out
    assert len(pseudonyms_for_study(ctx.index, identity.study_uid)) == len(rows)


def test_no_skull_is_refused(tmp_path):
    hu = np.full((16, 48, 48), -1000, dtype=np.int16)
    hu[:, 10:38, 10:38] = 30  # soft tissue, no bone: not a head
    affine = np.diag([4.0, 4.0, 5.0, 1.0])
    ctx, _identity, _volume = prepare_job(tmp_path, hu, affine)
    try:
        with pytest.raises(StepError, match="no cranial cavity"):
            deid_step.run(ctx, {})
        work_dir = ctx.settings.storage.work_dir
        assert not work_dir.exists() or not any(work_dir.iterdir())  # no work item made
    finally:
        ctx.index.dispose()


def test_phantom_series_through_the_step(tmp_path):
    """A phantom head written as DICOM by its own writer: defaced, no identity in the item."""
    from models.phantom import PhantomSpec, generate_study, write_dicom_series

    study = generate_study(PhantomSpec(seed=8, matrix=128, slice_thickness_mm=5.0, yaw_deg=25.0,
                                       subtypes=("intraparenchymal",)))
    paths = write_dicom_series(study, tmp_path / "spool", patient_name="Rivera^Maria",
                               patient_id="PID-44120", accession="ACC-77881")
    first = pydicom.dcmread(paths[0])
    needles = ["Rivera", "Maria", "PID-44120", "ACC-77881", str(first.PatientBirthDate),
               str(first.StudyInstanceUID), str(first.SeriesInstanceUID),
               str(first.FrameOfReferenceUID)]
    volume = load_series(paths)
    needles += list(volume.sop_instance_uids)
    settings = Settings(storage={"root": tmp_path / "var"})
    index = open_index(settings)
    try:
        ctx = StepContext(settings=settings, index=index, job_id=1)
        by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in paths}
        volume.save(ctx.job_dir / "volume.npz")
        (ctx.job_dir / "series.json").write_text(json.dumps({
            "study_uid": str(first.StudyInstanceUID), "series_uid": str(first.SeriesInstanceUID),
            "slices": [{"sop_instance_uid": u, "path": str(by_uid[u])}
                       for u in volume.sop_instance_uids]}))
        out = deid_step.run(ctx, {})
        work = ctx.settings.storage.work_dir / out["pseudo_id"]
        hay = [json.dumps(out).encode()]
        for path in work.rglob("*"):
            hay.extend(_texts_of(path))
        for needle in needles:
            assert not any(needle.encode() in h or needle.encode("utf-32-le") in h
                           for h in hay), needle
        defaced = Volume.load(work / "volume.npz")
        changed = defaced.hu != volume.hu  # vs. what the step read (DICOM-encoded HU)
        assert not (changed & study.masks["brain"]).any()
        face = study.masks["face"]
        assert (changed & face).sum() > 0.7 * face.sum()
    finally:
        index.dispose()
