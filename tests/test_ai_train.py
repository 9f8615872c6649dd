"""Training: calibration helpers, tiny training runs that write verified bundles, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ai_helpers import labelled_cases, labelled_head
from models.ich.bundle import load_bundle
from models.ich.train import (TEST_BASE, TrainConfig, fit_temperature, operating_threshold,
                              phantom_seeds, split_of, train)
from models.results import LABELS

TRIAGE_NET = {"widths": [8, 16, 16, 24, 32], "features": 16, "hidden": 8}
SEGMENT_NET = {"channels": [8, 16, 32], "strides": [2, 2]}


def test_operating_threshold_reaches_the_stated_sensitivity():
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(40), np.zeros(60)]
    probs = np.clip(np.r_[rng.normal(0.7, 0.15, 40), rng.normal(0.3, 0.15, 60)], 0, 1)
    t = operating_threshold(probs, labels, 0.95)
    assert (probs[labels == 1] >= t).mean() >= 0.95
    assert t > probs[labels == 1].min()  # not trivially the lowest positive
    assert operating_threshold(probs, np.zeros(100), 0.95) == 0.5
    # The widest margin: midway (logit) between the positive at the quantile and the highest
    # negative below it, so validation sensitivity and specificity are those of any threshold
    # in that gap.
    pos, neg = np.r_[0.3, np.linspace(0.97, 0.999, 19)], np.r_[0.05, 0.1, 0.8]
    t = operating_threshold(np.r_[pos, neg], np.r_[np.ones(20), np.zeros(3)], 0.95)
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    assert 0.8 < t < 0.97
    assert logit(t) == pytest.approx((logit(0.97) + logit(0.8)) / 2, abs=1e-3)


def test_temperature_softens_overconfident_logits():
    rng = np.random.default_rng(1)
    labels = (rng.random(400) < 0.5).astype(float)
    honest = np.where(labels > 0, 1.0, -1.0) + rng.normal(0, 1.5, 400)
    assert fit_temperature(honest * 4, labels) > 2.0  # 4x too confident -> T near 4
    assert 0.5 < fit_temperature(honest, labels) < 2.0


def test_seed_ranges_and_hash_split_are_disjoint():
    train, val, test = phantom_seeds("train", 1000), phantom_seeds("val", 1000), phantom_seeds("test", 10)
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert test[0] == TEST_BASE
    splits = [split_of(f"case-{i}") for i in range(2000)]
    assert 0.1 < splits.count("test") / 2000 < 0.2 and split_of("case-1") == split_of("case-1")


def test_calcification_mimics_go_to_a_share_of_training_phantoms_only(monkeypatch):
    """`--calcified`: basal ganglia and falx calcifications (the demo's normal study was called
    a bleed on a basal ganglia calcification) for a fixed share of training seeds; the rest
    of the head is drawn the same."""
    from models.ich.data import calcified_seed, phantom_spec
    from models.phantom.anatomy import draw_subject

    seeds = phantom_seeds("train", 2000)
    picked = [s for s in seeds if calcified_seed(s, 0.3)]
    assert 0.25 < len(picked) / len(seeds) < 0.35
    assert picked == [s for s in seeds if calcified_seed(s, 0.3)]
    assert not any(calcified_seed(s, 0.0) for s in seeds)
    plain = [draw_subject(phantom_spec(s, 128, 5.0).resolved()) for s in seeds[:40]]
    forced = [draw_subject(phantom_spec(s, 128, 5.0, calcified=True).resolved()) for s in seeds[:40]]
    assert not all(a.bg_calc for a in plain) and all(b.bg_calc and b.falx_calc for b in forced)
    for a, b in zip(plain, forced):
        assert (a.gm, a.skull_t, a.pineal_calc) == (b.gm, b.skull_t, b.pineal_calc)
    # Validation (checkpoint choice, calibration) keeps the population's rates.
    import models.ich.train as training

    asked = []
    monkeypatch.setattr(training, "phantom_case", lambda s, *a: asked.append((s, a[-1])))
    cfg = TrainConfig(kind="triage", out=None, calcified_share=1.0)
    training.load_cases(cfg, "train", 3)
    training.load_cases(cfg, "val", 3)
    assert [c for _, c in asked] == [True] * 3 + [False] * 3


def test_matrix_mix_goes_to_training_phantoms_only(monkeypatch):
    """`--matrices 128,256,512`: each training seed gets one matrix (every run the same), all
    of them used; validation stays at --matrix so checkpoints compare across runs."""
    from models.ich.data import matrix_of_seed

    seeds = phantom_seeds("train", 600)
    drawn = [matrix_of_seed(s, 128, (128, 256, 512)) for s in seeds]
    assert drawn == [matrix_of_seed(s, 128, (128, 256, 512)) for s in seeds]
    assert all(0.25 < drawn.count(m) / len(drawn) < 0.42 for m in (128, 256, 512))
    assert {matrix_of_seed(s, 192) for s in seeds} == {192}
    import models.ich.train as training

    asked = []
    monkeypatch.setattr(training, "phantom_case", lambda s, f, m, *a: asked.append(m))
    cfg = TrainConfig(kind="segment", out=None, matrix=128, matrices=(256, 512))
    training.load_cases(cfg, "train", 20)
    training.load_cases(cfg, "val", 5)
    assert set(asked[:20]) == {256, 512} and asked[20:] == [128] * 5


@pytest.fixture(scope="module")
def tiny_cases():
    return labelled_cases(8, 0), labelled_cases(6, 100)


def _segment_cfg(out, seed=3):
    return TrainConfig(kind="segment", out=out, epochs=1, spacing_mm=4.0, size=64,
                       network=SEGMENT_NET, seed=seed)


@pytest.fixture(scope="module")
def tiny_segment(tmp_path_factory, tiny_cases):
    return train(_segment_cfg(tmp_path_factory.mktemp("seg") / "a"), cases=tiny_cases)


def test_tiny_segment_training_is_deterministic(tmp_path, tiny_cases, tiny_segment):
    again = train(_segment_cfg(tmp_path / "b"), cases=tiny_cases)
    assert load_bundle(again, "segment").sha256 == load_bundle(tiny_segment, "segment").sha256
    meta = json.loads((tiny_segment / "metadata.json").read_text())
    assert "dice_hematoma" in meta["validation"]
    assert len(list((tiny_segment / "checkpoints").glob("epoch*.pt"))) == 1


def test_tiny_triage_training_writes_a_calibrated_bundle(tmp_path, tiny_cases, tiny_segment):
    cfg = TrainConfig(kind="triage", out=tmp_path / "t", epochs=2, spacing_mm=4.0, size=64,
                      network=TRIAGE_NET, segment_bundle=tiny_segment)
    path = train(cfg, cases=tiny_cases)
    bundle = load_bundle(path, "triage")
    assert set(bundle.config["thresholds"]) == set(LABELS)
    assert set(bundle.config["calibration"]["temperature"]) == set(LABELS)
    assert bundle.config["operating_point"]["sensitivity"] == 0.95
    assert bundle.config["inputs"] == "image+segmentation"
    assert bundle.config["segment_sha256"] == load_bundle(tiny_segment, "segment").sha256
    assert bundle.metadata["sha256"] == bundle.sha256
    assert "NOT FOR CLINICAL USE" in bundle.metadata["intended_use"]
    # Moving the operating point without retraining (models.ich.calibrate): a higher target
    # sensitivity never raises a threshold; the weights and their checksum stay.
    from models.ich.calibrate import recalibrate

    low = recalibrate(path, tiny_segment, TrainConfig(kind="triage", out=path, target_sensitivity=0.5),
                      val=tiny_cases[1])
    high = recalibrate(path, tiny_segment, TrainConfig(kind="triage", out=path, target_sensitivity=1.0),
                       val=tiny_cases[1])
    assert high["operating_point"]["sensitivity"] == 1.0
    assert all(high["thresholds"][k] <= low["thresholds"][k] for k in LABELS)
    # A segmenter on another model grid cannot feed this triage model.
    cfg.spacing_mm = 2.0
    with pytest.raises(ValueError, match="frame"):
        train(cfg, cases=tiny_cases)


def test_calibrate_cli_adds_a_band_and_keeps_the_rest(tmp_path, monkeypatch):
    # `python -m models.ich.calibrate --band` on a copy of the demo bundle: the new band holds
    # its own operating point, the default one and the shipped 512 band stay as they were.
    import shutil
    import sys

    from models.ich import calibrate
    from models.ich.bundle import default_bundle_path

    folder = tmp_path / "triage"
    shutil.copytree(default_bundle_path("triage"), folder)
    before = json.loads((folder / "config.json").read_text())
    monkeypatch.setattr(sys, "argv", ["calibrate", "--write", str(folder), "--val-studies", "6",
                                      "--matrix", "128", "--band", "1:3",
                                      "--cache", str(tmp_path / "cache")])
    calibrate.main()
    after = json.loads((folder / "config.json").read_text())
    assert {k: after[k] for k in ("thresholds", "calibration", "operating_point")} == \
        {k: before[k] for k in ("thresholds", "calibration", "operating_point")}
    assert [b["pixel_spacing_mm"] for b in after["spacing_bands"]] == [[0.0, 0.7], [1.0, 3.0]]
    assert after["spacing_bands"][0] == before["spacing_bands"][0]
    band = after["spacing_bands"][1]
    assert set(band["thresholds"]) == set(LABELS) and band["operating_point"]["matrix"] == 128
    assert band["operating_point"]["validation_studies"] == 6
    bundle = load_bundle(folder, "triage")  # still a valid bundle, same weights
    assert bundle.sha256 == load_bundle(default_bundle_path("triage"), "triage").sha256
    assert bundle.operating_point(1.8).band == "pixel spacing 1-3 mm"


def test_study_stage_only_keeps_the_slice_encoder(tmp_path, tiny_cases, tiny_segment):
    """--study-stage-only retrains the GRU and heads on the --init bundle's frozen encoder."""
    base = dict(kind="triage", epochs=1, spacing_mm=4.0, size=64, network=TRIAGE_NET,
                segment_bundle=tiny_segment)
    first = train(TrainConfig(out=tmp_path / "a", **base), cases=tiny_cases)
    with pytest.raises(ValueError, match="--init"):
        train(TrainConfig(out=tmp_path / "b", study_stage_only=True, **base), cases=tiny_cases)
    again = train(TrainConfig(out=tmp_path / "c", study_stage_only=True, init=first, seed=5,
                              **base), cases=tiny_cases)
    before, after = (load_bundle(p, "triage").network.state_dict() for p in (first, again))
    for name, value in before.items():
        if name.startswith(("encoder.", "slice_aux.")):
            assert torch.equal(value, after[name]), name
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("study_head."))
    assert load_bundle(again, "triage").metadata["config"]["study_stage_only"] is True


