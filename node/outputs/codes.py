"""Every coded concept the node writes into SEG, SR and key images, with its meaning and source.

Sources:
- SNOMED CT ("SCT") and DICOM ("DCM") concepts are taken from DICOM PS3.16 (the content
  mapping resource), as pydicom's code dictionary carries them; the context group is named
  where there is one.
- UCUM units come from PS3.16 CID 7181 and UCUM itself.
- PS3.16 has no concept for a disc bulge, a disc protrusion or a Schmorl's node, nor for the
  model's confidence. These are coded in the node's own scheme ``99IDAICS``; DICOM reserves
  designators starting with "99" for such local schemes (PS3.3 section 8.2). Their meanings
  follow the IDAICS paper's definitions (``node.classes``).
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from node.classes import DiscClass

LOCAL_SCHEME = "99IDAICS"
LOCAL_SCHEME_NAME = "IDAICS node local codes"

# -- Segmented property categories (CID 7150) ---------------------------------------------
ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = Code("49755003", "SCT", "Morphologically Abnormal Structure")

# -- Anatomy --------------------------------------------------------------------------------
#: The disc at each level the node names (CID 7604 "Intervertebral Disc").
DISC_CODES: dict[str, Code] = {
    "T12-L1": Code("76206002", "SCT", "T12/L1 disc"),
    "L1-L2": Code("80064006", "SCT", "L1/L2 disc"),
    "L2-L3": Code("67459009", "SCT", "L2/L3 disc"),
    "L3-L4": Code("62551000", "SCT", "L3/L4 disc"),
    "L4-L5": Code("84020006", "SCT", "L4/L5 disc"),
    "L5-S1": Code("715056000", "SCT", "L5/S1 disc"),
}
#: Where a disc's level could not be named (no sacrum in view), and the report's region.
LUMBAR_SPINE = Code("122496007", "SCT", "Lumbar spine")

# -- Findings ------------------------------------------------------------------------------
FINDING_CODES: dict[DiscClass, Code] = {
    DiscClass.NORMAL: Code("normal-disc", LOCAL_SCHEME, "Normal intervertebral disc"),
    DiscClass.SCHMORL: Code("schmorl-node", LOCAL_SCHEME, "Schmorl's node"),
    DiscClass.BULGE: Code("disc-bulge", LOCAL_SCHEME, "Intervertebral disc bulge"),
    DiscClass.PROTRUSION: Code("disc-protrusion", LOCAL_SCHEME, "Intervertebral disc protrusion"),
}
#: A disc whose level is not named, as plain anatomy (beside its finding's own segment).
INTERVERTEBRAL_DISC = Code("disc", LOCAL_SCHEME, "Intervertebral disc")

# -- SR concept names ----------------------------------------------------------------------
FINDING = Code("121071", "DCM", "Finding")
COMMENT = Code("121106", "DCM", "Comment")
FINDINGS = Code("121070", "DCM", "Findings")  # CID 7001 section heading
PROCEDURE_REPORTED = Code("121058", "DCM", "Procedure reported")
#: CID 7000 document title of a report with nothing measured (TID 2000 form).
DIAGNOSTIC_IMAGING_REPORT = Code("18748-4", "LN", "Diagnostic Imaging Report")
#: TID 1500 row 12, the report's own qualitative evaluations.
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
DEVICE_OBSERVER = Code("121007", "DCM", "Device")  # CID 270 observer type
PROCEDURE_CT = Code("77477000", "SCT", "Computed tomography")  # CID 100
ALGORITHM_FAMILY = Code("123110", "DCM", "Artificial Intelligence")  # CID 7162

# -- Measurements (name, unit) -------------------------------------------------------------
HEIGHT = Code("121207", "DCM", "Height")
AREA = Code("121202", "DCM", "Area of Defined Region")
EXTENSION = Code("extension", LOCAL_SCHEME, "Extension beyond vertebral body edge")
EXTENSION_SHARE = Code(
    "extension-share", LOCAL_SCHEME, "Share of circumference beyond vertebral body edge"
)
#: The model's confidence in one class, per class: a viewer that prints a group's
#: measurements by their names (OHIF) then shows what the confidence is of.
CONFIDENCE: dict[DiscClass, Code] = {
    c: Code(f"conf-{c.value}", LOCAL_SCHEME, f"Confidence of {c.display}") for c in DiscClass
}

MM = Code("mm", "UCUM", "mm")
MM2 = Code("mm2", "UCUM", "mm2")
PERCENT = Code("%", "UCUM", "%")


def declare_local_scheme(ds: Dataset) -> None:
    """Declare the local scheme in the object (Coding Scheme Identification Sequence)."""
    from pydicom.sequence import Sequence

    item = Dataset()
    item.CodingSchemeDesignator = LOCAL_SCHEME
    item.CodingSchemeName = LOCAL_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = "IDAICS"
    ds.CodingSchemeIdentificationSequence = Sequence([item])


def disc_code(level: str) -> Code:
    """The anatomy code of a disc level; the lumbar spine where the level is not named."""
    return DISC_CODES.get(level, LUMBAR_SPINE)


def segment_property(cls: DiscClass, level: str, plain: bool = False) -> tuple[Code, Code]:
    """(category, type) of a segment: a normal disc, or the plain disc beside its finding, is
    anatomy; a finding is abnormal."""
    if plain:
        return ANATOMICAL_STRUCTURE, DISC_CODES.get(level, INTERVERTEBRAL_DISC)
    if cls is DiscClass.NORMAL:
        return ANATOMICAL_STRUCTURE, DISC_CODES.get(level, FINDING_CODES[DiscClass.NORMAL])
    return MORPHOLOGICALLY_ABNORMAL_STRUCTURE, FINDING_CODES[cls]
