"""TID 1500 Measurement Reports (Comprehensive 3D SR).

The report every viewer opens (`build_sr`) holds one TID 1410 planar ROI group per segment
of the SEG (a level's disc, the part of a bulge or protrusion beyond the vertebral edge, a
Schmorl's node): its outline as a closed SCOORD polyline on the level's central axial CT
image, a Tracking Identifier (the segment's label) and the segment's Tracking UID, the
finding and its site, the measurements with UCUM units, the model's confidence and the
algorithm. A level where the model drew nothing gets a 5 mm circle at the disc centre, so
that no group lacks image geometry: OHIF refuses the whole report for one such group.

The volumetric form (`build_volumetric_sr`, TID 1411 groups that reference the SEG's
segments, as 3D Slicer and dcmqi read them) is a separate, optional object: a TID 1411
group carries a segment or image regions, never both, so one report cannot serve both.

A series that was not analysed, or where no disc was found, gets a text report (TID 2000
form) that says so and why: TID 1500 needs a measurement group, and OHIF refuses one
without image geometry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from node.analysis.study import DiscResult, StudyResult
from node.analysis.volume import Volume
from node.classes import DiscClass
from node.inference.model import ModelCard
from node.outputs import codes
from node.outputs.segments import Part, Segment
from node.outputs.settings import OutputSettings

SERIES_DESCRIPTION = "IDAICS disc findings report (AI, unverified)"
VOLUMETRIC_SERIES_DESCRIPTION = "IDAICS disc findings report, volumetric (AI, unverified)"
NOT_ANALYSED_DESCRIPTION = "IDAICS report: series not analysed"
NO_DISC_REASON = "no intervertebral disc space was found along the vertebral column"
UNSEEN_RADIUS_MM = 5.0


def level_identifier(disc: DiscResult) -> str:
    """'L4-L5 disc protrusion + Schmorl's node'; 'L2-L3 nothing found' where the model saw no disc."""
    names = " + ".join(c.display for c in disc.classes) or "nothing found"
    return f"{disc.level} {names}"


def _measurements(
    disc: DiscResult, part: Part | None, confidence: tuple[DiscClass, float] | None
) -> list[hd.sr.Measurement]:
    m = disc.measurements
    values: list[tuple[hd.sr.CodedConcept | Code, float | None, Code]] = []
    if part in (Part.DISC, None):
        values += [(codes.HEIGHT, m.height_mm, codes.MM), (codes.AREA, m.disc_area_mm2, codes.MM2)]
    if part in (Part.DISC, Part.EXTENSION, None):
        share = None if m.extension_share is None else 100 * m.extension_share
        values += [
            (codes.EXTENSION, m.extension_mm, codes.MM),
            (codes.EXTENSION_SHARE, share, codes.PERCENT),
        ]
    if confidence is not None:
        values.append((codes.CONFIDENCE[confidence[0]], 100 * confidence[1], codes.PERCENT))
    return [
        hd.sr.Measurement(name=n, value=round(float(v), 3), unit=u)
        for n, v, u in values
        if v is not None
    ]


def _context(settings: OutputSettings, model_name: str) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(
            entropy_srcs=[settings.manufacturer, settings.model_name, settings.device_serial_number]
        ),
        name=settings.model_name,
        manufacturer_name=settings.manufacturer,
        model_name=model_name,
        serial_number=settings.device_serial_number,
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=hd.sr.CodedConcept.from_code(codes.DEVICE_OBSERVER),
            observer_identifying_attributes=device,
        )
    )


def _nearest_slice(vol: Volume, k: float) -> int:
    """Index into the volume's instances (or frames) of the acquired slice nearest ``k``."""
    return int(np.argmin(np.abs(np.array(vol.slice_index) - k)))


def _source(vol: Volume, i: int) -> hd.sr.SourceImageForRegion:
    if vol.multi_frame:
        ref = vol.instances[0]
        return hd.sr.SourceImageForRegion(
            ref.SOPClassUID, ref.SOPInstanceUID, [int(vol.frames[i]) + 1]
        )
    h = vol.headers[i]
    return hd.sr.SourceImageForRegion(h.SOPClassUID, h.SOPInstanceUID)


def outline(voxels: np.ndarray, vol: Volume) -> hd.sr.ImageRegion | None:
    """The outline of a segment's footprint on the axial plane (the union of its voxels over
    the slices), as a closed polyline on the acquired slice nearest its centre; SCOORD
    pixel coordinates put 0,0 at the top left corner of the top left pixel."""
    if not len(voxels):
        return None
    foot = np.zeros(vol.grid.shape[1:], dtype=np.uint8)
    foot[voxels[:, 1], voxels[:, 2]] = 1
    contours, _ = cv2.findContours(foot, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    pts = max(contours, key=cv2.contourArea).reshape(-1, 2).astype(float) + 0.5  # (column, row)
    if len(pts) < 3:  # a line or a dot: its bounding square
        (c0, r0), (c1, r1) = pts.min(axis=0) - 0.5, pts.max(axis=0) + 0.5
        pts = np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1]])
    return _polyline(vol, np.vstack([pts, pts[:1]]), float(voxels[:, 0].mean()))


