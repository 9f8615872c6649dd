"""Training of the triage and segmentation bundles (phantoms by default, or a real dataset).

Data splits never overlap: phantom seeds come from disjoint ranges (train from TRAIN_BASE,
validation from VAL_BASE, evaluation from TEST_BASE), dataset cases are split by a hash of
their key. Validation data chooses the checkpoint, the calibration temperatures and the
operating thresholds (for ``target_sensitivity``); the evaluation set is never seen here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from scipy.special import expit, logit

from models.ich.bundle import BundleSpec, save_bundle
from models.ich.data import (Case, augment, augmentation, calcified_seed, matrix_of_seed,
                             phantom_case, window_jitter)
from models.ich.networks import IN_CHANNELS, build_network, triage_input
from models.preprocess.transforms import model_input, neighbour_offset, window_channels
from models.results import LABELS

log = logging.getLogger(__name__)

TRAIN_BASE, VAL_BASE, TEST_BASE = 1, 500_000, 900_000
LABEL_WEIGHTS = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 2.0])  # "any" counts twice (RSNA metric)
VERSION = "0.1.0"


@dataclass
class TrainConfig:
    kind: str  # triage | segment
    out: Path
    studies: int = 160
    val_studies: int = 40
    epochs: int = 6
    seed: int = 0
    matrix: int = 128
    thickness: float | None = 5.0
    spacing_mm: float = 2.0  # model grid: 2 mm pixels, a 224 mm window holds any cranial cavity
    size: int = 112
    lr: float = 2e-3
    batch_studies: int = 2
    slices_per_study: int = 10  # segmentation: slices drawn from each augmented study
    target_sensitivity: float = 0.95
    cache_dir: Path | None = None
    dataset: str = "phantom"  # phantom | rsna:DIR | physionet:DIR | hichit:DIR
    threads: int = 2
    max_minutes: float | None = None  # stop early (still calibrated and saved) after this long
    network: dict = field(default_factory=dict)
    segment_bundle: Path | None = None  # triage: the segmenter whose probabilities it sees (None = demo)
    init: Path | None = None  # start from this bundle's weights (fine-tuning) instead of random
    hard_mining: float = 0.0  # segment: draw studies by (running loss)^this; 0 = off
    # Share of training phantoms given basal ganglia and falx calcifications (hemorrhage
    # mimics: the population draws them in 5-30 % of heads).
    calcified_share: float = 0.0
    # Phantom matrices drawn per training seed (empty = ``matrix`` for all). Validation and
    # evaluation stay at ``matrix``.
    matrices: tuple[int, ...] = ()
    # triage: keep the --init bundle's slice encoder and retrain only the study stage (GRU and
    # heads) on its frozen features; an encoder pass per study is cheap, so many more studies
    # fit in minutes of CPU.
    study_stage_only: bool = False

    @property
    def frame_args(self) -> dict:
        return {"spacing_mm": self.spacing_mm, "size": self.size}


ProgressFn = Callable[[Iterable, str, int], Iterable]


def _plain_progress(items: Iterable, description: str, total: int) -> Iterable:
    return items


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


# ----- data -----------------------------------------------------------------------------------
def phantom_seeds(split: str, n: int) -> list[int]:
    base = {"train": TRAIN_BASE, "val": VAL_BASE, "test": TEST_BASE}[split]
    if n > 300_000:
        raise ValueError("at most 300000 phantom studies per split (seed ranges must not overlap)")
    return [base + i for i in range(n)]


def split_of(key: str, val_share: float = 0.15, test_share: float = 0.15) -> str:
    """Deterministic train/val/test split of dataset cases by a hash of their key."""
    u = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if u < test_share else "val" if u < test_share + val_share else "train"


def load_cases(cfg: TrainConfig, split: str, n: int, progress: ProgressFn = _plain_progress) -> list[Case]:
    if cfg.dataset == "phantom":
        seeds = phantom_seeds(split, n)
        # Calcification mimics only where the model learns: validation and evaluation keep the
        # population's rates.
        share = cfg.calcified_share if split == "train" else 0.0
        matrices = cfg.matrices if split == "train" else ()
        return [phantom_case(s, cfg.frame_args, matrix_of_seed(s, cfg.matrix, matrices),
                             cfg.thickness, cfg.cache_dir, calcified_seed(s, share))
                for s in progress(seeds, f"phantoms ({split})", len(seeds))]
    from models.ich import datasets

    kind, _, root = cfg.dataset.partition(":")
    cases = [c for c in datasets.read_dataset(kind, Path(root), cfg.frame_args)
             if split_of(c.key) == split]
    return cases[:n] if n else cases


# ----- shared helpers -------------------------------------------------------------------------
def _batch_input(cases: list[Case], transform, rng: np.random.Generator):
    """Augment each study and build (B, K, 9, H, W), valid (B, K), seg (B, K, H, W) tensors."""
    inputs, segs = [], []
    for case in cases:
        hu, seg = augment(case, transform)
        inputs.append(model_input(hu, case.slice_mm, window_jitter(hu.shape[0], rng)))
        segs.append(seg)
    return inputs, segs


def _sampling_weights(cases: list[Case]) -> np.ndarray:
    """Rarer labels get their studies drawn more often (class imbalance by sampling)."""
    labels = np.stack([c.study_labels for c in cases])
    freq = labels.mean(axis=0).clip(1e-3, None)
    weights = 1.0 + (labels[:, :-1] * (1.0 / freq[:-1]) ** 0.5).sum(axis=1)
    return weights / weights.sum()


def _schedule(opt, total_steps: int):
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opt.param_groups[0]["lr"],
                                               total_steps=max(total_steps, 2), pct_start=0.15)


def _save_checkpoint(out: Path, epoch: int, network, opt, score: float) -> None:
    folder = out / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": epoch, "network": network.state_dict(), "optimizer": opt.state_dict(),
                "score": score}, folder / f"epoch{epoch:03d}.pt")


def _metadata(cfg: TrainConfig, n_train: int, n_val: int, val_metrics: dict, seconds: float) -> dict:
    return {
        "trained_with": " ".join(["ichnode", *sys.argv[1:]]) if "train" in sys.argv
        else f"ichnode train {cfg.kind}",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
                   if k not in ("out", "cache_dir")},
        "data": (f"synthetic phantoms (models.phantom), train seeds {TRAIN_BASE}.., "
                 f"validation seeds {VAL_BASE}..; evaluation uses seeds {TEST_BASE}.. only")
        if cfg.dataset == "phantom" else f"dataset {cfg.dataset.split(':')[0]} (hash split)",
        "train_studies": n_train, "val_studies": n_val,
        "validation": val_metrics, "train_seconds": round(seconds, 1),
        "torch": torch.__version__, "python": platform.python_version(),
        "intended_use": "research and integration testing only; NOT FOR CLINICAL USE",
    }


# ----- triage ---------------------------------------------------------------------------------
def _pad_stack(inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    k = max(x.shape[0] for x in inputs)
    batch = torch.zeros((len(inputs), k, *inputs[0].shape[1:]))
    valid = torch.zeros((len(inputs), k), dtype=torch.bool)
    for b, x in enumerate(inputs):
        batch[b, :x.shape[0]] = x
        valid[b, :x.shape[0]] = True
    return batch, valid


@torch.no_grad()
def _with_prior(x: torch.Tensor, network, segmenter) -> torch.Tensor:
    """Add the segmenter's probabilities to the image channels when the triage model wants them."""
    in_ch = network.in_channels
    probs = torch.softmax(segmenter(x), dim=1) if segmenter is not None and in_ch > x.shape[1] else None
    return triage_input(x, probs, in_ch)


