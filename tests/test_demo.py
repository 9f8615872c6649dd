"""README's first command: `ichnode demo` runs the whole product and exits 0 only when every
study was analysed and its SEG/SR/overlay arrived at the (local) PACS."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydicom import dcmread


@pytest.mark.slow
def test_demo_delivers_results_for_every_study(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "node.cli.main", "demo", "--out", str(out),
                           "--timeout", "420"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "results at the PACS" in proc.stdout
    received = [dcmread(p, stop_before_pixels=True) for p in (out / "pacs").glob("*.dcm")]
    by_study: dict[str, set[str]] = {}
    for ds in received:
        by_study.setdefault(str(ds.StudyInstanceUID), set()).add(str(ds.Modality))
    assert len(by_study) == 4  # normal, subdural, IPH+IVH, epidural
    for modalities in by_study.values():
        assert {"SR", "OT"} <= modalities  # report + overlay for each (SEG when something found)
    assert all(any((out / "previews" / name).glob("*.png"))
               for name in ("normal", "subdural", "epidural"))
    log = (out / "node.log").read_text()
    for phi in ("DEMO^", "DEMO000", "ACC0000"):  # patient name, ID, accession
        assert phi not in log


def test_demo_table_shows_p_any_beside_its_threshold():
    from node.demo import _finding_text

    results = {"status": "ok", "hematoma_volume_ml": 0.0, "midline_shift_mm": 3.31,
               "findings": {"any": {"probability": 0.783, "threshold": 0.9516, "present": False},
                            "subdural": {"probability": 0.2, "threshold": 0.04, "present": False}}}
    assert _finding_text(results) == ("no hemorrhage", "0.78 / 0.95", "0.0", "3.3")
    results["findings"]["subdural"]["present"] = True
    assert _finding_text(results)[0] == "subdural 0.20"
    assert _finding_text(None) == ("no result", "", "", "")
