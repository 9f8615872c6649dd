"""`ichnode ner`, `ner-synth`, `evaluate ner` and `train ner` through the real CLI entry point."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from node.cli.main import app

runner = CliRunner()


def _invoke(*args, input=None):  # noqa: A002
    return runner.invoke(app, list(args), input=input)


def test_ner_json_from_file_and_table_from_stdin(tmp_path):
    note = tmp_path / "note.txt"
    note.write_text("80 yo male on apixaban, GCS 7. Denies HTN.", encoding="utf-8")
    result = _invoke("ner", str(note), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["flags"]["anticoagulated"] is True and data["flags"]["gcs"] == 7
    assert data["flags"]["hypertension"] is False
    assert data["model"]["sha256"]
    table = _invoke("ner", "-", input="否认服用抗凝药物。")
    assert table.exit_code == 0 and "DRUG" in table.stdout and "flags:" in table.stdout


def test_ner_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    binary = tmp_path / "x.bin"
    binary.write_bytes(b"\x89PNG\x00\x00\x00")
    big = tmp_path / "big.txt"
    big.write_text("headache " * 3000)
    for args, needle in (([str(empty)], "empty text"), ([str(binary)], "binary"),
                         ([str(big), "--max-chars", "1000"], "too"),
                         ([str(tmp_path / "missing.txt")], "no such file"),
                         ([str(empty), "--model", str(tmp_path)], "NER model")):
        result = _invoke("ner", *args)
        assert result.exit_code == 1
        assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert "Traceback" not in result.output


def test_synth_file_evaluates_with_hichit_loc_scheme(tmp_path):
    path = tmp_path / "hichit.txt"
    assert _invoke("ner-synth", "--out", str(path), "--n", "30", "--lang", "zh", "--hichit-loc",
                   "--seed", "77").exit_code == 0
    assert "B-LOC" in path.read_text(encoding="utf-8")
    result = _invoke("evaluate", "ner", "--data", str(path), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data["overall"]) >= {"LOC", "micro avg"}
    assert data["overall"]["LOC"]["f1"] >= 0.9


def test_evaluate_synthetic_reports_types_and_languages():
    result = _invoke("evaluate", "ner", "--n", "40", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data["by_lang"]) == {"en", "zh"}
    assert {"DRUG", "GCS", "BP", "ONSET"} <= set(data["overall"])
    assert data["negation"]["entities"] > 50


def test_train_writes_a_loadable_folder(tmp_path):
    out = tmp_path / "m"
    result = _invoke("train", "ner", "--out", str(out), "--steps", "20", "--n-train", "60",
                     "--n-eval", "20", "--batch-size", "8")
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "ner.json").read_text())
    assert meta["training"]["steps"] == 20 and "evaluation" in meta
    assert _invoke("ner", "-", "--model", str(out), "--json", input="headache").exit_code == 0
    bad = _invoke("train", "ner", "--out", str(out), "--seed", "1000003")
    assert bad.exit_code == 1 and "held-out" in bad.stderr
