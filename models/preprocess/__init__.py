"""Preprocessing shared by training and inference: DICOM series -> Volume, model-frame transforms."""

from models.preprocess.series import SeriesError, load_series

__all__ = ["SeriesError", "load_series"]