def _circle(disc: DiscResult, vol: Volume) -> hd.sr.ImageRegion:
    """A closed polygon of `UNSEEN_RADIUS_MM` around the disc centre on its nearest slice."""
    k, r, c = vol.grid.to_index(disc.site.centre)
    rs, cs = vol.grid.spacing[1:]
    a = np.linspace(0, 2 * np.pi, 17)
    pts = np.stack(
        [c + 0.5 + UNSEEN_RADIUS_MM / cs * np.cos(a), r + 0.5 + UNSEEN_RADIUS_MM / rs * np.sin(a)],
        1,
    )
    pts[-1] = pts[0]
    return _polyline(vol, pts, float(k))


def _polyline(vol: Volume, pts: np.ndarray, k: float) -> hd.sr.ImageRegion:
    """A closed polyline (column, row) on the acquired slice nearest slice index ``k``."""
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=pts,
        source_image=_source(vol, _nearest_slice(vol, k)),
    )


def _finding(seg: Segment | None) -> tuple[Code | None, Code | None]:
    """(finding type, finding category) of a group."""
    if seg is None:
        return None, None
    category, kind = codes.segment_property(seg.cls, seg.level, seg.plain)
    return (kind if seg.plain else codes.FINDING_CODES[seg.cls]), category


def _common(
    disc: DiscResult, seg: Segment | None, identifier: str, uid: str, card: ModelCard
) -> dict:
    finding, category = _finding(seg)
    confidence = None if seg is None or seg.plain else (seg.cls, seg.confidence)
    return {
        "tracking_identifier": hd.sr.TrackingIdentifier(uid=uid, identifier=identifier),
        "finding_type": finding,
        "finding_category": category,
        "finding_sites": [hd.sr.FindingSite(anatomic_location=codes.disc_code(disc.level))],
        "algorithm_id": hd.sr.AlgorithmIdentification(name=card.name, version=card.version),
        "measurements": _measurements(disc, seg.part if seg else None, confidence) or None,
    }


def planar_groups(
    result: StudyResult,
    vol: Volume,
    card: ModelCard,
    segments: Sequence[Segment],
    tracking_uids: Mapping[int, str],
) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    groups = []
    for i, disc in enumerate(result.discs):
        mine = [s for s in segments if s.disc == i]
        for s in mine:
            region = outline(s.voxels, vol)
            if region is not None:
                groups.append(
                    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                        referenced_region=region,
                        **_common(disc, s, s.label, tracking_uids[s.number], card),
                    )
                )
        if not mine:
            groups.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    referenced_region=_circle(disc, vol),
                    **_common(disc, None, level_identifier(disc), hd.UID(), card),
                )
            )
    return groups


def volumetric_groups(
    result: StudyResult,
    vol: Volume,
    card: ModelCard,
    segments: Sequence[Segment],
    seg: Dataset,
    tracking_uids: Mapping[int, str],
) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    groups = []
    for s in segments:
        disc = result.discs[s.disc]
        ref = hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=s.number,
            source_series=hd.sr.SourceSeriesForSegmentation(vol.series_uid),
        )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                referenced_segment=ref, **_common(disc, s, s.label, tracking_uids[s.number], card)
            )
        )
    return groups


def _comments(result: StudyResult) -> list[str]:
    lines = (
        [] if result.discs else [f"No disc found: {'; '.join(result.warnings) or NO_DISC_REASON}."]
    )
    lines += [f"Warning: {w}" for w in result.warnings] if result.discs else []
    lines += [f"{d.level}: {w}" for d in result.discs for w in d.warnings]
    return lines


