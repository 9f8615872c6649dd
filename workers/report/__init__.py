"""Results back to PACS: DICOM SEG, TID 1500 SR and a Secondary Capture overlay series.

Everything here runs in the PHI zone against the ORIGINAL CT instances (pydicom datasets), so
the objects land in the patient's study in PACS. :mod:`workers.steps.report` drives it.
"""
