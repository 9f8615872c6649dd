"""Triage + segmentation + measurements of one volume: the pure core of the gpu step.

``analyze_volume(volume, settings) -> (AnalysisResult, masks)``; masks are boolean arrays on the
volume's own grid (``hematoma``, ``ventricle_left``, ``ventricle_right``) plus a uint8
``hematoma_subtype`` (0 none, else 1 + index in SUBTYPES), as models/results.py specifies.

The models see only the cranial cavity (:mod:`models.preprocess.cavity`): everything outside it
is air in their input, dense bone is one value, and masks are kept inside it. So defacing,
which writes there only dense bone as that value, cannot change a result, and nothing outside
the skull (scalp haematoma, headrest, face) can become a finding.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from scipy import ndimage

from models.ich import measure, postprocess
from models.ich.bundle import Bundle, BundleError, OperatingPoint, load_bundle
from models.ich.networks import IN_CHANNELS, SEG_PRIOR_CHANNELS, triage_input
from models.preprocess.cavity import CavityNotFound, intracranial_mask, keep_intracranial
from models.preprocess.series import SeriesError
from models.preprocess.transforms import ModelFrame, model_input
from models.results import LABELS, SUBTYPES, AnalysisResult, ModelInfo, SubtypeResult
from models.volume import Volume

log = logging.getLogger(__name__)

MIN_COMPONENT_ML = 0.05  # hematoma specks below this are noise, not findings


def pick_device(setting: str = "auto") -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@lru_cache(maxsize=4)
def _cached_bundle(path: str | None, kind: str, device: str) -> Bundle:
    return load_bundle(Path(path) if path else None, kind, device)


def load_models(settings=None) -> tuple[Bundle, Bundle, torch.device]:  # noqa: ANN001
    """Both bundles from settings.models (verified, cached per process)."""
    models = getattr(settings, "models", None)
    device = pick_device(getattr(models, "device", "auto"))
    triage_path = getattr(models, "triage", None)
    segment_path = getattr(models, "segment", None)
    triage = _cached_bundle(str(triage_path) if triage_path else None, "triage", str(device))
    segment = _cached_bundle(str(segment_path) if segment_path else None, "segment", str(device))
    return triage, segment, device


def _autocast(device: torch.device):
    # Mixed precision only where it pays (CUDA); CPU stays fp32.
    return torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else nullcontext()


def analyze_volume(volume: Volume, settings=None, *, bundles=None,  # noqa: ANN001
                   intracranial: np.ndarray | None = None) -> tuple[AnalysisResult, dict]:
    """Run triage and segmentation on ``volume`` and measure.

    ``intracranial``: the cranial-cavity mask on the volume's grid (the deid step finds it on the
    original voxels); found here when not given. Raises SeriesError for a non-axial series or a
    volume without a cranial cavity.
    """
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    triage, segment, device = bundles or load_models(settings)
    seconds["load"] = time.perf_counter() - t0

    t = time.perf_counter()
    intracranial = _intracranial(volume, intracranial)
    seconds["cavity"] = time.perf_counter() - t

    t = time.perf_counter()
    if _in_channels(triage) > IN_CHANNELS and _frame_args(triage) != _frame_args(segment):
        raise BundleError("triage and segment bundles must share the model frame (spacing, size)")
    # Fitted on what the models see, so the window (centred on the tissue) is the same
    # with or without a face.
    seen = Volume(hu=keep_intracranial(volume.hu, intracranial), affine=volume.affine)
    frame = ModelFrame.fit(seen, **_frame_args(segment))
    hu_model = frame.to_model(seen.hu)
    x = model_input(hu_model, frame.native_spacing[0])
    seconds["preprocess"] = time.perf_counter() - t

    t = time.perf_counter()
    probs = run_segmentation(segment, x, device)
    seconds["segment"] = time.perf_counter() - t

    t = time.perf_counter()
    x_triage = triage_input(x, probs.permute(1, 0, 2, 3), _in_channels(triage))
    # In-plane pixel spacing picks the calibration: a 0.45 mm scan reads differently from a
    # 1.8 mm one even on the same 2 mm model grid.
    operating = triage.operating_point(min(volume.spacing[1:]))
    slice_probs, study_probs = run_triage(triage, x_triage, device, operating)
    slice_probs = frame.slice_values_to_original(slice_probs)
    seconds["triage"] = time.perf_counter() - t

    t = time.perf_counter()
    labels = frame.probabilities_to_original(probs)
    seconds["to_original"] = time.perf_counter() - t

    t = time.perf_counter()
    labels[~intracranial] = 0  # the probabilities' upsampling may bleed past the cavity edge
    findings = _findings(operating, slice_probs, study_probs)
    if findings["any"].present:
        hematoma = _hematoma(labels == 1, volume, float(study_probs[LABELS.index("any")]), segment)
    else:
        # No hemorrhage called, so no hematoma mask or volume: the SEG, the report and the
        # worklist's volume rule would otherwise describe a bleed the flag says is absent.
        hematoma = np.zeros(labels.shape, dtype=bool)
    masks = {"hematoma": hematoma, "ventricle_left": labels == 2, "ventricle_right": labels == 3}
    masks["hematoma_subtype"] = _component_subtypes(hematoma, slice_probs, findings)
    result = AnalysisResult(
        models=[ModelInfo(name=b.name, version=b.version, sha256=b.sha256) for b in (triage, segment)],
        findings=findings, operating_point=operating.band,
        **_measurements(volume, frame, masks),
    )
    seconds["measure"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    result.seconds = {k: round(v, 3) for k, v in seconds.items()}
    return result, masks


def _hematoma(raw: np.ndarray, volume: Volume, p_any: float, segment: Bundle) -> np.ndarray:
    """The segmenter's hematoma label without specks, then the bundle's false-positive rule
    (triage gate, component size, blood HU range)."""
    voxel_ml = volume.voxel_volume_ml
    hematoma = measure.remove_small_components(raw, max(1, int(round(MIN_COMPONENT_ML / voxel_ml))))
    return postprocess.apply_rule(hematoma, volume.hu, voxel_ml, p_any,
                                  postprocess.rule_of(segment.config))


def _intracranial(volume: Volume, given: np.ndarray | None) -> np.ndarray:
    if given is not None:
        if given.shape != volume.hu.shape:
            raise SeriesError(f"intracranial mask {given.shape} does not match the volume "
                              f"{volume.hu.shape}")
        return given.astype(bool, copy=False)
    try:
        return intracranial_mask(volume)
    except CavityNotFound as exc:
        raise SeriesError(str(exc)) from exc


def _in_channels(bundle: Bundle) -> int:
    return int(bundle.config.get("network", {}).get("in_channels", IN_CHANNELS + SEG_PRIOR_CHANNELS))


def _frame_args(bundle: Bundle) -> dict:
    frame = bundle.frame
    return {"spacing_mm": float(frame.get("spacing_mm", 2.0)), "size": int(frame.get("size", 128))}


@torch.no_grad()
def run_triage(bundle: Bundle, x: torch.Tensor, device: torch.device,
               operating: OperatingPoint) -> tuple[np.ndarray, np.ndarray]:
    """(K, 9, H, W) -> calibrated per-slice (K, 6) and study (6,) probabilities."""
    with _autocast(device):
        slice_logits, study_logits = bundle.network(x[None].to(device))
    temps = torch.tensor([float(operating.temperatures.get(label, 1.0)) for label in LABELS])
    slice_probs = torch.sigmoid(slice_logits[0].float().cpu() / temps).numpy()
    study_probs = torch.sigmoid(study_logits[0].float().cpu() / temps).numpy()
    return slice_probs, study_probs


@torch.no_grad()
def run_segmentation(bundle: Bundle, x: torch.Tensor, device: torch.device,
                     batch: int = 16) -> torch.Tensor:
    """(K, 9, H, W) -> (C, K, H, W) softmax probabilities, sliding window over each slice."""
    size = _frame_args(bundle)["size"]
    out = []
    for start in range(0, x.shape[0], batch):
        chunk = x[start:start + batch].to(device)
        with _autocast(device):
            logits = sliding_window_inference(chunk, roi_size=(size, size), sw_batch_size=batch,
                                              predictor=bundle.network, overlap=0.25)
        out.append(torch.softmax(logits.float(), dim=1).cpu())
    return torch.cat(out).permute(1, 0, 2, 3)


def _findings(operating: OperatingPoint, slice_probs: np.ndarray, study_probs: np.ndarray) -> dict:
    """Per label: probability, threshold and whether present. A subtype is present only when
    "any" is: every subtype is a hemorrhage, and the subtype thresholds (chosen for sensitivity
    0.95 on labels the model separates far less well than "any") on their own called a
    subtype in every held-out normal study, each of them a false URGENT on the worklist."""
    p_any = float(np.clip(study_probs[LABELS.index("any")], 0, 1))
    any_present = p_any >= float(operating.thresholds.get("any", 0.5))
    out = {}
    for n, label in enumerate(LABELS):
        threshold = float(operating.thresholds.get(label, 0.5))
        p = float(np.clip(study_probs[n], 0, 1))
        out[label] = SubtypeResult(probability=p, present=p >= threshold and any_present,
                                   threshold=threshold,
                                   slice_probabilities=[round(float(v), 4) for v in slice_probs[:, n]])
    return out


def _component_subtypes(hematoma: np.ndarray, slice_probs: np.ndarray, findings: dict) -> np.ndarray:
    """Subtype per connected hematoma component: the subtype the triage model sees most on its slices.

    Subtypes the study-level triage calls present are preferred; 0 where nothing is known.
    """
    out = np.zeros(hematoma.shape, dtype=np.uint8)
    labels, n = ndimage.label(hematoma)
    if n == 0:
        return out
    present = np.array([findings[s].present for s in SUBTYPES])
    for comp, region in enumerate(ndimage.find_objects(labels), start=1):
        ks = range(region[0].start, region[0].stop)
        score = slice_probs[list(ks), :len(SUBTYPES)].mean(axis=0)
        if present.any():
            score = np.where(present, score, -1)
        out[labels == comp] = 1 + int(np.argmax(score))
    return out


def _measurements(volume: Volume, frame: ModelFrame, masks: dict) -> dict:
    voxel_ml = volume.voxel_volume_ml
    hematoma = masks["hematoma"]
    spacing = frame.native_spacing
    hu_canon = frame.canonical(volume.hu)
    shift = measure.midline_shift_mm(hu_canon, frame.canonical(masks["ventricle_left"]),
                                     frame.canonical(masks["ventricle_right"]), spacing)
    abc2 = measure.abc2_ml(frame.canonical(hematoma), spacing)
    return {
        "hematoma_volume_ml": round(measure.volume_ml(hematoma, voxel_ml), 3),
        "hematoma_abc2_ml": round(abc2, 3) if abc2 is not None else None,
        "midline_shift_mm": round(shift, 2) if shift is not None else None,
        "ventricle_left_ml": round(measure.volume_ml(masks["ventricle_left"], voxel_ml), 3),
        "ventricle_right_ml": round(measure.volume_ml(masks["ventricle_right"], voxel_ml), 3),
        "max_hematoma_slice": measure.max_area_slice(hematoma),
    }