def library_images(result: StudyResult, vol: Volume) -> list[Dataset]:
    """The Image Library: for each disc, the acquired slice nearest its centre (the series
    itself is referenced as evidence and by the SEG); none for an enhanced CT instance,
    whose frames the library cannot describe one by one."""
    if vol.multi_frame:  # the one instance is referenced as evidence and by the SEG
        return []
    picked: list[int] = []
    for d in result.discs:
        i = _nearest_slice(vol, float(vol.grid.to_index(d.site.centre)[0]))
        if i not in picked:
            picked.append(i)
    return [vol.headers[i] for i in picked] or [vol.headers[len(vol.headers) // 2]]


#: Patient and study attributes a report copies from its first evidence (type 2: present,
#: possibly empty); a modality that leaves one out still gets its report.
PATIENT_STUDY_TYPE2 = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)


def _evidence(evidence: Sequence[Dataset]) -> list[Dataset]:
    out = list(evidence)
    missing = [k for k in PATIENT_STUDY_TYPE2 if k not in out[0]] if out else []
    if missing:
        first = Dataset()
        for elem in out[0]:
            if elem.tag.group != 0x7FE0:
                first.add(elem)
        for k in missing:
            setattr(first, k, None)
        out[0] = first
    return out


def _document(
    groups: Sequence,
    comments: Sequence[str],
    evidence: Sequence[Dataset],
    settings: OutputSettings,
    model_name: str,
    series_number: int,
    description: str,
    library: Sequence[Dataset] | None = None,
    previous: Sequence[Dataset] = (),
) -> Dataset:
    report = hd.sr.MeasurementReport(
        observation_context=_context(settings, model_name),
        procedure_reported=codes.PROCEDURE_CT,
        imaging_measurements=list(groups) or None,
        referenced_images=list(library) if library else None,
    )
    if comments:
        report[0].ContentSequence.append(
            _texts(codes.QUALITATIVE_EVALUATIONS, codes.COMMENT, comments)
        )
    return _sr_object(report[0], evidence, settings, series_number, description, previous)


def _texts(section: Code, name: Code, lines: Sequence[str]) -> hd.sr.ContainerContentItem:
    """A container ``section`` holding each line as a TEXT item ``name``."""
    box = hd.sr.ContainerContentItem(
        name=section, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    box.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=name,
                value=line[:1024],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
            for line in lines
        ]
    )
    return box


def _sr_object(
    content: Dataset,
    evidence: Sequence[Dataset],
    settings: OutputSettings,
    series_number: int,
    description: str,
    previous: Sequence[Dataset] = (),
) -> Dataset:
    """The Comprehensive 3D SR instance around ``content``: complete, preliminary, unverified;
    ``previous`` are the reports it replaces (Predecessor Documents)."""
    return hd.sr.Comprehensive3DSR(
        previous_versions=list(previous) or None,
        evidence=_evidence(evidence),
        content=content,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=settings.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=settings.institution_name,
        series_description=description,
    )


def build_sr(
    result: StudyResult,
    vol: Volume,
    card: ModelCard,
    settings: OutputSettings,
    segments: Sequence[Segment],
    seg: Dataset | None,
    tracking_uids: Mapping[int, str],
    previous: Sequence[Dataset] = (),
) -> Dataset:
    """The planar report; ``tracking_uids`` maps segment numbers to the Tracking UIDs in the SEG.
    Without any disc, the report says so and why, as text."""
    evidence = list(vol.instances) + ([seg] if seg is not None else [])
    if not result.discs:
        return _text_report(
            _comments(result), evidence, settings, card.name, SERIES_DESCRIPTION, previous
        )
    return _document(
        planar_groups(result, vol, card, segments, tracking_uids),
        _comments(result),
        evidence,
        settings,
        card.name,
        settings.sr_series_number,
        SERIES_DESCRIPTION,
        library_images(result, vol),
        previous,
    )


def build_volumetric_sr(
    result: StudyResult,
    vol: Volume,
    card: ModelCard,
    settings: OutputSettings,
    segments: Sequence[Segment],
    seg: Dataset,
    tracking_uids: Mapping[int, str],
) -> Dataset:
    """The volumetric report (TID 1411 groups referencing the SEG's segments)."""
    return _document(
        volumetric_groups(result, vol, card, segments, seg, tracking_uids),
        _comments(result),
        list(vol.instances) + [seg],
        settings,
        card.name,
        settings.volumetric_sr_series_number,
        VOLUMETRIC_SERIES_DESCRIPTION,
    )


def _text_report(
    lines: Sequence[str],
    evidence: Sequence[Dataset],
    settings: OutputSettings,
    model_name: str,
    description: str,
    previous: Sequence[Dataset] = (),
) -> Dataset:
    """A Basic Diagnostic Imaging Report (TID 2000 form): the observer, the procedure, and
    the lines as findings. TID 1500 needs at least one measurement group, and a group without
    image geometry is what OHIF refuses, so a report with nothing to measure takes this form."""
    root = hd.sr.ContainerContentItem(name=codes.DIAGNOSTIC_IMAGING_REPORT, template_id="2000")
    items: list = list(_context(settings, model_name))
    items.append(
        hd.sr.CodeContentItem(
            name=codes.PROCEDURE_REPORTED,
            value=codes.PROCEDURE_CT,
            relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
        )
    )
    items.append(_texts(codes.FINDINGS, codes.FINDING, lines))
    root.ContentSequence = hd.sr.ContentSequence(items)
    return _sr_object(root, evidence, settings, settings.sr_series_number, description, previous)


def build_not_analysed_sr(
    headers: Sequence[Dataset], reason: str, settings: OutputSettings, model_name: str
) -> Dataset:
    """A report for a series the node received but could not analyse, saying why, so that
    PACS shows an answer rather than a series still waiting."""
    return _text_report(
        [f"Series not analysed: {reason}"], headers, settings, model_name, NOT_ANALYSED_DESCRIPTION
    )
