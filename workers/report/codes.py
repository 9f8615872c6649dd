"""Coded concepts used in the SEG and SR, in one place.

How each code was checked (Nov 2026):

* "PS3.16" = present in the DICOM content-mapping resource shipped with pydicom
  (``pydicom.sr._concepts_dict``): the code and meaning are the standard's.
* Codes proposed in the design notes that turned out wrong and are NOT used:
  230706003 is "Hemorrhagic cerebral infarction", not intraventricular hemorrhage;
  95455008 (seen in public code for subdural) is "Thrombosis of cerebral veins";
  DCM 111047 is "Probability of cancer", not a generic probability.
* Subtype disorder codes (subdural 35486000, subarachnoid 21454007, cerebral 274100004,
  intraventricular/epidural candidates) could not all be confirmed from an authoritative
  source, so subtypes are POST-COORDINATED from codes that are in PS3.16: finding type
  "Hemorrhage" (SCT 50960005, CID 7151/7159) + a finding site / anatomic region
  (subarachnoid space, brain ventricle, brain, dura mater). The segment label and tracking
  identifier carry the subtype name in words; :data:`SUBTYPE_LABEL` maps both ways.
* Our own concepts (midline shift, ABC/2 method, NER entities, not-analysed reason) use
  the private coding scheme ``99ICHNODE`` declared in the SR's Coding Scheme Identification.
"""

from __future__ import annotations

from highdicom.sr import CodedConcept

SCT, DCM, UCUM = "SCT", "DCM", "UCUM"
PRIVATE_SCHEME = "99ICHNODE"


def sct(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, SCT, meaning)


def dcm(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, DCM, meaning)


def local(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, PRIVATE_SCHEME, meaning)


# --- segment categories and types (all PS3.16) ---------------------------------------
MORPHOLOGICALLY_ABNORMAL = sct("49755003", "Morphologically Abnormal Structure")  # CID 7150
ANATOMICAL_STRUCTURE = sct("91723000", "Anatomical Structure")  # CID 7150
HEMORRHAGE = sct("50960005", "Hemorrhage")  # CID 7151, 7159
INTRACRANIAL_HEMORRHAGE = sct("1386000", "Intracranial hemorrhage")  # "any" ICH
LATERAL_VENTRICLE = sct("66720007", "Lateral Ventricle")  # CID 7140, 7153
LEFT = sct("7771000", "Left")
RIGHT = sct("24028007", "Right")
INTRACRANIAL = sct("1101003", "Intracranial")

# Anatomic location that post-coordinates each subtype (PS3.16 CID 7153 body structures).
SUBTYPE_SITE = {
    "epidural": sct("18545000", "Dura mater"),  # outside the dura; no epidural-space code in CID 7153
    "subdural": sct("18545000", "Dura mater"),  # beneath the dura
    "subarachnoid": sct("35951006", "Subarachnoid space"),
    "intraparenchymal": sct("12738006", "Brain"),
    "intraventricular": sct("35764002", "Brain ventricle"),
}
SUBTYPE_LABEL = {
    "epidural": "Epidural hematoma",
    "subdural": "Subdural hematoma",
    "subarachnoid": "Subarachnoid hemorrhage",
    "intraparenchymal": "Intraparenchymal hematoma",
    "intraventricular": "Intraventricular hemorrhage",
}

# --- SR concepts ---------------------------------------------------------------------
PROCEDURE_CT_HEAD = sct("303653007", "Computed tomography of head")
PRESENCE = dcm("121052", "Presence of property")
PRESENT = sct("52101004", "Present")
ABSENT = sct("272519000", "Absent")
PRESENCE_UNDETERMINED = dcm("121059", "Presence Undetermined")
PROBABILITY = dcm("122157", "Probability")
VOLUME = sct("118565006", "Volume")
HISTORY = dcm("121060", "History")
COMMENT = dcm("121106", "Comment")
ANTICOAGULANT = sct("372862008", "Anticoagulant")
HISTORY_OF_HYPERTENSION = sct("161501007", "History of Hypertension")
AI_FAMILY = dcm("123110", "Artificial Intelligence")  # CID 7162

MIDLINE_SHIFT = local("MLS", "Midline shift")
ABC2_METHOD = local("ABC2", "ABC/2 ellipsoid estimate")
VOXEL_COUNT_METHOD = local("VOXSUM", "Sum of segmented voxel volumes")
NOT_ANALYSED = local("NOTANALYSED", "Study not analysed")
NER_ENTITY = local("NERENTITY", "Clinical text entity")
WEIGHTS_SHA256 = "weights_sha256"

# --- units (UCUM) ----------------------------------------------------------------------
UNIT_ML = CodedConcept("ml", UCUM, "milliliter")
UNIT_MM = CodedConcept("mm", UCUM, "millimeter")
UNIT_NONE = CodedConcept("1", UCUM, "no units")

CODING_SCHEMES = {
    # designator: (UID, name) for Coding Scheme Identification Sequence
    SCT: ("2.16.840.1.113883.6.96", "SNOMED CT"),
    DCM: ("1.2.840.10008.2.16.4", "DICOM Controlled Terminology"),
    UCUM: ("2.16.840.1.113883.6.8", "Unified Code for Units of Measure"),
    PRIVATE_SCHEME: (None, "ichnode local concepts"),
}

# Display colours (CIELab via sRGB) shared by SEG and overlay so both look the same.
COLOURS = {
    "epidural": (255, 140, 0),
    "subdural": (255, 215, 0),
    "subarachnoid": (255, 0, 255),
    "intraparenchymal": (255, 0, 0),
    "intraventricular": (0, 200, 255),
    "hematoma": (255, 0, 0),
    "ventricle_left": (0, 255, 0),
    "ventricle_right": (0, 128, 255),
}
