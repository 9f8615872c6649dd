"""Defacing must not change what the models see in the brain: results on the defaced volume
equal those on the original within tolerance (issue 5).

The models are given only the cranial cavity (models.preprocess.cavity), with dense bone shown
as one value; the defacer writes inside it only dense bone, as that value. In the pipeline the
deid step finds that mask on the original voxels and hands it to the gpu step with the defaced
volume: results must then be identical. A defaced volume analysed on its own (e.g. an exported
research copy) finds the mask again on defaced voxels: results must agree within tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest

from models.ich.inference import analyze_volume
from models.phantom import PhantomSpec, generate_study
from models.preprocess.cavity import keep_intracranial
from workers.deid.deface import deface


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


@pytest.fixture(scope="module", params=[(41, ("subdural",)), (42, ("intraparenchymal",))],
                ids=["subdural", "intraparenchymal"])
def pair(request):
    seed, subtypes = request.param
    volume = generate_study(PhantomSpec(seed=seed, subtypes=subtypes, slice_thickness_mm=5.0,
                                        matrix=256)).volume
    result = deface(volume, "ichnode")
    assert not np.array_equal(result.volume.hu, volume.hu)  # the face really changed
    return volume, result


@pytest.mark.slow
def test_pipeline_path_gives_identical_results(pair):
    volume, defaced = pair
    mask = defaced.intracranial
    # Defacing wrote inside the models' mask only dense bone, as the value they see it as.
    assert np.array_equal(keep_intracranial(defaced.volume.hu, mask),
                          keep_intracranial(volume.hu, mask))
    original, masks_o = analyze_volume(volume, intracranial=mask)
    after, masks_d = analyze_volume(defaced.volume, intracranial=mask)
    for label, finding in original.findings.items():
        assert after.findings[label].probability == pytest.approx(finding.probability, abs=1e-6)
        np.testing.assert_allclose(after.findings[label].slice_probabilities,
                                   finding.slice_probabilities, atol=1e-6)
    for name in ("hematoma", "ventricle_left", "ventricle_right"):
        np.testing.assert_array_equal(masks_o[name], masks_d[name])
    assert after.midline_shift_mm == original.midline_shift_mm


@pytest.mark.slow
def test_defaced_volume_on_its_own_agrees_within_tolerance(pair):
    volume, defaced = pair
    original, masks_o = analyze_volume(volume)
    after, masks_d = analyze_volume(defaced.volume)
    for label, finding in original.findings.items():
        assert after.findings[label].probability == pytest.approx(finding.probability, abs=0.05)
    vol_o, vol_d = original.hematoma_volume_ml or 0.0, after.hematoma_volume_ml or 0.0
    assert abs(vol_o - vol_d) <= max(0.5, 0.05 * vol_o)
    if original.midline_shift_mm is not None:
        assert after.midline_shift_mm == pytest.approx(original.midline_shift_mm, abs=0.5)
    assert _dice(masks_o["hematoma"], masks_d["hematoma"]) >= 0.95
    assert _dice(masks_o["ventricle_left"], masks_d["ventricle_left"]) >= 0.95
