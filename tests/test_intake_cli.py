"""CLI of intake/sending: studies, study, send, echo, sends (real storescp and our SCP)."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from intake_helpers import (SeriesSpec, free_port, have_dcmtk, make_head_ct, running_node,
                            storescp, storescu)
from node.cli.main import app

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="DCMTK not installed")


@pytest.fixture
def env(tmp_path):
    port = free_port()
    config = tmp_path / "ichnode.yaml"
    config.write_text(yaml.safe_dump({
        "storage": {"root": str(tmp_path / "var"), "min_free_mb": 0},
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": port}},
        "send": {"max_attempts": 2, "retry_backoff_s": 0},
    }))
    runner = CliRunner()

    def run(*args):
        return runner.invoke(app, ["--config", str(config), *args])

    return run, port, config


def test_studies_and_study(env, tmp_path):
    run, _, config = env
    from node.config import load_settings

    files = make_head_ct(tmp_path / "ct")
    settings = load_settings(config)
    with running_node(settings) as node:
        assert storescu(node.port, files).returncode == 0
    result = run("studies", "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["state"] == "receiving" and row["instances"] == len(files) and row["series"] == 3
    assert "patient_id" not in row
    assert json.loads(run("studies", "--json", "--state", "complete").stdout) == []
    bad = run("studies", "--state", "nonsense")
    assert bad.exit_code == 1 and "unknown state" in bad.output
    detail = run("study", row["study_uid"], "--json")
    assert detail.exit_code == 0
    data = json.loads(detail.stdout)
    assert sorted(s["instances"] for s in data["series_list"]) == [1, 6, 8]
    assert data["jobs"] == [] and data["sends"] == []
    table = run("study", row["study_uid"])
    assert table.exit_code == 0 and "HEAD 5mm STD" in table.stdout
    missing = run("study", "1.2.3.4")
    assert missing.exit_code == 1 and "no study" in missing.output
    assert "Traceback" not in missing.output


def test_send_echo_and_sends(env, tmp_path):
    run, port, _ = env
    files = make_head_ct(tmp_path / "ct", series=(SeriesSpec("HEAD", 3, 5.0, "H30s"),))
    down = run("echo", "pacs")
    assert down.exit_code == 1 and "C-ECHO pacs" in down.output
    failed = run("send", str(files[0]), "--to", "pacs")
    assert failed.exit_code == 1 and "not delivered" in failed.output
    with storescp(port, tmp_path / "received"):
        assert run("echo", "pacs").exit_code == 0
        assert run("echo", f"PACS@127.0.0.1:{port}").exit_code == 0
        ok = run("send", str(tmp_path / "ct"), "--to", "pacs", "--json")
        assert ok.exit_code == 0, ok.output
        assert [r["state"] for r in json.loads(ok.stdout)] == ["sent"] * 3
    assert len(list((tmp_path / "received").iterdir())) == 3
    listing = json.loads(run("sends", "--json").stdout)
    assert {r["state"] for r in listing} == {"sent"} and len(listing) == 3
    assert json.loads(run("sends", "--json", "--state", "failed").stdout) == []
    unknown = run("send", str(files[0]), "--to", "nowhere")
    assert unknown.exit_code == 1 and "unknown destination" in unknown.output
    not_dicom = tmp_path / "notes.txt"
    not_dicom.write_text("hello")
    bad = run("send", str(not_dicom), "--to", "pacs")
    assert bad.exit_code == 1 and "cannot enqueue" in bad.output
    assert run("echo", "bad target").exit_code == 1
