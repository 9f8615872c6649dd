"""`ichnode evaluate`: the per-subtype breakdown of the hematoma Dice, pooled Dice, and the CLI."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from models.ich.evaluate import by_subtype, flag_metrics, pooled_dice, subtype_recall, triage_metrics
from node.cli.main import app

runner = CliRunner()


def _masks(shape=(4, 10, 10)):
    sdh, iph = np.zeros(shape, bool), np.zeros(shape, bool)
    sdh[1, 0:2, :] = True  # 20 voxels
    iph[2, 4:8, 4:8] = True  # 16 voxels
    return {"subdural": sdh, "intraparenchymal": iph, "epidural": np.zeros(shape, bool)}


def test_subtype_recall_counts_each_present_subtype_only():
    masks = _masks()
    predicted = masks["intraparenchymal"].copy()
    predicted[1, 0, :5] = True  # 5 of 20 subdural voxels
    recall = subtype_recall(predicted, masks)
    assert recall == {"subdural": 0.25, "intraparenchymal": 1.0}


def test_by_subtype_and_pooled_dice():
    rows = [
        {"dice_hematoma": 0.9, "hematoma_voxels": [100, 100, 90], "subtype_recall": {"subdural": 0.9}},
        {"dice_hematoma": 0.1, "hematoma_voxels": [10, 10, 1], "subtype_recall": {"subdural": 0.1}},
        {"dice_hematoma": 0.5, "hematoma_voxels": [20, 20, 10],
         "subtype_recall": {"subdural": 0.2, "subarachnoid": 0.8}},
        {"dice_hematoma": None, "hematoma_voxels": [3, 0, 0], "subtype_recall": {}},  # a normal
    ]
    out = by_subtype(rows)
    assert out["subdural"]["studies"] == 3
    assert out["subdural"]["recall"]["mean"] == round((0.9 + 0.1 + 0.2) / 3, 4)
    assert out["subdural"]["dice_single_subtype"]["n"] == 2  # the mixed study is not "alone"
    assert out["subdural"]["dice_single_subtype"]["mean"] == 0.5
    assert out["epidural"] == {"studies": 0, "recall": None, "dice_single_subtype": None}
    # pooled: 2 * (90 + 1 + 10) / (260), the normal's false positive does not count
    assert pooled_dice(rows) == round(2 * 101 / 260, 4)


def test_metrics_count_the_calls_the_product_made():
    # Study 1 (a normal at 0.8) came from a fine-pixel band whose threshold is 0.9, so it was
    # not called: the metrics follow the calls, and report both thresholds used.
    labels = np.zeros((4, 6))
    labels[[0, 2], :] = 1
    probs = np.tile(np.array([[0.95], [0.8], [0.7], [0.6]]), (1, 6))
    thresholds = np.tile(np.array([[0.9], [0.9], [0.5], [0.5]]), (1, 6))
    out = triage_metrics(labels, probs, thresholds, probs >= thresholds)["any"]
    assert out["sensitivity"] == 1.0 and out["specificity"] == 0.5
    assert out["threshold"] == [0.5, 0.9]
    same = triage_metrics(labels, probs, np.full((4, 6), 0.5), probs >= 0.5)["any"]
    assert same["threshold"] == 0.5 and same["specificity"] == 0.0


def test_worklist_flag_counts_every_call():
    positive = np.array([True, True, False, False])
    present = np.zeros((4, 6), bool)
    present[0, -1] = True  # caught by "any"
    present[1, 1] = True  # a subtype call alone (another site's bundle): still flagged
    present[2, 2] = True  # a normal with a subtype call: a false alarm for the worklist
    assert flag_metrics(positive, present) == {"sensitivity": 1.0, "specificity": 0.5,
                                               "false_alarms": 1, "missed": 0}


def test_evaluate_cli_reports_bars_and_subtypes(tmp_path):
    out = tmp_path / "metrics.json"
    result = runner.invoke(app, ["evaluate", "all", "--studies", "3", "--matrix", "128",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Hematoma by subtype" in result.output and "Bars (issue 4)" in result.output
    metrics = json.loads(out.read_text())
    assert metrics["held_out"] == "phantom seeds 900000..900002"
    seg = metrics["segment"]
    assert set(seg["hematoma_by_subtype"]) >= {"subdural", "intraventricular"}
    assert seg["dice_hematoma_pooled"] is None or 0 <= seg["dice_hematoma_pooled"] <= 1
    assert "dice_hematoma_mean>=0.85" in metrics["bars"]
    assert metrics["operating_points"] == {"default": 3}
    flag = metrics["worklist_flag"]
    assert flag["false_alarms"] + flag["missed"] <= 3
