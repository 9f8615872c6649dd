"""ichnode node: DICOM intake (SCP), index, study assembly, job outbox, sending (SCU), admin CLI."""

__version__ = "0.1.0"
