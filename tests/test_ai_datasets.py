"""Dataset readers on tiny fixtures written in the public formats (RSNA, PhysioNet, HICH-IT)."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pydicom
import pytest

from ai_helpers import labelled_head, write_ct_series
from models.ich.datasets import RAS_TO_LPS, read_dataset
from models.results import LABELS

FRAME = {"spacing_mm": 4.0, "size": 64}


def test_rsna_slices_get_their_labels_in_position_order(tmp_path):
    volume, masks, _ = labelled_head(3, bleed=True)
    paths = write_ct_series(tmp_path / "in", volume.hu, volume.affine, shuffle=True, seed=5)
    bleeding = masks["hematoma"].any(axis=(1, 2))
    rows = []
    for path in paths:  # RSNA names files ID_<image>.dcm; labels are keyed by that image ID
        ds = pydicom.dcmread(path)
        k = int(round((float(ds.ImagePositionPatient[2]) - volume.affine[2, 3]) / volume.affine[2, 2]))
        image = f"ID_{k:03d}{ds.SOPInstanceUID[-6:].replace('.', '')}"
        path.rename(tmp_path / "in" / f"{image}.dcm")
        for label in LABELS:
            flag = bleeding[k] and label in ("intraparenchymal", "any")
            rows.append({"ID": f"{image}_{label}", "Label": int(flag)})
    with open(tmp_path / "in" / "stage_2_train.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["ID", "Label"])
        writer.writeheader()
        writer.writerows(rows)
    (case,) = list(read_dataset("rsna", tmp_path / "in", FRAME))
    assert case.hu.shape == (volume.hu.shape[0], 64, 64)
    assert case.slice_labels[:, LABELS.index("any")].tolist() == bleeding.astype(float).tolist()
    assert case.study_labels.tolist() == [0, 0, 0, 1, 0, 1]
    assert case.seg is None


def _write_nifti(path, array_kji, lps_affine):
    img = nib.Nifti1Image(np.transpose(array_kji, (2, 1, 0)), RAS_TO_LPS @ lps_affine)
    nib.save(img, str(path))


def test_physionet_nifti_masks_and_slice_csv(tmp_path):
    volume, masks, _ = labelled_head(5, bleed=True)
    (tmp_path / "ct_scans").mkdir()
    (tmp_path / "masks").mkdir()
    _write_nifti(tmp_path / "ct_scans" / "049.nii", volume.hu.astype(np.int16), volume.affine)
    _write_nifti(tmp_path / "masks" / "049.nii", masks["hematoma"].astype(np.uint8) * 255,
                 volume.affine)
    bleeding = masks["hematoma"].any(axis=(1, 2))
    with open(tmp_path / "hemorrhage_diagnosis_raw_ct.csv", "w", newline="") as fh:
        fields = ["PatientNumber", "SliceNumber", "Intraventricular", "Intraparenchymal",
                  "Subarachnoid", "Epidural", "Subdural", "No_Hemorrhage", "Fracture_Yes_No"]
        writer = csv.DictWriter(fh, fields)
        writer.writeheader()
        for k, flag in enumerate(bleeding):
            writer.writerow({"PatientNumber": 49, "SliceNumber": k + 1, "Intraventricular": 0,
                             "Intraparenchymal": int(flag), "Subarachnoid": 0, "Epidural": 0,
                             "Subdural": 0, "No_Hemorrhage": int(not flag), "Fracture_Yes_No": 0})
    (case,) = list(read_dataset("physionet", tmp_path, FRAME))
    assert case.key == "physionet-049"
    assert case.slice_labels[:, LABELS.index("intraparenchymal")].sum() == bleeding.sum()
    # The RAS->LPS conversion keeps the hematoma where the HU volume has it.
    blood = (case.hu > 50) & (case.hu < 90)
    assert (case.seg == 1).sum() > 0
    hem = case.seg == 1
    assert (hem & blood).sum() / hem.sum() > 0.6  # edges blur at 4 mm; a mirror would give ~0
    assert (hem[:, :, ::-1] & blood).sum() / hem.sum() < 0.2


def test_hichit_labels_give_hematoma_and_ventricles(tmp_path):
    volume, masks, _ = labelled_head(7, bleed=True)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    lab = np.zeros(volume.hu.shape, np.uint8)
    lab[masks["ventricle_left"]] = 3
    lab[masks["ventricle_right"]] = 4
    lab[masks["hematoma"]] = 1
    _write_nifti(tmp_path / "images" / "case01.nii.gz", volume.hu.astype(np.int16), volume.affine)
    _write_nifti(tmp_path / "labels" / "case01.nii.gz", lab, volume.affine)
    (case,) = list(read_dataset("hichit", tmp_path, FRAME))
    assert set(np.unique(case.seg)) == {0, 1, 2, 3}
    # Left ventricle (label 2) is on the image's right half in the radiological model view.
    cols = np.nonzero(case.seg == 2)[2]
    assert cols.mean() > 32
    assert case.study_labels[LABELS.index("intraparenchymal")] == 1


def test_unknown_format_and_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset format"):
        read_dataset("kaggle", tmp_path, FRAME)
    with pytest.raises(FileNotFoundError):
        read_dataset("rsna", tmp_path / "nope", FRAME)
