"""load_series: DICOM series -> Volume with correct HU and geometry, and clear errors."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from models.preprocess.series import SeriesError, load_series
from ai_helpers import BLEED_CENTRE, centred_affine, sample, write_ct_series

SHAPE = (30, 64, 64)
AXIAL = ([1, 0, 0], [0, 1, 0])


def _series(tmp_path, row_dir=AXIAL[0], col_dir=AXIAL[1], step=(0, 0, 5.0), **kwargs):
    affine = centred_affine(SHAPE, row_dir, col_dir, (3.0, 3.0), step)
    hu = sample(SHAPE, affine)
    return write_ct_series(tmp_path / "s", hu, affine, **kwargs), hu, affine


def _bleed_centroid_lps(volume) -> np.ndarray:
    k, j, i = np.nonzero(np.abs(volume.hu.astype(float) - 70) < 1)
    ijk1 = np.stack([i, j, k, np.ones_like(i)]).astype(float)
    return (volume.affine @ ijk1)[:3].mean(axis=1)


def test_shuffled_instances_are_sorted_by_position(tmp_path):
    paths, hu, affine = _series(tmp_path, shuffle=True, seed=3)
    vol = load_series(paths)
    assert vol.hu.shape == SHAPE
    np.testing.assert_allclose(vol.affine, affine, atol=1e-3)
    np.testing.assert_allclose(vol.hu, np.rint(hu), atol=0.5)
    # sop_instance_uids follow k: each UID's IPP z increases with k.
    by_uid = {str(d.SOPInstanceUID): float(d.ImagePositionPatient[2])
              for d in (pydicom.dcmread(p, stop_before_pixels=True) for p in paths)}
    zs = [by_uid[u] for u in vol.sop_instance_uids]
    assert zs == sorted(zs) and len(set(zs)) == SHAPE[0]
    # Instance Numbers were shuffled, so sorting by them would have failed this.
    assert vol.meta["kernel"] == "H31s" and vol.meta["kvp"] == 120.0
    assert vol.meta["slice_thickness_mm"] == pytest.approx(5.0)
    assert vol.meta["tilt_deg"] == pytest.approx(0.0, abs=1e-3)
    assert vol.spacing == pytest.approx((5.0, 3.0, 3.0))
    assert "PatientName" not in str(vol.meta) and "TEST0001" not in str(vol.meta)


def test_gantry_tilt_stays_in_the_affine(tmp_path):
    tilt = np.radians(18.0)
    col_dir = [0, np.cos(tilt), np.sin(tilt)]
    paths, hu, affine = _series(tmp_path, col_dir=col_dir, step=(0, 0, 5.0), tilt_header=18.0)
    vol = load_series(paths)
    # No resampling: the same voxels as written; the k column is the table step, not the normal.
    np.testing.assert_allclose(vol.hu, np.rint(hu), atol=0.5)
    np.testing.assert_allclose(vol.affine[:3, 2], [0, 0, 5.0], atol=1e-3)
    assert vol.meta["tilt_deg"] == pytest.approx(18.0, abs=0.05)
    assert vol.meta["spacing_along_normal_mm"] == pytest.approx(5.0 * np.cos(tilt), abs=1e-3)
    np.testing.assert_allclose(_bleed_centroid_lps(vol), BLEED_CENTRE, atol=3.0)


def test_12bit_signed_quirk_is_detected_and_fixed(tmp_path):
    paths, hu, _ = _series(tmp_path, quirk12=True)
    assert pydicom.dcmread(paths[0]).RescaleIntercept == 0
    vol = load_series(paths)
    assert vol.meta["quirk_12bit_fixed"] is True
    np.testing.assert_allclose(vol.hu, np.clip(np.rint(hu), -1000, 3095), atol=0.5)
    assert vol.hu.min() == -1000  # air, not +3096


def test_correct_12bit_unsigned_series_is_left_alone(tmp_path):
    paths, hu, _ = _series(tmp_path)
    vol = load_series(paths)
    assert vol.meta["quirk_12bit_fixed"] is False
    assert vol.hu[0, 0, 0] == -1000


def test_head_stored_rotated_90_degrees_has_true_geometry(tmp_path):
    # Rows run posterior, columns run right: the image shows the head turned by 90 degrees.
    paths, hu, affine = _series(tmp_path, row_dir=[0, 1, 0], col_dir=[-1, 0, 0])
    vol = load_series(paths)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-3)
    np.testing.assert_allclose(_bleed_centroid_lps(vol), BLEED_CENTRE, atol=3.0)
    # In the stored array the bleed is NOT where an axial-upright reader would look for "left".
    straight = load_series(_series(tmp_path / "b")[0])
    assert not np.allclose(vol.hu, straight.hu)


def test_localizer_is_skipped(tmp_path):
    paths, _, _ = _series(tmp_path)
    scout = pydicom.dcmread(paths[0])
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    scout.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    scout.save_as(tmp_path / "scout.dcm")
    vol = load_series([*paths, tmp_path / "scout.dcm"])
    assert vol.hu.shape == SHAPE


def _edit(path, **attrs):
    ds = pydicom.dcmread(path)
    for key, value in attrs.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path)


def _sorted_paths(paths):
    return sorted(paths, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True)
                                             .ImagePositionPatient[2]))


def test_gap_in_slices_is_an_error(tmp_path):
    paths = _sorted_paths(_series(tmp_path)[0])
    with pytest.raises(SeriesError, match="inconsistent slice spacing"):
        load_series(paths[:10] + paths[11:])


def test_mixed_orientation_is_an_error(tmp_path):
    paths = _series(tmp_path)[0]
    _edit(paths[4], ImageOrientationPatient=[0, 1, 0, -1, 0, 0])
    with pytest.raises(SeriesError, match="mixed orientation"):
        load_series(paths)


def test_too_few_slices_is_an_error(tmp_path):
    paths = _series(tmp_path)[0]
    with pytest.raises(SeriesError, match="too few"):
        load_series(paths[:3])


def test_missing_geometry_is_an_error(tmp_path):
    paths = _series(tmp_path)[0]
    _edit(paths[2], ImagePositionPatient=None)
    with pytest.raises(SeriesError, match="missing geometry"):
        load_series(paths)


def test_duplicate_position_is_an_error(tmp_path):
    paths = _sorted_paths(_series(tmp_path)[0])
    first = pydicom.dcmread(paths[0])
    _edit(paths[1], ImagePositionPatient=list(first.ImagePositionPatient))
    with pytest.raises(SeriesError, match="duplicate"):
        load_series(paths)


def test_mixed_matrix_is_an_error(tmp_path):
    paths = _series(tmp_path)[0]
    ds = pydicom.dcmread(paths[5])
    ds.Rows, ds.Columns = 32, 32
    ds.PixelData = np.zeros((32, 32), np.uint16).tobytes()
    ds.save_as(paths[5])
    with pytest.raises(SeriesError, match="mixed matrix"):
        load_series(paths)


def test_series_error_is_a_value_error():
    assert issubclass(SeriesError, ValueError)
