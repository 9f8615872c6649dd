"""Model bundles: a folder that fully describes one model, so weights swap without code changes.

Layout (MONAI-bundle-like, flattened)::

    config.json    name, version, kind (triage|segment), network kwargs, model frame
                   (spacing_mm, size), calibration (per-label temperature), thresholds and
                   the sensitivity they were chosen for; optionally ``spacing_bands``: the
                   same three chosen on validation studies of one in-plane pixel-spacing
                   range (a 512 x 512 scan reads differently from a 128 x 128 one)
    model.pt       state dict (loaded with ``weights_only=True``)   -- or --
    model.ts       TorchScript module (a hospital's own export)
    metadata.json  sha256 of the weights file, training command, data, metrics
    MODEL_CARD.md  human description ("not for clinical use" for demo weights)

The sha256 in metadata.json is verified on every load; a mismatch is a :class:`BundleError`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from models.ich.networks import build_network

DEMO_ROOT = Path(__file__).resolve().parent.parent / "weights"
WEIGHT_FILES = ("model.pt", "model.ts")


class BundleError(ValueError):
    """A model folder that cannot be used (missing file, bad config, checksum mismatch)."""


@dataclass
class Bundle:
    path: Path
    config: dict
    metadata: dict
    network: nn.Module
    sha256: str
    weights_file: str

    @property
    def name(self) -> str:
        return str(self.config.get("name", self.path.name))

    @property
    def version(self) -> str:
        return str(self.config.get("version", "0"))

    @property
    def frame(self) -> dict:
        return self.config.get("frame", {"spacing_mm": 2.0, "size": 128})

    def operating_point(self, pixel_mm: float | None) -> OperatingPoint:
        """Temperatures and thresholds for a series of in-plane pixel spacing ``pixel_mm``: those
        of the spacing band that holds it (a band without its own temperatures keeps the
        default ones), else the bundle's default ones."""
        default = OperatingPoint.of(self.config, "default")
        for band in self.config.get("spacing_bands", []):
            lo, hi = band["pixel_spacing_mm"]
            if pixel_mm is not None and lo <= pixel_mm < hi:
                own = OperatingPoint.of(band, f"pixel spacing {lo:g}-{hi:g} mm")
                return replace(own, temperatures=own.temperatures or default.temperatures)
        return default


@dataclass(frozen=True)
class OperatingPoint:
    """Calibration temperatures and operating thresholds per label, and where they came from."""

    temperatures: dict
    thresholds: dict
    band: str

    @classmethod
    def of(cls, entry: dict, band: str) -> "OperatingPoint":
        return cls(dict(entry.get("calibration", {}).get("temperature", {})),
                   dict(entry.get("thresholds", {})), band)


@dataclass
class BundleSpec:
    """What :func:`save_bundle` writes besides the weights."""

    kind: str
    name: str
    version: str
    network: dict = field(default_factory=dict)
    frame: dict = field(default_factory=lambda: {"spacing_mm": 2.0, "size": 128})
    extra: dict = field(default_factory=dict)  # calibration, thresholds, ...
    metadata: dict = field(default_factory=dict)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_bundle_path(kind: str) -> Path:
    return DEMO_ROOT / kind


def save_bundle(folder: Path, spec: BundleSpec, network: nn.Module) -> Path:
    """Write config.json, model.pt and metadata.json (with the weights' sha256)."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "model.pt"
    # Half precision halves the demo bundles; fp32 is restored on load.
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in network.state_dict().items()}
    torch.save(state, weights)
    config = {"name": spec.name, "version": spec.version, "kind": spec.kind,
              "network": spec.network, "frame": spec.frame, "weights": weights.name, **spec.extra}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    metadata = {**spec.metadata, "sha256": sha256_file(weights), "weights": weights.name}
    (folder / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return folder


def load_bundle(folder: Path | None, kind: str, device: torch.device | str = "cpu") -> Bundle:
    """Load and verify a bundle; ``folder`` None = the demo bundle shipped in models/weights/."""
    folder = Path(folder) if folder else default_bundle_path(kind)
    if not folder.is_dir():
        raise BundleError(f"{kind} model folder {folder} does not exist")
    config = _read_json(folder / "config.json")
    metadata = _read_json(folder / "metadata.json")
    if config.get("kind", kind) != kind:
        raise BundleError(f"{folder}: is a {config.get('kind')} model, not {kind}")
    weights_name = config.get("weights") or next(
        (n for n in WEIGHT_FILES if (folder / n).exists()), None)
    if not weights_name or not (folder / weights_name).is_file():
        raise BundleError(f"{folder}: no weights file ({' or '.join(WEIGHT_FILES)})")
    weights = folder / weights_name
    actual = sha256_file(weights)
    expected = str(metadata.get("sha256", "")).lower()
    if not expected:
        raise BundleError(f"{folder}: metadata.json has no sha256 for {weights_name}")
    if actual != expected:
        raise BundleError(f"{folder}: checksum mismatch for {weights_name} "
                          f"(expected {expected[:12]}..., found {actual[:12]}...)")
    _check_spacing_bands(folder, config.get("spacing_bands", []))
    network = _load_network(weights, config, kind, device)
    return Bundle(folder, config, metadata, network, actual, weights_name)


def _load_network(weights: Path, config: dict, kind: str, device) -> nn.Module:
    try:
        if weights.suffix == ".ts":
            network = torch.jit.load(str(weights), map_location=device)
        else:
            network = build_network(kind, config.get("network"))
            state = torch.load(weights, map_location="cpu", weights_only=True)
            network.load_state_dict({k: v.float() if v.is_floating_point() else v
                                     for k, v in state.items()})
            network = network.to(device)
    except (RuntimeError, ValueError, TypeError, OSError) as exc:
        raise BundleError(f"{weights}: cannot load weights ({str(exc).splitlines()[0]})") from exc
    return network.eval()


def _check_spacing_bands(folder: Path, bands) -> None:  # noqa: ANN001
    """A malformed band would silently fall back to the default thresholds: refuse it."""
    if not isinstance(bands, list):
        raise BundleError(f"{folder}: spacing_bands must be a list")
    for n, band in enumerate(bands):
        rng = band.get("pixel_spacing_mm") if isinstance(band, dict) else None
        ok = (isinstance(rng, list) and len(rng) == 2
              and all(isinstance(v, (int, float)) for v in rng) and 0 <= rng[0] < rng[1]
              and isinstance(band.get("thresholds"), dict))
        if not ok:
            raise BundleError(f"{folder}: spacing_bands[{n}] needs pixel_spacing_mm [low, high] "
                              f"(0 <= low < high) and thresholds")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise BundleError(f"{path.parent}: missing {path.name}") from exc
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: not valid JSON ({exc.msg})") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path}: must be a JSON object")
    return data