def test_cli_train_segment_on_a_hichit_folder(tmp_path):
    import nibabel as nib

    from models.ich.datasets import RAS_TO_LPS
    from node.cli.main import app

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for n in range(14):  # enough that the hash split gives train and validation cases
        volume, masks, _ = labelled_head(n, bleed=bool(n % 2))
        lab = np.zeros(volume.hu.shape, np.uint8)
        lab[masks["ventricle_left"]], lab[masks["ventricle_right"]] = 3, 4
        lab[masks["hematoma"]] = 1
        for folder, data in (("images", volume.hu.astype(np.int16)), ("labels", lab)):
            nib.save(nib.Nifti1Image(np.transpose(data, (2, 1, 0)), RAS_TO_LPS @ volume.affine),
                     str(tmp_path / folder / f"c{n:02d}.nii.gz"))
    runner = CliRunner()
    res = runner.invoke(app, ["train", "segment", "--dataset", f"hichit:{tmp_path}", "--epochs", "1",
                              "--out", str(tmp_path / "bundle"), "--studies", "0",
                              "--val-studies", "0"])
    assert res.exit_code == 0, res.output
    assert load_bundle(tmp_path / "bundle", "segment").config["kind"] == "segment"
    res = runner.invoke(app, ["train", "segment", "--dataset", "nonsense"])
    assert res.exit_code == 1 and "Traceback" not in res.output


def test_hard_examples_draw_high_loss_studies_more_often():
    from models.ich.train import HardExamples

    base = np.ones(4)
    hard = HardExamples(4, power=1.0)
    assert np.allclose(hard.weighted(base), 0.25)  # nothing seen yet: the base weights
    hard.update([0, 1], [2.0, 0.5])
    w = hard.weighted(base)
    assert w[0] > w[2] == w[3] > w[1]  # unseen studies count as average
    hard.update([0], [0.5])  # learnt: the running loss falls, and so does its weight
    assert hard.weighted(base)[0] < w[0]
    assert np.allclose(HardExamples(4, power=0.0).weighted(base * 2), 0.25)  # off
