"""``ichnode deface`` and ``ichnode deid ...`` through the real CLI entry point."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from PIL import Image
from typer.testing import CliRunner

from deid_helpers import box_head, write_series
from node.cli.main import app


@pytest.fixture()
def env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ICHNODE_STORAGE__ROOT", str(tmp_path / "var"))
    return tmp_path


def test_deface_writes_copy_and_preview(env):
    hu, affine = box_head((20, 64, 64))
    identity, _ = write_series(hu, affine, env / "in")
    result = CliRunner().invoke(app, ["deface", str(env / "in"), str(env / "out"), "--preview",
                                      "--mode", "mosmed", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["slices"] == 20 and summary["replaced_voxels"] > 0
    files = sorted((env / "out").glob("*.dcm"))
    assert len(files) == 20
    for path in files:
        assert identity.patient_name.encode() not in path.read_bytes()
    ds = pydicom.dcmread(files[0])
    assert ds.PatientIdentityRemoved == "YES"
    png = Image.open(summary["preview"])
    assert png.size[0] > 200 and np.asarray(png).std() > 10  # an image, not a blank


def test_deface_errors_are_one_line(env):
    runner = CliRunner()
    missing = runner.invoke(app, ["deface", str(env / "nope"), str(env / "out")])
    assert missing.exit_code == 1 and "not a folder" in missing.output
    assert "Traceback" not in missing.output
    (env / "in").mkdir()
    (env / "in" / "x.txt").write_text("not dicom")
    empty = runner.invoke(app, ["deface", str(env / "in"), str(env / "out")])
    assert empty.exit_code == 1 and "no DICOM files" in empty.output
    bad = runner.invoke(app, ["deface", str(env / "in"), str(env / "out"), "--mode", "blur"])
    assert bad.exit_code == 1 and "unknown mode" in bad.output


def test_profile_and_lookup(env):
    runner = CliRunner()
    profile = runner.invoke(app, ["deid", "profile", "--json"])
    assert profile.exit_code == 0
    rows = {r["item"]: r["value"] for r in json.loads(profile.stdout)}
    assert rows["action X"] > 300 and rows["action U"] > 40  # Table E.1-1 is loaded
    unknown = runner.invoke(app, ["deid", "lookup", "2.25.1"])
    assert unknown.exit_code == 1 and "unknown pseudonym" in unknown.output
