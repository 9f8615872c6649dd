"""``ichnode phantom`` through the real CLI entry point."""

from __future__ import annotations

import json

import numpy as np
import pydicom
from PIL import Image
from typer.testing import CliRunner

from node.cli.main import app


def test_phantom_command_writes_series_labels_and_preview(tmp_path):
    out = tmp_path / "ph"
    result = CliRunner().invoke(app, ["phantom", "--out", str(out), "--subtype", "sdh,ivh",
                                      "--seed", "7", "--count", "2", "--matrix", "128",
                                      "--thickness", "5", "--preview", "--bone", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["seed"] for r in rows] == [7, 8]
    for row in rows:
        folder = out / f"phantom_{row['seed']:06d}"
        assert row["subtypes"] == "subdural,intraventricular" and row["hematoma_ml"] > 0
        soft = sorted((folder / "series_soft").glob("*.dcm"))
        assert len(soft) == row["slices"] == len(list((folder / "series_bone").glob("*.dcm")))
        assert pydicom.dcmread(soft[0]).Rows == 128
        truth = json.loads((folder / "labels" / "truth.json").read_text())
        assert truth["study_labels"]["subdural"] and not truth["study_labels"]["epidural"]
        png = Image.open(folder / "preview.png")
        assert png.size[0] >= 600 and np.asarray(png).std() > 20


def test_phantom_random_and_normal_subtypes(tmp_path):
    result = CliRunner().invoke(app, ["phantom", "--out", str(tmp_path), "--subtype", "normal",
                                      "--matrix", "128", "--thickness", "5", "--no-dicom",
                                      "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)[0]
    assert row["subtypes"] == "normal" and row["hematoma_ml"] == 0
    assert (tmp_path / "phantom_000001" / "volume.npz").exists()


def test_phantom_bad_arguments_fail_cleanly(tmp_path):
    r = CliRunner().invoke(app, ["phantom", "--out", str(tmp_path), "--subtype", "chronic"])
    assert r.exit_code == 1 and "unknown subtype" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["phantom", "--out", str(tmp_path), "--thickness", "40"])
    assert r.exit_code == 1 and "thickness" in r.output