@torch.no_grad()
def triage_logits(network, cases: list[Case], segmenter=None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Study logits (N, 6) and per-slice logits of each case, no augmentation."""
    network.eval()
    study, slices = [], []
    for case in cases:
        x = _with_prior(model_input(case.hu, case.slice_mm), network, segmenter)
        s_logits, st_logits = network(x[None])
        study.append(st_logits[0].numpy())
        slices.append(s_logits[0].numpy())
    return np.stack(study), slices


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature that minimises the validation log loss of one label (grid + refine)."""
    z = torch.from_numpy(logits).float()
    y = torch.from_numpy(labels).float()
    grid = np.exp(np.linspace(np.log(0.25), np.log(8.0), 61))
    losses = [F.binary_cross_entropy_with_logits(z / t, y).item() for t in grid]
    return float(grid[int(np.argmin(losses))])


def operating_threshold(probs: np.ndarray, labels: np.ndarray, sensitivity: float) -> float:
    """A threshold whose validation sensitivity is at least ``sensitivity``, with the widest margin.

    Every threshold between the positive at the sensitivity quantile and the highest negative
    below it has the same validation sensitivity and specificity; the midpoint (in logit space)
    is the one least likely to drop new positives. (The highest such threshold, used before,
    sat right under a validation positive: a few dozen positives on held-out data then lost
    sensitivity to slightly less confident studies.)
    """
    pos = np.sort(probs[labels > 0.5])
    if len(pos) == 0:
        return 0.5
    idx = int(np.floor((1.0 - sensitivity) * len(pos)))
    upper = float(np.clip(pos[idx] - 1e-6, 1e-6, 1 - 1e-6))
    neg = probs[(labels <= 0.5) & (probs < upper)]
    threshold = upper
    if neg.size:
        lower = float(np.clip(neg.max(), 1e-6, 1 - 1e-6))
        threshold = float(expit((logit(upper) + logit(lower)) / 2))
    return float(max(1e-4, min(threshold, 0.99)))


def calibrate(network, val: list[Case], sensitivity: float, segmenter=None) -> tuple[dict, dict, dict]:
    """Per-label temperatures and thresholds from validation data, plus validation AUCs."""
    from sklearn.metrics import roc_auc_score

    logits, _ = triage_logits(network, val, segmenter)
    labels = np.stack([c.study_labels for c in val])
    temps, thresholds, aucs = {}, {}, {}
    for n, label in enumerate(LABELS):
        # A label without both classes in validation cannot be calibrated: leave it at 1.
        both = 0 < labels[:, n].sum() < len(labels)
        temps[label] = fit_temperature(logits[:, n], labels[:, n]) if both else 1.0
        probs = 1 / (1 + np.exp(-logits[:, n] / temps[label]))
        thresholds[label] = operating_threshold(probs, labels[:, n], sensitivity)
        if 0 < labels[:, n].sum() < len(labels):
            aucs[label] = round(float(roc_auc_score(labels[:, n], probs)), 4)
    return temps, thresholds, aucs


def calibration_config(network, val: list[Case], sensitivity: float,
                       segmenter=None) -> tuple[dict, dict]:  # noqa: ANN001
    """The triage bundle's config entries chosen on validation (calibration, thresholds,
    operating point), and the validation AUCs."""
    temps, thresholds, aucs = calibrate(network, val, sensitivity, segmenter)
    return {"calibration": {"method": "temperature", "temperature": temps},
            "thresholds": thresholds,
            "operating_point": {"sensitivity": sensitivity, "chosen_on": "validation",
                                "validation_studies": len(val)}}, aucs


def cascade_segmenter(network, segment_bundle: Path | None, frame_args: dict):  # noqa: ANN001
    """The segment bundle whose probabilities this triage network takes as input (None if it
    reads images only); it must share the triage model's grid."""
    if network.in_channels <= IN_CHANNELS:
        return None
    from models.ich.bundle import load_bundle

    bundle = load_bundle(segment_bundle, "segment")
    if bundle.frame != frame_args:
        raise ValueError(f"segment bundle frame {bundle.frame} differs from {frame_args}")
    return bundle


def _initial_network(cfg: TrainConfig):
    network = build_network(cfg.kind, cfg.network)
    if cfg.init:
        from models.ich.bundle import load_bundle

        start = load_bundle(cfg.init, cfg.kind).network
        network.load_state_dict(start.state_dict())
        log.info("%s: starting from %s", cfg.kind, cfg.init)
    return network


def _train_val(cfg: TrainConfig, progress: ProgressFn, cases) -> tuple[list[Case], list[Case]]:
    if cases is not None:  # given directly (tests, notebooks)
        return list(cases[0]), list(cases[1])
    return (load_cases(cfg, "train", cfg.studies, progress),
            load_cases(cfg, "val", cfg.val_studies, progress))


def _slice_sample(cases: list[Case], n: int, rng: np.random.Generator, transform,
                  positive_share: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """n augmented 2.5D slices (n, 9, H, W) with labels (n, 6); half from bleeding slices.

    Only the three slices a sample needs are augmented (not the whole study): cheap on CPUs.
    Bleeding slices are drawn with weights that favour rare subtypes (class imbalance).
    """
    pool = [(c, k) for c in cases if c.slice_labels is not None
            for k in np.nonzero(c.slice_labels[:, -1] > 0.5)[0]]
    if pool:
        labels = np.stack([c.slice_labels[k] for c, k in pool])
        freq = labels[:, :-1].mean(axis=0).clip(1e-3, None)
        w = 1.0 + (labels[:, :-1] / freq).sum(axis=1)
        w /= w.sum()
    xs, ys = [], []
    for _ in range(n):
        if pool and rng.random() < positive_share:
            case, k = pool[rng.choice(len(pool), p=w)]
        else:
            case = cases[rng.integers(len(cases))]
            k = int(rng.integers(case.hu.shape[0]))
        o = neighbour_offset(case.slice_mm)
        idx = np.clip([k - o, k, k + o], 0, case.hu.shape[0] - 1)
        three = Case(case.key, case.hu[idx], case.slice_mm, case.study_labels)
        hu, _ = augment(three, transform)
        x = window_channels(hu, window_jitter(3, rng)).reshape(-1, *hu.shape[1:])
        xs.append(x)
        y = case.slice_labels[k] if case.slice_labels is not None else case.study_labels
        ys.append(torch.from_numpy(np.asarray(y, np.float32)))
    return torch.stack(xs), torch.stack(ys)


@torch.no_grad()
def _study_features(network, cases: list[Case], transform, rng, augmented: int,
                    segmenter=None) -> list[tuple]:
    """Encoder features (K, F) of each study: once as is, ``augmented`` times augmented."""
    network.eval()
    out = []
    for case in cases:
        versions = [torch.from_numpy(case.hu.astype(np.float32))]
        versions += [augment(case, transform)[0] for _ in range(augmented)]
        for n, hu in enumerate(versions):
            jitter = window_jitter(hu.shape[0], rng) if n else None
            x = _with_prior(model_input(hu, case.slice_mm, jitter), network, segmenter)
            feats = network.encoder(x)
            out.append((feats, case))
    return out


def train_triage(cfg: TrainConfig, progress: ProgressFn = _plain_progress, cases=None) -> Path:
    """Two stages, as the RSNA 2019 winners did: (1) the slice CNN on sampled 2.5D slices,
    (2) the GRU and heads on frozen slice features of whole studies. Then calibration.
    ``study_stage_only`` skips (1) and keeps the ``init`` bundle's slice CNN."""
    seed_everything(cfg.seed)
    torch.set_num_threads(cfg.threads)
    train, val = _train_val(cfg, progress, cases)
    if not train or not val:
        raise ValueError("no training or validation cases")
    if cfg.study_stage_only and cfg.init is None:
        raise ValueError("--study-stage-only needs --init: a bundle whose slice encoder is kept")
    network = _initial_network(cfg)
    seg_bundle = cascade_segmenter(network, cfg.segment_bundle, cfg.frame_args)
    segmenter = seg_bundle.network.eval() if seg_bundle is not None else None
    rng = np.random.default_rng(cfg.seed)
    transform = augmentation(cfg.seed)
    start = time.time()
    if not cfg.study_stage_only:
        _train_slice_stage(cfg, network, train, segmenter, rng, transform, progress, start)
    _train_study_stage(cfg, network, train, segmenter, rng, transform, progress)
    network.eval()
    calibration, aucs = calibration_config(network, val, cfg.target_sensitivity, segmenter)
    log.info("triage validation AUC %s", json.dumps(aucs))
    spec = BundleSpec(
        kind="triage", name="ichnode-triage-demo" if cfg.dataset == "phantom" else "ichnode-triage",
        version=VERSION, network=cfg.network, frame=cfg.frame_args,
        extra={"labels": list(LABELS), "inputs": "image+segmentation" if segmenter is not None
               else "image", "segment_sha256": seg_bundle.sha256 if segmenter is not None else None,
               **calibration},
        metadata=_metadata(cfg, len(train), len(val), {"study_auc": aucs}, time.time() - start))
    return save_bundle(cfg.out, spec, network)


def _train_slice_stage(cfg: TrainConfig, network, train: list[Case], segmenter, rng, transform,
                       progress: ProgressFn, start: float) -> None:
    """Stage 1: the slice CNN and its auxiliary head on sampled, augmented 2.5D slices."""
    budget = (cfg.max_minutes or 1e9) * 60
    slice_labels = np.concatenate([c.slice_labels for c in train if c.slice_labels is not None])
    freq = slice_labels.mean(0)
    pos_weight = torch.from_numpy(np.sqrt((1 - freq) / freq.clip(1e-3))).float().clamp(1, 4)
    steps = max(1, len(train) * cfg.epochs // 4)
    params = list(network.encoder.parameters()) + list(network.slice_aux.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    sched = _schedule(opt, steps)
    stage1_share = 0.8  # of the time budget
    for step in progress(range(steps), "triage stage 1 (slices)", steps):
        network.train()
        x, y = _slice_sample(train, 24, rng, transform)
        x = _with_prior(x, network, segmenter)
        logits = network.slice_aux(network.encoder(x))
        loss = (F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight,
                                                   reduction="none") * LABEL_WEIGHTS).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if time.time() - start > stage1_share * budget:
            break
    _save_checkpoint(cfg.out, 0, network, opt, float(loss.detach()))


def _train_study_stage(cfg: TrainConfig, network, train: list[Case], segmenter, rng, transform,
                       progress: ProgressFn) -> None:
    """Stage 2: the GRU and heads over frozen slice features of whole studies."""
    feats = _study_features(network, train, transform, rng, augmented=1, segmenter=segmenter)
    head_params = [p for n, p in network.named_parameters() if not n.startswith("encoder.")
                   and not n.startswith("slice_aux.")]
    opt = torch.optim.AdamW(head_params, lr=cfg.lr, weight_decay=1e-4)
    steps2 = max(20, len(feats) * 3)
    sched = _schedule(opt, steps2)
    for step in progress(range(steps2), "triage stage 2 (studies)", steps2):
        network.train()
        network.encoder.eval()
        picked = [feats[i] for i in rng.choice(len(feats), min(8, len(feats)), replace=False)]
        x, valid = _pad_stack([f for f, _ in picked])
        slice_logits, study_logits = network.sequence(x, valid)
        y_study = torch.from_numpy(np.stack([c.study_labels for _, c in picked]))
        loss = F.binary_cross_entropy_with_logits(study_logits, y_study, weight=LABEL_WEIGHTS)
        y_slice = torch.zeros(slice_logits.shape)
        mask = torch.zeros(valid.shape, dtype=torch.bool)
        for b, (_, c) in enumerate(picked):
            if c.slice_labels is not None:
                y_slice[b, :len(c.slice_labels)] = torch.from_numpy(c.slice_labels)
                mask[b, :len(c.slice_labels)] = True
        if mask.any():
            loss = loss + (F.binary_cross_entropy_with_logits(
                slice_logits[mask], y_slice[mask], reduction="none") * LABEL_WEIGHTS).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    _save_checkpoint(cfg.out, 1, network, opt, float(loss.detach()))


# ----- segmentation ---------------------------------------------------------------------------
def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    total = int(a.sum()) + int(b.sum())
    return None if total == 0 else 2.0 * int((a & b).sum()) / total


@torch.no_grad()
def segment_cases(network, cases: list[Case]) -> list[np.ndarray]:
    network.eval()
    return [network(model_input(c.hu, c.slice_mm)).argmax(1).numpy().astype(np.uint8) for c in cases]


def validate_segmentation(network, val: list[Case]) -> dict:
    preds = segment_cases(network, val)
    out = {}
    for name, label in (("hematoma", 1), ("ventricle_left", 2), ("ventricle_right", 3)):
        scores = [dice(p == label, c.seg == label) for p, c in zip(preds, val)
                  if c.seg is not None and (c.seg == label).any()]
        scores = [s for s in scores if s is not None]
        out[f"dice_{name}"] = round(float(np.mean(scores)), 4) if scores else None
    return out


def _pick_slices(seg: torch.Tensor, n: int, rng: np.random.Generator) -> np.ndarray:
    """Mostly slices with hematoma or ventricles (the rare foreground), some background ones."""
    k = seg.shape[0]
    fg = np.nonzero((seg == 1).flatten(1).any(1).numpy())[0]
    vent = np.nonzero((seg > 1).flatten(1).any(1).numpy())[0]
    picks = list(rng.choice(fg, min(len(fg), n // 2), replace=False)) if len(fg) else []
    if len(vent):
        picks += list(rng.choice(vent, min(len(vent), n // 4), replace=False))
    picks += list(rng.choice(k, max(0, n - len(picks)), replace=k < n - len(picks)))
    return np.unique(np.array(picks, dtype=int))


class HardExamples:
    """Online hard-example sampling: each study's running training loss (EMA) raises its chance
    of being drawn, so studies the network still gets wrong (thin or isodense subdurals, sparse
    subarachnoid blood) are seen more often than the ones it has learnt. Unseen studies count
    as average; ``power`` 0 turns it off."""

    def __init__(self, n: int, power: float, decay: float = 0.7):
        self.loss = np.full(n, np.nan)
        self.power, self.decay = power, decay

    def weighted(self, base: np.ndarray) -> np.ndarray:
        seen = self.loss[~np.isnan(self.loss)]
        if self.power <= 0 or seen.size == 0:
            w = base.astype(float)
        else:
            level = np.where(np.isnan(self.loss), seen.mean(), self.loss) / max(seen.mean(), 1e-6)
            w = base * np.clip(level, 0.25, 4.0) ** self.power
        return w / w.sum()

    def update(self, indices, losses: list[float]) -> None:
        for i, value in zip(indices, losses):
            old = self.loss[i]
            self.loss[i] = value if np.isnan(old) else self.decay * old + (1 - self.decay) * value


def train_segment(cfg: TrainConfig, progress: ProgressFn = _plain_progress, cases=None) -> Path:
    seed_everything(cfg.seed)
    torch.set_num_threads(cfg.threads)
    train, val = _train_val(cfg, progress, cases)
    train = [c for c in train if c.seg is not None]
    val = [c for c in val if c.seg is not None]
    if not train or not val:
        raise ValueError("no training or validation cases with masks")
    network = _initial_network(cfg)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True,
                         weight=torch.tensor([0.5, 3.0, 1.0, 1.0]))
    opt = torch.optim.AdamW(network.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps_per_epoch = max(1, len(train) // cfg.batch_studies)
    sched = _schedule(opt, steps_per_epoch * cfg.epochs)
    rng = np.random.default_rng(cfg.seed)
    transform = augmentation(cfg.seed)
    weights = np.array([2.0 if (c.seg == 1).any() else 1.0 for c in train])
    difficulty = HardExamples(len(train), cfg.hard_mining)
    start = time.time()
    best = (-1.0, None, {})
    for epoch in progress(range(cfg.epochs), "segment epochs", cfg.epochs):
        network.train()
        for _ in range(steps_per_epoch):
            chosen = rng.choice(len(train), cfg.batch_studies, p=difficulty.weighted(weights))
            inputs, segs = _batch_input([train[i] for i in chosen], transform, rng)
            losses = []
            for x, seg in zip(inputs, segs):  # one loss per study: its difficulty is tracked
                idx = _pick_slices(seg, cfg.slices_per_study, rng)
                losses.append(loss_fn(network(x[idx]), seg[idx][:, None]))
            difficulty.update(chosen, [float(v.detach()) for v in losses])
            loss = torch.stack(losses).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 5.0)
            opt.step()
            sched.step()
        metrics = validate_segmentation(network, val)
        score = np.mean([v for v in metrics.values() if v is not None] or [0.0])
        _save_checkpoint(cfg.out, epoch, network, opt, float(score))
        log.info("segment epoch %d: validation %s", epoch, json.dumps(metrics))
        if score >= best[0]:
            best = (float(score), {k: v.clone() for k, v in network.state_dict().items()}, metrics)
        if cfg.max_minutes and time.time() - start > cfg.max_minutes * 60:
            break
    network.load_state_dict(best[1])
    spec = BundleSpec(
        kind="segment", name="ichnode-segment-demo" if cfg.dataset == "phantom" else "ichnode-segment",
        version=VERSION, network=cfg.network, frame=cfg.frame_args,
        extra={"classes": ["background", "hematoma", "ventricle_left", "ventricle_right"]},
        metadata=_metadata(cfg, len(train), len(val), best[2], time.time() - start))
    return save_bundle(cfg.out, spec, network)


def train(cfg: TrainConfig, progress: ProgressFn = _plain_progress, cases=None) -> Path:
    if cfg.kind == "triage":
        return train_triage(cfg, progress, cases)
    if cfg.kind == "segment":
        return train_segment(cfg, progress, cases)
    raise ValueError(f"unknown model kind {cfg.kind!r}")
