"""From a Volume on its original grid to the model's view of it, and back for masks.

The model frame (``ModelFrame``) is the same for training and inference:

1. **canonical orientation** from the affine (i.e. from Image Orientation (Patient)): array axes
   (k, row, column) run inferior->superior, anterior->posterior and patient right->left (the
   radiological display). A head stored rotated 90° or mirrored therefore reads the same.
   Only axis permutations/flips are used: exact, no interpolation. The slice axis must already
   be the head's foot-head axis (axial series); gantry tilt stays in the slice plane.
2. **in-plane resampling** to ``spacing_mm`` (slices are kept: per-slice outputs map 1:1 to the
   original instances).
3. **crop/pad** to a fixed ``size`` x ``size`` field of view centred on the head.

:meth:`ModelFrame.masks_to_original` maps per-class probabilities back (uncrop, bilinear
upsampling of probabilities, argmax, inverse orientation), so the masks lie on the original
grid that SEG references. Windowing (:func:`window_channels`) and 2.5D stacking
(:func:`stack_25d`) give the network input.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel.orientations as nio
import numpy as np
import torch
import torch.nn.functional as F

from models.preprocess.series import SeriesError
from models.volume import Volume

# (level, width) in HU: brain, subdural, bone (RSNA-style 3-channel input).
WINDOWS: tuple[tuple[float, float], ...] = ((40.0, 80.0), (80.0, 200.0), (600.0, 2800.0))
CANONICAL = np.array([[0, 1], [1, 1], [2, 1]])  # i -> +L(x), j -> +P(y), k -> +S(z) in LPS
HEAD_HU = -300.0  # above this is tissue (skin, brain, bone), below is air


@dataclass
class ModelFrame:
    """How one volume maps onto the model grid (kept to map predictions back)."""

    original_shape: tuple[int, int, int]  # (k, j, i) of the original array
    ornt: np.ndarray  # nibabel orientation transform original (i, j, k) -> canonical
    canonical_shape: tuple[int, int, int]  # (k, rows, cols) at native in-plane resolution
    native_spacing: tuple[float, float, float]  # (slice, row, col) mm of the canonical array
    spacing_mm: float  # model in-plane pixel size
    resampled_hw: tuple[int, int]  # in-plane shape after resampling, before crop/pad
    offset: tuple[int, int]  # top-left of the model window in the resampled grid (may be < 0)
    size: int

    # ----- forward -----------------------------------------------------------------------
    @classmethod
    def fit(cls, volume: Volume, spacing_mm: float = 2.0, size: int = 128) -> "ModelFrame":
        canon, ornt = _canonical(volume.hu, volume.affine)
        cols = np.linalg.norm(volume.affine[:3, :3], axis=0)  # i, j, k step lengths
        perm = ornt[:, 0].astype(int)  # original axis a goes to canonical axis perm[a]
        spacing_ijk = np.empty(3)
        spacing_ijk[perm] = cols
        native = (float(spacing_ijk[2]), float(spacing_ijk[1]), float(spacing_ijk[0]))
        h, w = canon.shape[1:]
        rh = max(1, int(round(h * native[1] / spacing_mm)))
        rw = max(1, int(round(w * native[2] / spacing_mm)))
        # Centre the window on the head (tissue above HEAD_HU over all slices), not the image.
        tissue = (canon > HEAD_HU).any(axis=0)
        if tissue.any():
            rows, columns = np.nonzero(tissue)
            cy = (rows.min() + rows.max() + 1) / 2 * rh / h
            cx = (columns.min() + columns.max() + 1) / 2 * rw / w
        else:
            cy, cx = rh / 2, rw / 2
        offset = (int(round(cy - size / 2)), int(round(cx - size / 2)))
        return cls(tuple(volume.hu.shape), ornt, tuple(canon.shape), native, spacing_mm,
                   (rh, rw), offset, size)

    def canonical(self, array: np.ndarray) -> np.ndarray:
        """An array on the original (k, j, i) grid in canonical orientation (k, rows, cols)."""
        ijk = np.transpose(array, (2, 1, 0))
        out = nio.apply_orientation(ijk, self.ornt)
        return np.ascontiguousarray(np.transpose(out, (2, 1, 0)))

    def original(self, array: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`canonical`."""
        ijk = np.transpose(array, (2, 1, 0))
        out = nio.apply_orientation(ijk, nio.ornt_transform(CANONICAL, self.ornt))
        return np.ascontiguousarray(np.transpose(out, (2, 1, 0)))

    def to_model(self, hu: np.ndarray) -> np.ndarray:
        """Original HU (k, j, i) -> model grid (k, size, size) float32, air outside the image."""
        canon = torch.from_numpy(self.canonical(hu).astype(np.float32))
        resampled = F.interpolate(canon[:, None], size=self.resampled_hw, mode="bilinear",
                                  align_corners=False, antialias=True)[:, 0]
        return _window_crop(resampled, self.offset, self.size, fill=-1000.0).numpy()

    def labels_to_model(self, labels: np.ndarray) -> np.ndarray:
        """An integer label map on the original grid -> model grid (nearest neighbour)."""
        canon = torch.from_numpy(self.canonical(labels).astype(np.float32))
        resampled = F.interpolate(canon[:, None], size=self.resampled_hw, mode="nearest")[:, 0]
        return _window_crop(resampled, self.offset, self.size, fill=0).numpy().astype(np.uint8)

    # ----- inverse -----------------------------------------------------------------------
    def probabilities_to_original(self, probs: torch.Tensor) -> np.ndarray:
        """(C, k, size, size) class probabilities -> label map (k, j, i) uint8 on the original grid.

        Probabilities (not labels) are upsampled so edges land between model pixels; outside
        the model window counts as background (class 0).
        """
        c, k = probs.shape[:2]
        rh, rw = self.resampled_hw
        full = torch.zeros((k, c, rh, rw), dtype=torch.float32)
        full[:, 0] = 1.0
        y0, x0 = self.offset
        sy, sx = max(0, -y0), max(0, -x0)  # source start inside the model window
        dy, dx = max(0, y0), max(0, x0)  # destination start in the resampled grid
        hh = min(self.size - sy, rh - dy)
        ww = min(self.size - sx, rw - dx)
        if hh > 0 and ww > 0:
            full[:, :, dy:dy + hh, dx:dx + ww] = probs.permute(1, 0, 2, 3)[:, :, sy:sy + hh,
                                                                            sx:sx + ww].float()
        labels = np.empty(self.canonical_shape, dtype=np.uint8)
        h, w = self.canonical_shape[1:]
        for start in range(0, k, 8):  # chunks bound the memory of 512x512 upsampling
            up = F.interpolate(full[start:start + 8], size=(h, w), mode="bilinear",
                               align_corners=False)
            labels[start:start + 8] = up.argmax(dim=1).numpy().astype(np.uint8)
        return self.original(labels)

    def slice_values_to_original(self, values: np.ndarray) -> np.ndarray:
        """Per canonical slice values (k, ...) -> per original slice (original k order)."""
        k_axis_flipped = self._k_flipped()
        return values[::-1].copy() if k_axis_flipped else values

    def _k_flipped(self) -> bool:
        # The original k axis (row 2 of ornt) maps to canonical axis 2; flip -1 = reversed.
        return int(self.ornt[2, 1]) == -1

    @property
    def model_spacing(self) -> tuple[float, float, float]:
        return (self.native_spacing[0], self.spacing_mm, self.spacing_mm)


