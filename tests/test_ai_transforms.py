"""Model-frame transforms: canonical orientation, resampling, windows, mapping masks back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ai_helpers import centred_affine, sample
from models.preprocess.series import SeriesError
from models.preprocess.transforms import (ModelFrame, model_input, neighbour_offset, stack_25d,
                                          window_channels)
from models.volume import Volume

SHAPE = (20, 64, 64)


def _volume(row_dir, col_dir, step=(0, 0, 5.0), shape=SHAPE, pixel=3.0):
    affine = centred_affine(shape, row_dir, col_dir, (pixel, pixel), step)
    return Volume(hu=sample(shape, affine), affine=affine)


@pytest.mark.parametrize("row_dir,col_dir,step", [
    ([0, 1, 0], [-1, 0, 0], (0, 0, 5.0)),    # stored rotated 90 degrees
    ([-1, 0, 0], [0, 1, 0], (0, 0, 5.0)),    # mirrored columns
    ([0, -1, 0], [1, 0, 0], (0, 0, -5.0)),   # rotated the other way, slices head-first
])
def test_rotated_or_mirrored_storage_reads_the_same(row_dir, col_dir, step):
    straight = _volume([1, 0, 0], [0, 1, 0])
    odd = _volume(row_dir, col_dir, step)
    assert not np.array_equal(straight.hu, odd.hu)
    a = ModelFrame.fit(straight).to_model(straight.hu)
    b = ModelFrame.fit(odd).to_model(odd.hu)
    # The same anatomy lands on the same model pixels (the sampling grids differ by a voxel).
    for select in (lambda x: np.abs(x - 70) < 5, lambda x: x > -300, lambda x: x > 600):
        np.testing.assert_allclose(np.argwhere(select(a)).mean(0), np.argwhere(select(b)).mean(0),
                                   atol=2.0)


def test_model_grid_has_anterior_up_and_patient_left_on_the_right():
    vol = _volume([0, 1, 0], [-1, 0, 0])
    hu = ModelFrame.fit(vol, spacing_mm=2.0, size=128).to_model(vol.hu)
    k, r, c = np.nonzero(np.abs(hu - 70) < 5)  # the left frontal bleed of the analytic head
    assert r.mean() < 64 - 10  # anterior = top rows
    assert c.mean() > 64 + 10  # patient left = right side of the image (radiological view)


def test_masks_map_back_onto_the_original_grid():
    vol = _volume([0, 1, 0], [-1, 0, 0], shape=(20, 128, 128), pixel=1.5)
    truth = (np.abs(vol.hu - 70) < 1).astype(np.uint8)
    frame = ModelFrame.fit(vol, spacing_mm=2.0, size=128)
    model = torch.from_numpy(frame.labels_to_model(truth)).float()
    back = frame.probabilities_to_original(torch.stack([1 - model, model]))
    assert back.shape == vol.hu.shape
    dice = 2 * (back & truth).sum() / (back.sum() + truth.sum())
    assert dice > 0.9


def test_slice_values_follow_the_original_k_order():
    up = _volume([1, 0, 0], [0, 1, 0], (0, 0, 5.0))
    down = Volume(hu=up.hu[::-1].copy(), affine=up.affine.copy())
    down.affine[:3, 3] = up.affine[:3, 3] + (SHAPE[0] - 1) * up.affine[:3, 2]
    down.affine[:3, 2] *= -1
    f_up, f_down = ModelFrame.fit(up), ModelFrame.fit(down)
    np.testing.assert_allclose(f_up.to_model(up.hu), f_down.to_model(down.hu))
    values = np.arange(SHAPE[0], dtype=float)  # canonical order = inferior -> superior
    assert list(f_down.slice_values_to_original(values)) == list(values[::-1])
    assert list(f_up.slice_values_to_original(values)) == list(values)


def test_sagittal_series_is_refused():
    vol = _volume([0, 1, 0], [0, 0, -1], step=(5.0, 0, 0))
    with pytest.raises(SeriesError, match="not an axial"):
        ModelFrame.fit(vol)


def test_windows_and_25d_stack():
    hu = torch.tensor([[[40.0, -1000.0], [80.0, 2000.0]]])  # (K=1, 2, 2)
    ch = window_channels(hu)
    assert ch.shape == (1, 3, 2, 2)
    assert ch[0, 0, 0, 0] == pytest.approx(0.5)  # brain window centre
    assert ch[0, 1, 1, 0] == pytest.approx(0.5)  # subdural window centre
    assert ch[0, :, 0, 1].max() == 0 and ch[0, 2, 1, 1] == pytest.approx(
        (2000 - (600 - 1400)) / 2800)
    stack = stack_25d(torch.arange(4.0).view(4, 1, 1, 1), offset=1)
    assert stack[:, :, 0, 0].tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]
    assert neighbour_offset(5.0) == 1 and neighbour_offset(1.25) == 4
    assert model_input(np.zeros((6, 32, 32)), 2.5).shape == (6, 9, 32, 32)
