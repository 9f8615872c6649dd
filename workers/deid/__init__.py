"""De-identification in the PHI zone: DICOM header profile, pseudonyms, defacing, previews.

* :mod:`workers.deid.pseudonyms` — the node secret, HMAC pseudonyms, ``2.25`` UIDs, date shift,
  the original <-> pseudonym rows in the index.
* :mod:`workers.deid.header` — PS3.15 Annex E Basic Application Level Confidentiality Profile with
  the Retain Longitudinal Temporal Information (Modified Dates) and Retain Patient
  Characteristics options.
* :mod:`workers.deid.deface` — the MosMed method and ichnode's 3D brain-safe method.
* :mod:`workers.deid.series` — a defaced, de-identified copy of a DICOM series.
* :mod:`workers.deid.preview` — before/after renderings.
"""
