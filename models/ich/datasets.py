"""Readers for public head-CT hemorrhage datasets, yielding model-grid :class:`Case` objects.

* ``rsna``      RSNA 2019 Intracranial Hemorrhage Detection: one DICOM file per slice named
  ``ID_<image>.dcm`` anywhere under the folder, and a label CSV (``ID,Label`` with IDs
  ``ID_<image>_<subtype>``). Slices are grouped by SeriesInstanceUID and read with
  :func:`load_series`; labels per slice, no masks.
* ``physionet`` PhysioNet CT-ICH 1.3.0: ``ct_scans/NNN.nii``, ``masks/NNN.nii`` (hemorrhage mask)
  and ``hemorrhage_diagnosis_raw_ct.csv`` (PatientNumber, SliceNumber, one column per subtype,
  No_Hemorrhage). Hematoma mask only (ventricles are not annotated).
* ``hichit``    HICH-IT images: ``images/<case>.nii[.gz]`` and ``labels/<case>.nii[.gz]`` with
  label values 1 hematoma, 2 brain midline, 3 left ventricle, 4 right ventricle (override with
  HICHIT_LABELS). Hypertensive hemorrhage: the hematoma counts as intraparenchymal.

NIfTI affines are RAS; they are turned into the LPS (i, j, k) affine of :class:`Volume`.
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import numpy as np

from models.ich.data import Case, case_from_volume
from models.preprocess.series import SeriesError, load_series
from models.results import LABELS, SUBTYPES
from models.volume import Volume

log = logging.getLogger(__name__)

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
HICHIT_LABELS = {"hematoma": 1, "midline": 2, "ventricle_left": 3, "ventricle_right": 4}
PHYSIONET_COLUMNS = {"epidural": "Epidural", "subdural": "Subdural", "subarachnoid": "Subarachnoid",
                     "intraparenchymal": "Intraparenchymal", "intraventricular": "Intraventricular"}


def read_dataset(kind: str, root: Path, frame_args: dict) -> Iterator[Case]:
    readers = {"rsna": read_rsna, "physionet": read_physionet, "hichit": read_hichit}
    if kind not in readers:
        raise ValueError(f"unknown dataset format {kind!r}; choose from {', '.join(readers)}")
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    return readers[kind](root, frame_args)


def nifti_volume(path: Path) -> tuple[Volume, np.ndarray]:
    """A NIfTI image as Volume ((k, j, i) array, LPS affine) and its raw (i, j, k) data."""
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    if data.ndim != 3:
        raise ValueError(f"{path.name}: expected a 3D image, got {data.ndim}D")
    affine = RAS_TO_LPS @ img.affine
    return Volume(hu=np.transpose(data, (2, 1, 0)).astype(np.float32), affine=affine), data


# ----- RSNA 2019 ------------------------------------------------------------------------------
def _rsna_labels(root: Path) -> dict[str, np.ndarray]:
    labels: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(len(LABELS), np.float32))
    csvs = sorted(root.glob("*.csv"))
    if not csvs:
        raise FileNotFoundError(f"{root}: no RSNA label CSV (ID,Label)")
    for path in csvs:
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                image, _, subtype = row["ID"].rpartition("_")
                if subtype in LABELS:
                    labels[image][LABELS.index(subtype)] = float(row["Label"])
    return dict(labels)


def read_rsna(root: Path, frame_args: dict) -> Iterator[Case]:
    import pydicom

    labels = _rsna_labels(root)
    series: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(root.rglob("ID_*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        series[str(ds.SeriesInstanceUID)].append(path)
    for uid, paths in series.items():
        by_sop = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p.stem
                  for p in paths}
        try:
            volume = load_series(paths)
        except SeriesError as exc:
            log.warning("RSNA series skipped: %s", exc)
            continue
        per_slice = np.stack([labels.get(by_sop[sop], np.zeros(len(LABELS), np.float32))
                              for sop in volume.sop_instance_uids])
        key = "rsna-" + by_sop[volume.sop_instance_uids[0]]
        yield case_from_volume(key, volume, frame_args, slice_labels=per_slice)


# ----- PhysioNet CT-ICH -----------------------------------------------------------------------
def read_physionet(root: Path, frame_args: dict) -> Iterator[Case]:
    table: dict[int, dict[int, np.ndarray]] = defaultdict(dict)
    with open(root / "hemorrhage_diagnosis_raw_ct.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            flags = [float(row[PHYSIONET_COLUMNS[s]]) for s in SUBTYPES]
            table[int(row["PatientNumber"])][int(row["SliceNumber"])] = np.array(
                flags + [float(max(flags))], np.float32)
    for scan in sorted((root / "ct_scans").glob("*.nii*")):
        number = int(scan.name.split(".")[0])
        volume, _ = nifti_volume(scan)
        mask_path = root / "masks" / scan.name
        masks = None
        if mask_path.exists():
            mask_volume, _ = nifti_volume(mask_path)
            masks = {"hematoma": mask_volume.hu > 0}
        rows = table.get(number, {})
        per_slice = np.stack([rows.get(k + 1, np.zeros(len(LABELS), np.float32))
                              for k in range(volume.hu.shape[0])])
        case = case_from_volume(f"physionet-{number:03d}", volume, frame_args, masks=masks,
                                slice_labels=per_slice,
                                truth={"partial_labels": ["hematoma"]})
        yield case


# ----- HICH-IT --------------------------------------------------------------------------------
def read_hichit(root: Path, frame_args: dict, label_values: dict | None = None) -> Iterator[Case]:
    values = label_values or HICHIT_LABELS
    for image in sorted((root / "images").glob("*.nii*")):
        label_path = root / "labels" / image.name
        if not label_path.exists():
            log.warning("HICH-IT case without labels skipped")
            continue
        volume, _ = nifti_volume(image)
        label_volume, _ = nifti_volume(label_path)
        lab = np.rint(label_volume.hu).astype(np.int16)
        masks = {name: lab == values[name] for name in ("hematoma", "ventricle_left", "ventricle_right")}
        subtype_masks = {"intraparenchymal": masks["hematoma"]}
        key = "hichit-" + image.name.split(".")[0]
        yield case_from_volume(key, volume, frame_args, masks=masks, subtype_masks=subtype_masks)