def _canonical(hu: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    start = nio.io_orientation(affine)
    if int(start[2, 0]) != 2:
        raise SeriesError("not an axial series: the slice axis is not the head's foot-head axis")
    ornt = nio.ornt_transform(start, CANONICAL)
    ijk = np.transpose(hu, (2, 1, 0))
    canon = nio.apply_orientation(ijk, ornt)
    return np.transpose(canon, (2, 1, 0)), ornt


def _window_crop(images: torch.Tensor, offset: tuple[int, int], size: int,
                 fill: float) -> torch.Tensor:
    """Cut a size x size window at ``offset`` from (k, h, w), padding with ``fill`` outside."""
    k, h, w = images.shape
    out = torch.full((k, size, size), fill, dtype=images.dtype)
    y0, x0 = offset
    sy, sx = max(0, y0), max(0, x0)
    dy, dx = max(0, -y0), max(0, -x0)
    hh = min(h - sy, size - dy)
    ww = min(w - sx, size - dx)
    if hh > 0 and ww > 0:
        out[:, dy:dy + hh, dx:dx + ww] = images[:, sy:sy + hh, sx:sx + ww]
    return out


def window_channels(hu: torch.Tensor, jitter: torch.Tensor | None = None) -> torch.Tensor:
    """(..., H, W) HU -> (..., 3, H, W) in [0, 1] for the brain, subdural and bone windows.

    ``jitter`` (..., 3, 2) adds offsets to (level, width) per window: augmentation that keeps
    the model from depending on one exact display setting.
    """
    levels = torch.tensor([w[0] for w in WINDOWS], dtype=hu.dtype, device=hu.device)
    widths = torch.tensor([w[1] for w in WINDOWS], dtype=hu.dtype, device=hu.device)
    shape = (*hu.shape[:-2], 3, 1, 1)
    levels = levels.view(*([1] * (hu.dim() - 2)), 3, 1, 1).expand(shape)
    widths = widths.view(*([1] * (hu.dim() - 2)), 3, 1, 1).expand(shape)
    if jitter is not None:
        levels = levels + jitter[..., 0, None, None]
        widths = widths * (1 + jitter[..., 1, None, None])
    x = hu.unsqueeze(-3)
    return ((x - (levels - widths / 2)) / widths).clamp(0.0, 1.0)


def neighbour_offset(slice_spacing_mm: float, context_mm: float = 5.0) -> int:
    """How many slices away the 2.5D neighbours are: about ``context_mm`` whatever the thickness."""
    return max(1, int(round(context_mm / max(slice_spacing_mm, 0.1))))


def stack_25d(channels: torch.Tensor, offset: int = 1) -> torch.Tensor:
    """(K, C, H, W) per-slice channels -> (K, 3*C, H, W): slice k-offset, k, k+offset (edge-clamped)."""
    k = channels.shape[0]
    idx = torch.arange(k)
    below = channels[(idx - offset).clamp(0, k - 1)]
    above = channels[(idx + offset).clamp(0, k - 1)]
    return torch.cat([below, channels, above], dim=1)


def model_input(hu_model: np.ndarray | torch.Tensor, slice_spacing_mm: float,
                jitter: torch.Tensor | None = None) -> torch.Tensor:
    """Model-grid HU (K, H, W) -> network input (K, 9, H, W): 3 neighbouring slices x 3 windows."""
    hu = torch.as_tensor(hu_model, dtype=torch.float32)
    return stack_25d(window_channels(hu, jitter), neighbour_offset(slice_spacing_mm))
