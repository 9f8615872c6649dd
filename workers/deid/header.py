"""DICOM header de-identification: PS3.15 Annex E Basic Application Level Confidentiality Profile.

The action table (Table E.1-1, release 2026c) comes from the maintained ``dicom-anonymizer``
package (KitwareMedical); only its table is used. Its own action functions do not fit: they
remap UIDs randomly per process (not consistent across workers or re-runs), blank dates instead
of shifting them, and act on top-level elements only. ``dicognito`` was considered and not used:
it replaces identities with plausible fake ones but does not follow Table E.1-1 (descriptions,
comments and private tags stay) and has no keyed UID mapping.

Options applied (each recorded in De-identification Method Code Sequence, CID 7050):

* 113100 Basic Application Confidentiality Profile.
* 113107 Retain Longitudinal Temporal Information, Modified Dates: every date is shifted by a
  per-patient offset (times of day kept), so follow-up intervals survive for research while
  calendar dates do not. Birth date/time are still removed (age is kept instead).
* 113108 Retain Patient Characteristics: sex, age, size and weight are kept; age and sex matter
  for triage and for research cohorts and do not identify a person on their own.
* 113102 Clean Recognizable Visual Features, when the pixel data were defaced.

Private attributes are removed (no Retain Safe Private option). Burned-in annotation: a series that
declares ``BurnedInAnnotation`` YES, or a derived/secondary image that does not declare it, is
refused (:class:`BurnedInAnnotationError`), because its text would survive in the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag, Tag

from workers.deid.pseudonyms import Pseudonymizer, shift_da, shift_dt

TABLE_RELEASE = "dicomfields_2026c"
METHOD_NAME = "ichnode PS3.15 E.1 Basic Profile"

# Retain Patient Characteristics Option (PS3.15 E.3.6): the subset we keep.
PATIENT_CHARACTERISTICS = {Tag(0x0010, 0x0040), Tag(0x0010, 0x1010), Tag(0x0010, 0x1020),
                           Tag(0x0010, 0x1030)}  # sex, age, size, weight
# Removed even with the temporal option: a birth date plus age would give back the offset.
ALWAYS_EMPTY = {Tag(0x0010, 0x0030), Tag(0x0010, 0x0032)}  # birth date, birth time
PATIENT_NAME = Tag(0x0010, 0x0010)
PATIENT_ID = Tag(0x0010, 0x0020)
DUMMY_TEXT = "REMOVED"


class BurnedInAnnotationError(ValueError):
    """The pixels may carry burned-in identity: not safe to de-identify automatically."""


@dataclass(frozen=True)
class ProfileOptions:
    retain_modified_dates: bool = True  # 113107
    retain_patient_characteristics: bool = True  # 113108
    defaced: bool = False  # 113102: set by the caller when the pixels were defaced


@dataclass
class DeidReport:
    """What happened to one dataset (no values: safe to log)."""

    removed: int = 0
    emptied: int = 0
    replaced: int = 0
    uids_remapped: int = 0
    dates_shifted: int = 0
    private_removed: int = 0


@lru_cache(maxsize=1)
def action_table() -> tuple[dict[BaseTag, str], tuple[tuple[int, int, int, int, str], ...]]:
    """Table E.1-1 as {tag: action} plus masked repeating-group rows (group, elem, masks, act)."""
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    db = dicom_anonymization_database_selector(TABLE_RELEASE)
    names = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D",
             "X_Z_TAGS": "X/Z", "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D",
             "X_Z_U_STAR_TAGS": "X/Z/U*"}
    exact: dict[BaseTag, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for category, action in names.items():
        for row in db[category]:
            if len(row) == 4:
                masked.append((row[0], row[1], row[2], row[3], action))
            else:
                exact[Tag(row[0], row[1])] = action
    return exact, tuple(masked)


def action_for(tag: BaseTag) -> str | None:
    exact, masked = action_table()
    if tag in exact:
        return exact[tag]
    for group, elem, gmask, emask, action in masked:
        if tag.group & gmask == group & gmask and tag.element & emask == elem & emask:
            return action
    return None


class HeaderDeidentifier:
    """Applies the profile to datasets of one patient/study with one :class:`Pseudonymizer`."""

    def __init__(self, pseudo: Pseudonymizer, options: ProfileOptions | None = None) -> None:
        self.pseudo = pseudo
        self.options = options or ProfileOptions()
        self.uid_map: dict[str, str] = {}  # original -> pseudonym, for the index

    def check_burned_in(self, ds: Dataset) -> None:
        declared = str(ds.get("BurnedInAnnotation", "")).upper()
        image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
        if declared == "YES":
            raise BurnedInAnnotationError("instance declares BurnedInAnnotation YES")
        if not declared and image_type[:1] == ["DERIVED"] and "SECONDARY" in image_type:
            raise BurnedInAnnotationError(
                "secondary capture without BurnedInAnnotation: may carry burned-in text")

    def deidentify(self, ds: Dataset) -> DeidReport:
        """De-identify ``ds`` (and its file meta) in place."""
        self.check_burned_in(ds)
        report = DeidReport()
        patient_id = str(ds.get("PatientID", "") or "")
        shift = self.pseudo.shift_days(patient_id or str(ds.get("StudyInstanceUID", "")))
        before = sum(1 for _ in _iter_private(ds))
        ds.remove_private_tags()  # recursive (walks sequences)
        report.private_removed = before
        self._clean(ds, shift, report)
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            if "MediaStorageSOPInstanceUID" in meta:
                meta.MediaStorageSOPInstanceUID = self._uid(str(meta.MediaStorageSOPInstanceUID))
        pseudo_pid = self.pseudo.patient_id(patient_id) if patient_id else ""
        ds.PatientID = pseudo_pid
        # A dummy name (Z allows one) so PACS lists show a label; PN form "family^given".
        ds.PatientName = pseudo_pid.replace("-", "^")
        self._mark(ds, shift)
        return report

    # -- the walk ---------------------------------------------------------------------------
    def _clean(self, ds: Dataset, shift: int, report: DeidReport) -> None:
        for elem in list(ds):
            action = action_for(elem.tag)
            if elem.VR == "SQ":
                self._clean_sequence(ds, elem, action, shift, report)
            elif action is not None:
                self._apply(ds, elem, action, shift, report)

    def _clean_sequence(self, ds: Dataset, elem: DataElement, action: str | None, shift: int,
                        report: DeidReport) -> None:
        if action is None or action == "X/Z/U*":
            # Not identifying in itself (or a reference sequence): clean what is inside,
            # remapping referenced UIDs so references stay consistent within the study.
            for item in elem.value or []:
                self._clean(item, shift, report)
        elif action.startswith("X"):
            del ds[elem.tag]
            report.removed += 1
        else:  # Z, D, Z/D on a sequence: an empty sequence keeps the IOD valid, holds nothing.
            elem.value = Sequence()
            report.emptied += 1

    def _apply(self, ds: Dataset, elem: DataElement, action: str, shift: int,
               report: DeidReport) -> None:
        tag = elem.tag
        if self.options.retain_patient_characteristics and tag in PATIENT_CHARACTERISTICS:
            return
        if elem.VR == "UI" and ("U" in action or action in ("D", "Z/D")):
            self._remap_uids(elem)
            report.uids_remapped += 1
            return
        if (self.options.retain_modified_dates and elem.VR in ("DA", "DT", "TM")
                and tag not in ALWAYS_EMPTY):
            if elem.VR != "TM":  # times of day are kept; the date carries the shift
                self._shift(elem, shift)
                report.dates_shifted += 1
            return
        if action.startswith("X"):
            del ds[tag]
            report.removed += 1
        elif action in ("Z", "Z/D") or tag in ALWAYS_EMPTY:
            elem.value = None
            report.emptied += 1
        else:  # D
            elem.value = _dummy(elem.VR)
            report.replaced += 1

    def _uid(self, original: str) -> str:
        new = self.uid_map.get(original)
        if new is None:
            new = self.uid_map[original] = self.pseudo.uid(original)
        return new

    def _remap_uids(self, elem: DataElement) -> None:
        if elem.value in (None, ""):
            return
        if isinstance(elem.value, (list, MultiValue)):
            elem.value = [self._uid(str(v)) for v in elem.value]
        else:
            elem.value = self._uid(str(elem.value))

    @staticmethod
    def _shift(elem: DataElement, days: int) -> None:
        fn = shift_da if elem.VR == "DA" else shift_dt
        if elem.value in (None, ""):
            return
        if isinstance(elem.value, (list, MultiValue)):
            elem.value = [fn(str(v), days) for v in elem.value]
        else:
            elem.value = fn(str(elem.value), days)

    def _mark(self, ds: Dataset, shift: int) -> None:
        """Patient Identity Removed, De-identification Method (+ Code Sequence, CID 7050)."""
        ds.PatientIdentityRemoved = "YES"
        chosen = [codes.DCM.BasicApplicationConfidentialityProfile]
        names = [METHOD_NAME]
        if self.options.retain_modified_dates:
            chosen.append(codes.DCM.RetainLongitudinalTemporalInformationModifiedDatesOption)
            names.append("Retain Longitudinal Temporal Modified Dates")
        if self.options.retain_patient_characteristics:
            chosen.append(codes.DCM.RetainPatientCharacteristicsOption)
            names.append("Retain Patient Characteristics")
        if self.options.defaced:
            chosen.append(codes.DCM.CleanRecognizableVisualFeaturesOption)
            names.append("Clean Recognizable Visual Features (defaced)")
        ds.DeidentificationMethod = names
        items = []
        for code in chosen:
            item = Dataset()
            item.CodeValue = code.value
            item.CodingSchemeDesignator = code.scheme_designator
            item.CodeMeaning = code.meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(items)
        if not self.options.retain_modified_dates:
            ds.LongitudinalTemporalInformationModified = "REMOVED"
        else:
            ds.LongitudinalTemporalInformationModified = "MODIFIED" if shift else "UNMODIFIED"
        if "BurnedInAnnotation" not in ds:
            # check_burned_in let it through: an original scanner reconstruction, no text.
            ds.BurnedInAnnotation = "NO"


def _iter_private(ds: Dataset):
    for elem in ds:
        if elem.tag.is_private:
            yield elem
        elif elem.VR == "SQ":
            for item in elem.value or []:
                yield from _iter_private(item)


def _dummy(vr: str):
    if vr in ("DS", "IS"):
        return "0"
    if vr in ("US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"):
        return 0
    if vr == "DA":
        return "19000101"
    if vr == "TM":
        return "000000"
    if vr == "DT":
        return "19000101000000"
    if vr == "AS":
        return "000Y"
    if vr in ("OB", "OW", "UN", "OF", "OD", "OL", "OV"):
        return b"\x00\x00"
    if vr == "CS":
        return DUMMY_TEXT
    return DUMMY_TEXT
