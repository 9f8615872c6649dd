"""Configuration: file + environment, precise errors, masked secrets, `ichnode config check`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from node.cli.main import app
from node.config import ConfigError, load_settings, mask_url

runner = CliRunner()


def test_defaults_are_embedded_mode(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load_settings(None)
    assert s.embedded_broker and s.broker_url == "filesystem://"
    assert s.storage.resolved_index_url.startswith("sqlite:///")
    assert s.dicom.max_pdu == 131072


def test_yaml_and_toml_files_and_env_override(tmp_path, monkeypatch):
    y = tmp_path / "c.yaml"
    y.write_text("dicom:\n  ae_title: HEADCT\n  port: 4242\ndestinations:\n"
                 "  pacs: {ae_title: PACS, host: 127.0.0.1, port: 104}\n")
    s = load_settings(y)
    assert s.dicom.ae_title == "HEADCT" and s.destinations["pacs"].port == 104
    monkeypatch.setenv("ICHNODE_DICOM__PORT", "5555")
    assert load_settings(y).dicom.port == 5555
    t = tmp_path / "c.toml"
    t.write_text('[queue]\nbroker_url = "redis://u:hunter2@127.0.0.1:6379/0"\n')
    s = load_settings(t)
    assert not s.embedded_broker


@pytest.mark.parametrize("text,needle", [
    ("dicom:\n  port: 70000\n", "dicom.port"),
    ("dicom:\n  ae_title: WAY_TOO_LONG_AE_TITLE\n", "dicom.ae_title"),
    ("dicom:\n  colour: blue\n", "dicom.colour"),
    ("dicom: [1, 2\n", "not valid YAML"),
])
def test_bad_file_gives_precise_error(tmp_path, text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(f)
    assert needle in str(info.value) and str(f) in str(info.value)


def test_config_check_cli(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[queue]\nbroker_url = "redis://u:hunter2@127.0.0.1:6379/0"\n'
                 '[routing]\nwebhook_secret = "s3cret"\n')
    result = runner.invoke(app, ["--config", str(f), "config", "check", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert "hunter2" not in result.output and "s3cret" not in result.output
    assert data["queue"]["broker_url"] == "redis://u:****@127.0.0.1:6379/0"

    bad = tmp_path / "bad.toml"
    bad.write_text("[dicom]\nport = -1\n")
    result = runner.invoke(app, ["--config", str(bad), "config", "check"])
    assert result.exit_code == 1
    assert "dicom.port" in result.output and "Traceback" not in result.output


def test_config_check_rejects_unknown_results_destination(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("routing:\n  results_to: [nowhere]\n")
    result = runner.invoke(app, ["--config", str(f), "config", "check"])
    assert result.exit_code == 1 and "nowhere" in result.output


def test_mask_url():
    assert mask_url("postgresql://ich:pw@db/ich") == "postgresql://ich:****@db/ich"
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_readme_configuration_reference_is_current():
    """README's configuration reference is what `ichnode config reference` prints today."""
    from pathlib import Path

    from node.config import reference_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- CONFIG-REFERENCE:START -->\n", "\n<!-- CONFIG-REFERENCE:END -->"
    assert start in readme and end in readme
    documented = readme.split(start, 1)[1].split(end, 1)[0]
    assert documented.strip() == reference_markdown().strip(), (
        "README config reference is stale: paste the output of `ichnode config reference`")
