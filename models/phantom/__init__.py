"""Synthetic head CT studies with hemorrhage and exact ground truth (the data factory).

    from models.phantom import PhantomSpec, generate_study, write_dicom_series, write_labels
    study = generate_study(PhantomSpec(seed=1, subtypes=("subdural",), slice_thickness_mm=5.0))

See docs/phantom.md for the frames, parameters, DICOM encoding and measured figures.
"""

# Bumped whenever the same seed renders different images or masks, so caches of rendered cases
# expire.
# 2: soft-kernel sharpening no longer rings below the inner table (docs/phantom.md).
# 3: the label masks move with the motion artefact (same images, truer masks).
# 4: hematoma and ventricle masks above the 256 canvas (matrix 512) keep the painted volume
#    (same images, truer masks).
GENERATOR_VERSION = 4

from models.phantom.generate import MASK_NAMES, PhantomStudy, generate_study
from models.phantom.spec import SUBTYPES, PhantomSpec

__all__ = ["GENERATOR_VERSION", "MASK_NAMES", "SUBTYPES", "PhantomSpec", "PhantomStudy",
           "generate_study", "write_dicom_series", "write_labels", "write_localizer"]


def __getattr__(name):  # writers import pydicom: load them only when used
    if name in ("write_dicom_series", "write_localizer"):
        from models.phantom import dicom

        return getattr(dicom, name)
    if name == "write_labels":
        from models.phantom.labels import write_labels

        return write_labels
    raise AttributeError(name)
