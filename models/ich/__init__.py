"""ICH triage (2.5D CNN + GRU over slices), hematoma/ventricle segmentation (MONAI UNet),
measurements, bundles, training, evaluation and dataset readers.

Entry point for inference: :func:`models.ich.inference.analyze_volume`.
"""
