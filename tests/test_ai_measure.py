"""Measurements: volumes, ABC/2, midline shift (also with a turned head), max-area slice."""

from __future__ import annotations

import numpy as np
import pytest

from ai_helpers import labelled_head
from models.ich import measure
from models.preprocess.transforms import ModelFrame


@pytest.mark.parametrize("septum_mm,yaw_deg", [(0.0, 0.0), (4.0, 0.0), (-7.0, 0.0), (6.0, 12.0)])
def test_midline_shift_from_skull_symmetry_and_septum(septum_mm, yaw_deg):
    vol, masks, _ = labelled_head(1, bleed=False, shape=(20, 128, 128), pixel_mm=1.5, step_mm=5.0,
                                  septum_mm=septum_mm, yaw_deg=yaw_deg)
    frame = ModelFrame.fit(vol)
    shift = measure.midline_shift_mm(frame.canonical(vol.hu),
                                     frame.canonical(masks["ventricle_left"]),
                                     frame.canonical(masks["ventricle_right"]), frame.native_spacing)
    assert shift == pytest.approx(abs(septum_mm), abs=1.0)


def test_no_ventricles_means_no_shift():
    vol, masks, _ = labelled_head(1, bleed=False)
    empty = np.zeros_like(masks["ventricle_left"])
    assert measure.midline_shift_mm(vol.hu, empty, empty, (8.0, 3.0, 3.0)) is None


def test_volume_and_abc2_of_a_sphere():
    spacing = (2.0, 0.5, 0.5)
    k, j, i = np.meshgrid(np.arange(30) * 2.0, np.arange(120) * 0.5, np.arange(120) * 0.5,
                          indexing="ij")
    r = 20.0
    sphere = (k - 30) ** 2 + (j - 30) ** 2 + (i - 30) ** 2 <= r ** 2
    voxel_ml = np.prod(spacing) / 1000
    true_ml = 4 / 3 * np.pi * r ** 3 / 1000
    assert measure.volume_ml(sphere, voxel_ml) == pytest.approx(true_ml, rel=0.03)
    # ABC/2 of a sphere is (2r)^3 / 2 = 4 r^3, about 5 % under the true 4.19 r^3.
    assert measure.abc2_ml(sphere, spacing) == pytest.approx(4 * r ** 3 / 1000, rel=0.1)
    assert measure.abc2_ml(np.zeros_like(sphere), spacing) is None


def test_max_area_slice_and_speck_removal():
    mask = np.zeros((5, 20, 20), bool)
    mask[1, 2:4, 2:4] = True
    mask[3, 5:15, 5:15] = True
    mask[4, 0, 0] = True  # a one-voxel speck
    assert measure.max_area_slice(mask) == 3
    cleaned = measure.remove_small_components(mask, min_voxels=3)
    assert not cleaned[4, 0, 0] and cleaned[3].sum() == 100 and cleaned[1].sum() == 4
    assert measure.max_area_slice(np.zeros_like(mask)) is None
