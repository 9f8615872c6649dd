"""Training/evaluation cases on the model grid, from phantoms or real datasets, and augmentation.

A :class:`Case` is one study already in the model frame (canonical orientation, in-plane
resampled, cropped): HU (K, H, W), optional segmentation labels (0 background, 1 hematoma,
2 left ventricle, 3 right ventricle), per-slice and study labels in LABELS order, and the truth
needed for evaluation. Phantom cases are cached as .npz per seed, so repeated training runs do
not regenerate them.

The HU are restricted to the cranial cavity (air elsewhere), exactly as inference does
(:mod:`models.preprocess.cavity`), so the models learn from what they will be shown.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.transforms import (Compose, MapTransform, RandAffined, RandFlipd, RandGaussianNoised,
                              RandGaussianSmoothd, RandScaleIntensityd)

from models.preprocess.cavity import (CavityNotFound, flatten_dense_bone, intracranial_mask,
                                     keep_intracranial)
from models.preprocess.transforms import ModelFrame
from models.results import LABELS, SUBTYPES
from models.volume import Volume

log = logging.getLogger(__name__)

SEG_HEMATOMA, SEG_VENT_LEFT, SEG_VENT_RIGHT = 1, 2, 3
HU_SHIFT = 1024.0  # augmentation works on HU + 1024 so zero padding is air, not brain
MIN_SLICE_AREA_PX = 4  # a subtype counts on a model-grid slice from this many pixels


@dataclass
class Case:
    key: str
    hu: np.ndarray  # (K, H, W) model grid, int16 HU
    slice_mm: float
    study_labels: np.ndarray  # (6,) float32
    slice_labels: np.ndarray | None = None  # (K, 6) float32
    seg: np.ndarray | None = None  # (K, H, W) uint8
    truth: dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        arrays = {"hu": self.hu, "study_labels": self.study_labels}
        if self.slice_labels is not None:
            arrays["slice_labels"] = self.slice_labels
        if self.seg is not None:
            arrays["seg"] = self.seg
        meta = {"key": self.key, "slice_mm": self.slice_mm, "truth": self.truth}
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "Case":
        with np.load(path) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            return cls(key=meta["key"], hu=data["hu"], slice_mm=meta["slice_mm"],
                       study_labels=data["study_labels"],
                       slice_labels=data["slice_labels"] if "slice_labels" in data else None,
                       seg=data["seg"] if "seg" in data else None, truth=meta.get("truth", {}))


def label_map(masks: dict, shape: tuple) -> np.ndarray:
    """Boolean masks -> one label map; hematoma wins over ventricles (IVH is blood in them)."""
    seg = np.zeros(shape, dtype=np.uint8)
    if masks.get("ventricle_left") is not None:
        seg[np.asarray(masks["ventricle_left"], bool)] = SEG_VENT_LEFT
    if masks.get("ventricle_right") is not None:
        seg[np.asarray(masks["ventricle_right"], bool)] = SEG_VENT_RIGHT
    if masks.get("hematoma") is not None:
        seg[np.asarray(masks["hematoma"], bool)] = SEG_HEMATOMA
    return seg


def slice_labels_from_masks(frame: ModelFrame, subtype_masks: dict, n_slices: int) -> np.ndarray:
    """(K, 6) per-slice labels (canonical k order) from per-subtype masks on the original grid."""
    labels = np.zeros((n_slices, len(LABELS)), dtype=np.float32)
    for n, subtype in enumerate(SUBTYPES):
        mask = subtype_masks.get(subtype)
        if mask is None:
            continue
        area = frame.canonical(np.asarray(mask, bool)).reshape(n_slices, -1).sum(axis=1)
        # Area threshold in original pixels equivalent to MIN_SLICE_AREA_PX model pixels.
        px = (frame.spacing_mm / frame.native_spacing[1]) * (frame.spacing_mm / frame.native_spacing[2])
        labels[:, n] = area >= MIN_SLICE_AREA_PX * px
    labels[:, -1] = labels[:, :-1].max(axis=1)
    return labels


def model_hu(key: str, volume: Volume) -> np.ndarray:
    """The volume's HU as the models see them: the cranial cavity only, dense bone as one value.

    A volume without a findable cavity (a 2D slice dataset, a cropped fixture) is kept whole,
    with a warning: inference refuses such a volume, but its labels can still teach.
    """
    try:
        return keep_intracranial(volume.hu, intracranial_mask(volume))
    except CavityNotFound as exc:
        log.warning("%s: %s; training on the whole image", key, exc)
        return flatten_dense_bone(volume.hu)


def case_from_volume(key: str, volume: Volume, frame_args: dict, masks: dict | None = None,
                     subtype_masks: dict | None = None, slice_labels: np.ndarray | None = None,
                     study_labels: np.ndarray | None = None, truth: dict | None = None) -> Case:
    """Bring a labelled volume onto the model grid. ``slice_labels`` are in ORIGINAL k order."""
    # The window is centred on what the models see (the cavity), as in inference.
    seen = Volume(hu=model_hu(key, volume), affine=volume.affine)
    frame = ModelFrame.fit(seen, **frame_args)
    hu = np.clip(np.rint(frame.to_model(seen.hu)), -1024, 3071).astype(np.int16)
    seg = frame.labels_to_model(label_map(masks, volume.hu.shape)) if masks else None
    if subtype_masks:
        per_slice = slice_labels_from_masks(frame, subtype_masks, hu.shape[0])
    elif slice_labels is not None:
        per_slice = frame.slice_values_to_original(np.asarray(slice_labels, np.float32))  # k flip is its own inverse
    else:
        per_slice = None
    if study_labels is None:
        study_labels = per_slice.max(axis=0) if per_slice is not None else np.zeros(len(LABELS))
    return Case(key=key, hu=hu, slice_mm=frame.native_spacing[0],
                study_labels=np.asarray(study_labels, np.float32), slice_labels=per_slice,
                seg=seg, truth=truth or {})


# ----- phantoms -------------------------------------------------------------------------------
def phantom_spec(seed: int, matrix: int, thickness: float | None, calcified: bool = False):
    from models.phantom import PhantomSpec

    fixed = {"matrix": matrix}
    if thickness:
        fixed["slice_thickness_mm"] = thickness
    if calcified:
        fixed["extra"] = {"calcified": True}
    return PhantomSpec.random(seed, **fixed)


def phantom_study(seed: int, matrix: int = 128, thickness: float | None = 5.0,
                  calcified: bool = False):
    from models.phantom import generate_study

    return generate_study(phantom_spec(seed, matrix, thickness, calcified))


def calcified_seed(seed: int, share: float) -> bool:
    """Whether training phantom ``seed`` gets the calcification mimics (``share`` of seeds,
    the same ones on every run)."""
    return share > 0 and float(np.random.default_rng([seed, 0xCA1C]).random()) < share


def matrix_of_seed(seed: int, default: int, matrices: tuple[int, ...] = ()) -> int:
    """The phantom matrix of training phantom ``seed``: one of ``matrices`` (the same one on
    every run), else ``default``. A model trained at one matrix learns that matrix's noise
    and partial volume after resampling: a thin subdural found at 128 was missed at 512."""
    if not matrices:
        return default
    return int(matrices[int(np.random.default_rng([seed, 0x3A7]).integers(len(matrices)))])


def study_truth(study) -> dict:  # noqa: ANN001
    truth = study.truth
    get = truth.get if isinstance(truth, dict) else (lambda k, d=None: getattr(truth, k, d))
    labels = get("study_labels")
    if isinstance(labels, dict):
        labels = [float(labels.get(name, 0)) for name in LABELS]
    return {
        "study_labels": [float(v) for v in labels] if labels is not None else None,
        "hematoma_volume_ml": _float(get("hematoma_volume_ml")),
        "midline_shift_mm": _float(get("midline_shift_mm")),
        "ventricle_left_ml": _float(get("ventricle_left_ml")),
        "ventricle_right_ml": _float(get("ventricle_right_ml")),
    }


def _float(value) -> float | None:  # noqa: ANN001
    return None if value is None else float(value)


def phantom_case(seed: int, frame_args: dict, matrix: int = 128, thickness: float | None = 5.0,
                 cache_dir: Path | None = None, calcified: bool = False) -> Case:
    """One phantom study as a Case (cached by seed and parameters when ``cache_dir`` is given)."""
    from models.phantom import GENERATOR_VERSION

    # "-ic": intracranial input (older caches held the whole head); "-db": dense bone as one
    # value; "-g": generator version; "-calc": calcification mimics forced.
    key = (f"phantom-{seed}-m{matrix}-t{thickness}-s{frame_args['spacing_mm']}-{frame_args['size']}"
           f"-ic-db{'-calc' if calcified else ''}-g{GENERATOR_VERSION}")
    path = cache_dir / f"{key}.npz" if cache_dir else None
    if path and path.exists():
        return Case.load(path)
    study = phantom_study(seed, matrix, thickness, calcified)
    subtype_masks = {s: study.masks[s] for s in SUBTYPES if s in study.masks}
    truth = study_truth(study)
    study_labels = np.array(truth["study_labels"], np.float32) if truth["study_labels"] else None
    case = case_from_volume(key, study.volume, frame_args, masks=study.masks,
                            subtype_masks=subtype_masks, study_labels=study_labels, truth=truth)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        case.save(path)
    return case


# ----- augmentation ---------------------------------------------------------------------------
class SwapVentriclesOnFlipd(MapTransform):
    """After a left-right mirror the left ventricle is on the right: swap the two labels."""

    def __init__(self, flip: RandFlipd):
        super().__init__(["seg"], allow_missing_keys=True)
        self.flip = flip

    def __call__(self, data):
        d = dict(data)
        if self.flip._do_transform and "seg" in d:  # noqa: SLF001 - MONAI keeps the draw there
            seg = d["seg"]
            left, right = seg == SEG_VENT_LEFT, seg == SEG_VENT_RIGHT
            seg = seg.clone() if isinstance(seg, torch.Tensor) else seg.copy()
            seg[left], seg[right] = SEG_VENT_RIGHT, SEG_VENT_LEFT
            d["seg"] = seg
        return d


def augmentation(seed: int) -> Compose:
    """Flips, ±15° rotation, scale/shift, blur, noise, contrast: same draw for all slices of a study.

    Arrays are (K, H, W) with the slices as channels, so one 2D transform moves the whole study.
    """
    keys = ["hu", "seg"]
    flip = RandFlipd(keys, prob=0.5, spatial_axis=1, allow_missing_keys=True)  # columns = left/right
    transform = Compose([
        flip,
        SwapVentriclesOnFlipd(flip),
        RandAffined(keys, prob=0.9, rotate_range=np.radians(15), scale_range=(0.1, 0.1),
                    translate_range=(8, 8), mode=("bilinear", "nearest"), padding_mode="zeros",
                    allow_missing_keys=True),
        RandGaussianSmoothd(["hu"], prob=0.3, sigma_x=(0.25, 0.9), sigma_y=(0.25, 0.9)),
        RandGaussianNoised(["hu"], prob=0.5, std=8.0),
        RandScaleIntensityd(["hu"], prob=0.3, factors=0.03),
    ])
    transform.set_random_state(seed=seed)
    return transform


def augment(case: Case, transform: Compose) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Augmented (K, H, W) HU and labels of a case as tensors."""
    data = {"hu": torch.from_numpy(case.hu.astype(np.float32) + HU_SHIFT)}
    if case.seg is not None:
        data["seg"] = torch.from_numpy(case.seg.astype(np.float32))
    out = transform(data)
    hu = _plain(out["hu"]).float() - HU_SHIFT
    seg = _plain(out["seg"]).round().long() if "seg" in out else None
    return hu, seg


def _plain(x) -> torch.Tensor:  # noqa: ANN001
    # MONAI returns MetaTensors; plain tensors keep the training loop free of their overhead.
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def window_jitter(k: int, rng: np.random.Generator, level_sd: float = 6.0,
                  width_sd: float = 0.08) -> torch.Tensor:
    """(K, 3, 2) per-window (level offset HU, relative width change), one draw per study."""
    draw = np.stack([rng.normal(0, level_sd, 3), rng.normal(0, width_sd, 3)], axis=1)
    return torch.from_numpy(np.repeat(draw[None], k, axis=0)).float()
