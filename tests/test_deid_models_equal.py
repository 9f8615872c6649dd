"""Defacing must not change what the models see in the brain: results on the defaced volume
equal those on the original within tolerance (issue 5)."""

from __future__ import annotations

import numpy as np
import pytest

from models.ich.inference import analyze_volume
from models.phantom import PhantomSpec, generate_study
from workers.deid.deface import deface


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "known defect: the demo triage model also reads tissue outside the cranial cavity (face-level "
    "slices), so defacing moves its probabilities by up to ~0.2; fix = mask the model input to the "
    "cranial cavity and retrain. strict: this test fails loudly once the models are invariant."))
@pytest.mark.parametrize("seed,subtypes", [(41, ("subdural",)), (42, ("intraparenchymal",))])
def test_models_agree_on_original_and_defaced(seed, subtypes):
    volume = generate_study(PhantomSpec(seed=seed, subtypes=subtypes, slice_thickness_mm=5.0,
                                        matrix=256)).volume
    defaced = deface(volume, "ichnode").volume
    assert not np.array_equal(defaced.hu, volume.hu)  # the face really changed
    original, masks_o = analyze_volume(volume)
    after, masks_d = analyze_volume(defaced)
    for label, finding in original.findings.items():
        assert after.findings[label].probability == pytest.approx(finding.probability, abs=0.05)
    vol_o, vol_d = original.hematoma_volume_ml or 0.0, after.hematoma_volume_ml or 0.0
    assert abs(vol_o - vol_d) <= max(0.5, 0.05 * vol_o)
    if original.midline_shift_mm is not None:
        assert after.midline_shift_mm == pytest.approx(original.midline_shift_mm, abs=0.5)
    assert _dice(masks_o["hematoma"], masks_d["hematoma"]) >= 0.95
