"""analyze_volume, bundles (checksums), the gpu step and the CLI on tiny bundles."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ai_helpers import labelled_head
from models.ich.bundle import BundleError, BundleSpec, load_bundle, save_bundle, sha256_file
from models.ich.inference import analyze_volume
from models.ich.networks import build_network
from models.results import LABELS, AnalysisResult

FRAME = {"spacing_mm": 4.0, "size": 64}
TRIAGE_NET = {"widths": [8, 16, 16, 24, 32], "features": 16, "hidden": 8}
SEGMENT_NET = {"channels": [8, 16, 32], "strides": [2, 2]}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> SimpleNamespace:
    """Untrained but complete bundles: enough to test plumbing, geometry and checksums."""
    root = tmp_path_factory.mktemp("bundles")
    torch.manual_seed(0)
    thresholds = {label: 0.5 for label in LABELS}
    save_bundle(root / "triage", BundleSpec("triage", "t", "1", TRIAGE_NET, FRAME,
                                            extra={"thresholds": thresholds}),
                build_network("triage", TRIAGE_NET))
    save_bundle(root / "segment", BundleSpec("segment", "s", "1", SEGMENT_NET, FRAME),
                build_network("segment", SEGMENT_NET))
    return SimpleNamespace(models=SimpleNamespace(triage=root / "triage", segment=root / "segment",
                                                  device="cpu"))


def test_analyze_volume_returns_result_and_masks_on_the_original_grid(bundles):
    volume, _, _ = labelled_head(4, bleed=True)
    result, masks = analyze_volume(volume, bundles)
    assert set(result.findings) == set(LABELS)
    assert all(len(f.slice_probabilities) == volume.hu.shape[0] for f in result.findings.values())
    for name in ("hematoma", "ventricle_left", "ventricle_right"):
        assert masks[name].shape == volume.hu.shape and masks[name].dtype == bool
    assert masks["hematoma_subtype"].dtype == np.uint8
    assert (masks["hematoma_subtype"] > 0).sum() == masks["hematoma"].sum()
    sha = json.loads((bundles.models.triage / "metadata.json").read_text())["sha256"]
    assert result.models[0].sha256 == sha == sha256_file(bundles.models.triage / "model.pt")
    assert result.hematoma_volume_ml == pytest.approx(masks["hematoma"].sum() * volume.voxel_volume_ml,
                                                      abs=1e-3)
    assert result.seconds["total"] > 0


def test_slice_probabilities_follow_original_slice_order(bundles):
    volume, _, _ = labelled_head(2, bleed=True)
    flipped = type(volume)(hu=volume.hu[::-1].copy(), affine=volume.affine.copy())
    flipped.affine[:3, 3] = volume.affine[:3, 3] + (volume.hu.shape[0] - 1) * volume.affine[:3, 2]
    flipped.affine[:3, 2] *= -1
    a, masks_a = analyze_volume(volume, bundles)
    b, masks_b = analyze_volume(flipped, bundles)
    pa = a.findings["any"].slice_probabilities
    pb = b.findings["any"].slice_probabilities
    np.testing.assert_allclose(pa, pb[::-1], atol=1e-3)
    np.testing.assert_array_equal(masks_a["ventricle_left"], masks_b["ventricle_left"][::-1])


def test_checksum_mismatch_is_a_clear_error(bundles, tmp_path):
    import shutil

    copy = tmp_path / "triage"
    shutil.copytree(bundles.models.triage, copy)
    with open(copy / "model.pt", "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(BundleError, match="checksum mismatch"):
        load_bundle(copy, "triage")
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope", "triage")
    with pytest.raises(BundleError, match="not triage"):
        load_bundle(bundles.models.segment, "triage")


def _with_bands(src, folder, bands) -> None:
    import shutil

    shutil.copytree(src, folder)
    config = json.loads((folder / "config.json").read_text())
    config["spacing_bands"] = bands
    (folder / "config.json").write_text(json.dumps(config))


def test_pixel_spacing_band_picks_its_own_calibration(bundles, tmp_path):
    # A band for fine pixels (a 512 matrix) with its own temperatures and thresholds; coarser
    # series keep the default ones. The result says which applied.
    folder = tmp_path / "banded"
    band = {"pixel_spacing_mm": [0, 2.0], "thresholds": {label: 0.0 for label in LABELS},
            "calibration": {"temperature": {label: 1e4 for label in LABELS}}}
    _with_bands(bundles.models.triage, folder, [band])
    settings = SimpleNamespace(models=SimpleNamespace(triage=folder, segment=bundles.models.segment,
                                                      device="cpu"))
    fine, _, _ = labelled_head(4, bleed=True, pixel_mm=1.5)
    coarse, _, _ = labelled_head(4, bleed=True, pixel_mm=3.0)
    banded, _ = analyze_volume(fine, settings)
    assert banded.operating_point == "pixel spacing 0-2 mm"
    for finding in banded.findings.values():  # temperature 1e4: every logit reads as ~0.5
        assert finding.threshold == 0.0 and finding.present
        assert finding.probability == pytest.approx(0.5, abs=1e-3)
    # A band with thresholds only keeps the default temperatures (the demo bundle's).
    from models.ich.bundle import default_bundle_path

    _with_bands(default_bundle_path("triage"), tmp_path / "thresholds_only",
                [{"pixel_spacing_mm": [0, 2.0], "thresholds": {"any": 0.7}}])
    demo = load_bundle(tmp_path / "thresholds_only", "triage")
    banded_point, default_point = demo.operating_point(1.5), demo.operating_point(3.0)
    assert banded_point.thresholds == {"any": 0.7} != default_point.thresholds
    assert banded_point.temperatures == default_point.temperatures and default_point.temperatures
    default, _ = analyze_volume(coarse, settings)
    plain, _ = analyze_volume(coarse, bundles)
    assert default.operating_point == plain.operating_point == "default"
    assert {k: (v.probability, v.threshold) for k, v in default.findings.items()} == \
        {k: (v.probability, v.threshold) for k, v in plain.findings.items()}
    assert all(v.threshold == 0.5 for v in default.findings.values())


def test_subtypes_and_hematoma_mask_only_with_any(bundles, tmp_path):
    # Subtype thresholds of 0 call every subtype; with "any" at 1.0 (never reached) none of
    # them may be reported, and no hematoma mask or volume either: a subtype or a hematoma
    # without a hemorrhage is a contradiction on the worklist and in the SEG.
    volume, _, _ = labelled_head(4, bleed=True)
    for any_threshold, expected in ((1.0, False), (0.0, True)):
        folder = tmp_path / f"any{any_threshold}"
        thresholds = {**{label: 0.0 for label in LABELS}, "any": any_threshold}
        band = {"pixel_spacing_mm": [0, 10], "thresholds": thresholds}
        _with_bands(bundles.models.triage, folder, [band])
        settings = SimpleNamespace(models=SimpleNamespace(triage=folder, device="cpu",
                                                          segment=bundles.models.segment))
        result, masks = analyze_volume(volume, settings)
        assert {f.present for f in result.findings.values()} == {expected}
        assert masks["hematoma"].any() == expected == (result.hematoma_volume_ml > 0)
        assert (masks["hematoma_subtype"] > 0).any() == expected


@pytest.mark.parametrize("band", [{"pixel_spacing_mm": [1.0, 0.5], "thresholds": {}},
                                  {"pixel_spacing_mm": [0, "1"], "thresholds": {}},
                                  {"pixel_spacing_mm": [0, 1]}])
def test_malformed_spacing_band_is_refused(bundles, tmp_path, band):
    _with_bands(bundles.models.triage, tmp_path / "bad", [band])
    with pytest.raises(BundleError, match="spacing_bands"):
        load_bundle(tmp_path / "bad", "triage")


def test_calibrated_band_replaces_its_range_and_refuses_overlaps():
    from models.ich.calibrate import with_band

    bands = with_band([], (0.0, 0.6), {"thresholds": {"any": 0.9}})
    bands = with_band(bands, (1.0, 3.0), {"thresholds": {"any": 0.5}})
    bands = with_band(bands, (0.0, 0.6), {"thresholds": {"any": 0.95}})
    assert [(b["pixel_spacing_mm"], b["thresholds"]["any"]) for b in bands] == \
        [([0.0, 0.6], 0.95), ([1.0, 3.0], 0.5)]
    with pytest.raises(SystemExit, match="overlaps"):
        with_band(bands, (0.5, 1.2), {"thresholds": {}})


def test_torchscript_bundle_loads(bundles, tmp_path):
    import shutil

    folder = tmp_path / "ts"
    shutil.copytree(bundles.models.segment, folder)
    net = load_bundle(bundles.models.segment, "segment").network
    torch.jit.trace(net, torch.zeros(1, 9, 64, 64)).save(str(folder / "model.ts"))
    (folder / "model.pt").unlink()
    config = json.loads((folder / "config.json").read_text())
    config["weights"] = "model.ts"
    (folder / "config.json").write_text(json.dumps(config))
    meta = json.loads((folder / "metadata.json").read_text())
    meta["sha256"] = sha256_file(folder / "model.ts")
    (folder / "metadata.json").write_text(json.dumps(meta))
    loaded = load_bundle(folder, "segment")
    x = torch.rand(2, 9, 64, 64)
    torch.testing.assert_close(loaded.network(x), net(x), atol=1e-4, rtol=1e-4)


def _ctx(bundles, tmp_path):
    from node.config import Settings
    from workers.context import StepContext

    settings = Settings(storage={"root": str(tmp_path / "var")},
                        models={"triage": str(bundles.models.triage),
                                "segment": str(bundles.models.segment), "device": "cpu"})
    return StepContext(settings=settings, index=None, job_id=7)


def test_gpu_step_writes_results_and_masks(bundles, tmp_path):
    from workers.steps import analyze

    ctx = _ctx(bundles, tmp_path)
    item = ctx.work_item_dir("pseudo123")
    volume, _, _ = labelled_head(6, bleed=True)
    volume.save(item / "volume.npz")
    out = analyze.run(ctx, {"work_item": str(item)})
    assert out == {"work_item": str(item), "result": "results.json"}
    result = AnalysisResult.model_validate_json((item / "results.json").read_text())
    assert result.status == "ok" and result.masks_file == "masks.npz"
    with np.load(item / "masks.npz") as masks:
        assert masks["hematoma"].shape == volume.hu.shape
        assert set(masks.files) == {"hematoma", "ventricle_left", "ventricle_right",
                                    "hematoma_subtype"}
    assert not list(item.glob("*.tmp*"))


def test_gpu_step_fails_permanently_on_bad_input(bundles, tmp_path):
    from workers.context import StepError
    from workers.steps import analyze

    ctx = _ctx(bundles, tmp_path)
    item = ctx.work_item_dir("empty")
    with pytest.raises(StepError, match="no volume.npz"):
        analyze.run(ctx, {"work_item": str(item)})
    volume, _, _ = labelled_head(6, bleed=False)
    volume.affine = volume.affine[:, [2, 1, 0, 3]]  # slices now run left-right: sagittal
    volume.save(item / "volume.npz")
    with pytest.raises(StepError, match="not an axial"):
        analyze.run(ctx, {"work_item": str(item)})


def test_cli_models_and_analyze(bundles, tmp_path, monkeypatch):
    from ai_helpers import write_ct_series
    from node.cli.main import app

    monkeypatch.setenv("ICHNODE_MODELS__TRIAGE", str(bundles.models.triage))
    monkeypatch.setenv("ICHNODE_MODELS__SEGMENT", str(bundles.models.segment))
    runner = CliRunner()
    res = runner.invoke(app, ["models", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["verified"] for r in rows] == [True, True]
    assert rows[0]["operating_points"] == "default: any >= 0.500"
    monkeypatch.delenv("ICHNODE_MODELS__TRIAGE")  # the demo bundle: its 512 band is listed
    demo = json.loads(runner.invoke(app, ["models", "--json"]).stdout)[0]["operating_points"]
    assert demo.startswith("default: any >= 0.") and "; pixels 0-0.7 mm: any >= 0." in demo
    monkeypatch.setenv("ICHNODE_MODELS__TRIAGE", str(bundles.models.triage))
    volume, _, _ = labelled_head(8, bleed=True)
    write_ct_series(tmp_path / "dcm", volume.hu, volume.affine, shuffle=True)
    res = runner.invoke(app, ["analyze", str(tmp_path / "dcm"), "--json",
                              "--masks", str(tmp_path / "m.npz")])
    assert res.exit_code == 0, res.output
    assert set(json.loads(res.stdout)["findings"]) == set(LABELS)
    assert json.loads(res.stdout)["operating_point"] == "default"
    assert (tmp_path / "m.npz").exists()
    monkeypatch.setenv("ICHNODE_MODELS__TRIAGE", str(tmp_path / "missing"))
    res = runner.invoke(app, ["analyze", str(tmp_path / "dcm")])
    assert res.exit_code == 1 and "does not exist" in res.output and "Traceback" not in res.output


def test_models_see_only_the_intracranial_mask(bundles):
    """Voxels outside the mask never reach the models, nor the values of dense bone inside it
    (the defacer may destroy them): changing them changes nothing, and masks stay inside it; a
    volume without a cranial cavity is refused with a clear reason."""
    from models.preprocess.cavity import DENSE_BONE_HU, intracranial_mask
    from models.preprocess.series import SeriesError

    volume, _, _ = labelled_head(5, bleed=True)
    inside = intracranial_mask(volume)
    assert 0 < inside.sum() < inside.size
    noisy = type(volume)(hu=volume.hu.copy(), affine=volume.affine.copy())
    rng = np.random.default_rng(0)
    noisy.hu[~inside] = rng.uniform(-1000, 2000, int((~inside).sum()))
    dense = inside & (volume.hu >= DENSE_BONE_HU)
    assert dense.any()
    noisy.hu[dense] = rng.uniform(DENSE_BONE_HU, 3000, int(dense.sum()))
    a, masks_a = analyze_volume(volume, bundles, intracranial=inside)
    b, masks_b = analyze_volume(noisy, bundles, intracranial=inside)
    for label in LABELS:
        assert a.findings[label].probability == pytest.approx(b.findings[label].probability, abs=1e-6)
    names = ("hematoma", "ventricle_left", "ventricle_right")
    assert any(masks_a[name].any() for name in names)  # something to compare
    for name in names:
        np.testing.assert_array_equal(masks_a[name], masks_b[name])
        assert not (masks_a[name] & ~inside).any()
    with pytest.raises(SeriesError, match="does not match"):
        analyze_volume(volume, bundles, intracranial=inside[1:])
    air = type(volume)(hu=np.full_like(volume.hu, -1000), affine=volume.affine)
    with pytest.raises(SeriesError, match="no cranial cavity"):
        analyze_volume(air, bundles)


def test_cli_analyze_uses_the_work_items_own_mask(bundles, tmp_path, monkeypatch):
    from models.preprocess.cavity import save_mask
    from node.cli.main import app

    monkeypatch.setenv("ICHNODE_MODELS__TRIAGE", str(bundles.models.triage))
    monkeypatch.setenv("ICHNODE_MODELS__SEGMENT", str(bundles.models.segment))
    volume, _, _ = labelled_head(6, bleed=True)
    volume.save(tmp_path / "volume.npz")
    only = np.zeros(volume.hu.shape, dtype=bool)
    only[:, 20:40, 20:40] = True  # a mask unlike the cavity: proves the file is read
    save_mask(tmp_path / "intracranial.npz", only)
    res = CliRunner().invoke(app, ["analyze", str(tmp_path / "volume.npz"), "--masks",
                                   str(tmp_path / "m.npz")])
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "m.npz") as m:
        names = ("hematoma", "ventricle_left", "ventricle_right")
        assert any(m[name].any() for name in names)
        for name in names:
            assert not (m[name] & ~only).any()
