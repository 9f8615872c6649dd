"""The two networks, built from MONAI blocks so that a bundle's config.json can rebuild them.

* :class:`TriageNet` — 2.5D slice encoder (neighbouring slices x windows as channels, plus the
  segmenter's hematoma/ventricle probabilities of the centre slice: a cascade) followed by
  a bidirectional GRU across the slices of a study (the RSNA 2019 winners' recipe, scaled down
  for CPUs): per-slice logits and study logits (attention + max pooling over slices).
* segmentation — MONAI ``UNet`` (2D, per slice, same 2.5D input): background, hematoma, left and
  right lateral ventricle (softmax classes).
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import UNet
from torch import nn

from models.results import LABELS

IN_CHANNELS = 9  # 3 slices x 3 windows
SEG_PRIOR_CHANNELS = 2  # triage also sees the segmenter's hematoma and ventricle probabilities
SEG_CLASSES = ("background", "hematoma", "ventricle_left", "ventricle_right")


class SliceEncoder(nn.Module):
    """Small strided CNN: (N, 9, H, W) -> (N, features). Global avg+max pooling keeps any size."""

    def __init__(self, in_channels: int = IN_CHANNELS, widths: tuple[int, ...] = (16, 24, 32, 48, 64),
                 features: int = 96):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            layers += [Convolution(2, c, w, strides=2, kernel_size=3, norm="batch", act="relu"),
                       Convolution(2, w, w, strides=1, kernel_size=3, norm="batch", act="relu")]
            c = w
        self.body = nn.Sequential(*layers)
        self.proj = nn.Sequential(nn.Linear(2 * c, features), nn.ReLU(inplace=True), nn.Dropout(0.2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        pooled = torch.cat([y.mean(dim=(2, 3)), y.amax(dim=(2, 3))], dim=1)
        return self.proj(pooled)


class TriageNet(nn.Module):
    """(B, K, 9, H, W) + valid-slice mask (B, K) -> slice logits (B, K, 6), study logits (B, 6)."""

    def __init__(self, features: int = 96, hidden: int = 48, n_labels: int = len(LABELS),
                 widths: tuple[int, ...] = (16, 24, 32, 48, 64),
                 in_channels: int = IN_CHANNELS + SEG_PRIOR_CHANNELS):
        super().__init__()
        self.in_channels = in_channels
        self.encoder = SliceEncoder(in_channels, features=features, widths=tuple(widths))
        self.gru = nn.GRU(features, hidden, batch_first=True, bidirectional=True)
        self.slice_head = nn.Linear(features + 2 * hidden, n_labels)
        # Stage-1 head: per-slice labels from the encoder alone (trained on sampled slices).
        self.slice_aux = nn.Linear(features, n_labels)
        self.attention = nn.Linear(2 * hidden, 1)
        self.study_head = nn.Linear(4 * hidden, n_labels)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None):
        b, k = x.shape[:2]
        feats = self.encoder(x.flatten(0, 1)).view(b, k, -1)
        return self.sequence(feats, valid)

    def sequence(self, feats: torch.Tensor, valid: torch.Tensor | None = None):
        """Stage 2: slice features (B, K, F) -> slice logits (B, K, 6), study logits (B, 6)."""
        b, k = feats.shape[:2]
        if valid is None:
            valid = torch.ones((b, k), dtype=torch.bool, device=feats.device)
        context, _ = self.gru(feats)
        slice_logits = self.slice_head(torch.cat([feats, context], dim=-1))
        score = self.attention(context).squeeze(-1).masked_fill(~valid, float("-inf"))
        weights = torch.softmax(score, dim=1).unsqueeze(-1)
        attended = (weights * context).sum(dim=1)
        maxed = context.masked_fill(~valid.unsqueeze(-1), float("-inf")).amax(dim=1)
        study_logits = self.study_head(torch.cat([attended, maxed], dim=-1))
        return slice_logits, study_logits


def build_network(kind: str, kwargs: dict | None = None) -> nn.Module:
    """The network a bundle's config names (``kind`` triage|segment)."""
    kwargs = dict(kwargs or {})
    if kind == "triage":
        return TriageNet(**kwargs)
    if kind == "segment":
        defaults = dict(spatial_dims=2, in_channels=IN_CHANNELS, out_channels=len(SEG_CLASSES),
                        channels=(12, 24, 48, 96), strides=(2, 2, 2), num_res_units=1,
                        norm="batch")
        defaults.update(kwargs)
        defaults["channels"] = tuple(defaults["channels"])
        defaults["strides"] = tuple(defaults["strides"])
        return UNet(**defaults)
    raise ValueError(f"unknown network kind {kind!r} (expected triage or segment)")


def seg_prior(seg_probs: torch.Tensor) -> torch.Tensor:
    """(N, 4, H, W) segmentation softmax -> (N, 2, H, W): hematoma, both ventricles."""
    return torch.stack([seg_probs[:, 1], seg_probs[:, 2] + seg_probs[:, 3]], dim=1)


def triage_input(x: torch.Tensor, seg_probs: torch.Tensor | None, in_channels: int) -> torch.Tensor:
    """Network input of the triage model: image channels, plus the segmentation prior if it uses one."""
    if in_channels == x.shape[1]:
        return x
    if seg_probs is None:
        raise ValueError("this triage model needs segmentation probabilities as input")
    return torch.cat([x, seg_prior(seg_probs)], dim=1)
