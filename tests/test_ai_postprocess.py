"""The hematoma false-positive rule (models/ich/postprocess.py): gate, size, mean HU, tuning."""

from __future__ import annotations

import numpy as np

from models.ich import postprocess


def _two_blobs() -> tuple[np.ndarray, np.ndarray]:
    """A 27-voxel blob of blood (60 HU) and a 2-voxel blob of bone-like partial volume (400 HU)."""
    mask = np.zeros((6, 10, 10), bool)
    hu = np.full(mask.shape, 30.0, np.float32)
    mask[1:4, 1:4, 1:4] = True
    hu[1:4, 1:4, 1:4] = 60.0
    mask[5, 8, 8:10] = True
    hu[5, 8, 8:10] = 400.0
    return mask, hu


def test_default_rule_keeps_everything_above_the_speck_size():
    mask, hu = _two_blobs()
    out = postprocess.apply_rule(mask, hu, 0.1, 0.0, postprocess.rule_of({}))
    np.testing.assert_array_equal(out, mask)


def test_rule_drops_small_or_non_blood_components_and_gates_on_triage():
    mask, hu = _two_blobs()
    rule = postprocess.rule_of({"postprocess": {"min_component_ml": 0.5, "gate_any": 0.3}})
    out = postprocess.apply_rule(mask, hu, 0.1, 0.9, rule)
    assert out.sum() == 27 and not out[5].any()
    assert not postprocess.apply_rule(mask, hu, 0.1, 0.1, rule).any()  # triage says no bleed
    by_hu = postprocess.rule_of({"postprocess": {"hu_range": [20, 120]}})
    assert postprocess.apply_rule(mask, hu, 0.1, 0.9, by_hu).sum() == 27


def test_tuning_removes_validation_false_positives_without_losing_the_bleed():
    rows = [
        {"any": 0.95, "true_voxels": 100, "voxel_ml": 0.01,
         "components": [{"ml": 0.9, "mean_hu": 60.0, "voxels": 90, "tp_voxels": 85},
                        {"ml": 0.6, "mean_hu": 300.0, "voxels": 60, "tp_voxels": 0}]},
        {"any": 0.05, "true_voxels": 0, "voxel_ml": 0.01,
         "components": [{"ml": 0.8, "mean_hu": 45.0, "voxels": 80, "tp_voxels": 0}]},
    ]
    assert postprocess.score(rows, postprocess.DEFAULT_RULE)["fp_over_0_5ml"] == 1
    rule, s = postprocess.tune(rows)
    assert s["fp_over_0_5ml"] == 0
    assert s["dice"] > postprocess.score(rows, postprocess.DEFAULT_RULE)["dice"]
    assert postprocess.keep_component(rows[0]["components"][0], 0.95, rule)
