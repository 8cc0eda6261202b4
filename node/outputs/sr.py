"""The TID 1500 Measurement Report (Comprehensive 3D SR): one measurement group per disc level.

Each group has a readable Tracking Identifier (level and classes) and a Tracking UID (the
one of its segment in the SEG), the finding and its site, the referenced SEG segment, the
measurements with UCUM units, the model's confidence and the algorithm. A level judged
normal is reported too. A study where no disc was found gets one group that says so, and
the reason in the report's own qualitative evaluations, where warnings go as well.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from node.analysis.study import DiscResult, StudyResult
from node.analysis.volume import Volume
from node.inference.model import ModelCard
from node.outputs import codes
from node.outputs.segments import Segment
from node.outputs.settings import OutputSettings

SERIES_DESCRIPTION = "IDAICS disc findings report (AI, unverified)"
NO_DISC_REASON = "no intervertebral disc space was found along the vertebral column"


def level_identifier(disc: DiscResult) -> str:
    """'L4-L5 disc protrusion + Schmorl's node'; 'L2-L3 nothing found' where the model saw no disc."""
    names = " + ".join(c.display for c in disc.classes) or "nothing found"
    return f"{disc.level} {names}"


def _measurements(disc: DiscResult) -> list[hd.sr.Measurement]:
    m = disc.measurements
    values = [(codes.HEIGHT, m.height_mm, codes.MM), (codes.AREA, m.disc_area_mm2, codes.MM2),
              (codes.EXTENSION, m.extension_mm, codes.MM),
              (codes.EXTENSION_SHARE, None if m.extension_share is None else 100 * m.extension_share, codes.PERCENT)]
    if disc.findings:
        values.append((codes.CONFIDENCE, disc.confidence, codes.NO_UNITS))
    return [hd.sr.Measurement(name=n, value=round(float(v), 3), unit=u) for n, v, u in values if v is not None]


def _group(
    disc: DiscResult, segment: Segment | None, seg: Dataset | None, series_uid: str, tracking_uid: str,
    card: ModelCard,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations:
    primary = disc.findings[0].cls if disc.findings else None
    common = {
        "tracking_identifier": hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=level_identifier(disc)),
        "finding_type": codes.FINDING_CODES[primary] if primary else None,
        "finding_category": codes.segment_property(primary, disc.level)[0] if primary else None,
        "finding_sites": [hd.sr.FindingSite(anatomic_location=codes.disc_code(disc.level))],
        "algorithm_id": hd.sr.AlgorithmIdentification(name=card.name, version=card.version),
        "measurements": _measurements(disc) or None,
        # the primary class is the group's Finding; a second one (a node beside a bulge or
        # protrusion) is a qualitative evaluation with the same concept name
        "qualitative_evaluations": [hd.sr.QualitativeEvaluation(name=codes.FINDING, value=codes.FINDING_CODES[c])
                                    for c in disc.classes[1:]] or None,
    }
    if segment is None or seg is None:
        return hd.sr.MeasurementsAndQualitativeEvaluations(**common)
    ref = hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=segment.number,
        source_series=hd.sr.SourceSeriesForSegmentation(series_uid),
    )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_segment=ref, **common)


def _no_disc_group(card: ModelCard) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="no disc found"),
        finding_type=codes.NO_DISC_FOUND,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.LUMBAR_SPINE)],
        algorithm_id=hd.sr.AlgorithmIdentification(name=card.name, version=card.version),
    )


def _comments(result: StudyResult) -> list[str]:
    lines = [] if result.discs else [f"No disc found: {'; '.join(result.warnings) or NO_DISC_REASON}."]
    lines += [f"Warning: {w}" for w in result.warnings] if result.discs else []
    lines += [f"{d.level}: {w}" for d in result.discs for w in d.warnings]
    return lines


def library_images(result: StudyResult, vol: Volume) -> list[Dataset]:
    """The Image Library: for each disc, the acquired slice nearest its centre (the series
    itself is referenced as evidence and by the SEG); none for an enhanced CT instance,
    whose frames the library cannot describe one by one."""
    if vol.multi_frame:  # the one instance is referenced as evidence and by the SEG
        return []
    ks = np.array(vol.slice_index)
    picked = []
    for d in result.discs:
        k = float(vol.grid.to_index(d.site.centre)[0])
        i = int(np.argmin(np.abs(ks - k)))
        if i not in picked:
            picked.append(i)
    return [vol.headers[i] for i in picked] or [vol.headers[len(vol.headers) // 2]]


def primary_segments(segments: list[Segment], result: StudyResult) -> dict[int, Segment]:
    """The segment each level's group refers to: the one of its first (primary) finding."""
    out: dict[int, Segment] = {}
    for i, disc in enumerate(result.discs):
        mine = {s.cls: s for s in segments if s.disc == i}
        for f in disc.findings:
            if f.cls in mine:
                out[i] = mine[f.cls]
                break
    return out


def build_sr(
    result: StudyResult, vol: Volume, card: ModelCard, settings: OutputSettings,
    segments: list[Segment], seg: Dataset | None, tracking_uids: dict[int, str],
) -> Dataset:
    """The report; ``tracking_uids`` maps segment numbers to the Tracking UIDs in the SEG."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=[settings.manufacturer, settings.model_name, settings.device_serial_number]),
        name=settings.model_name, manufacturer_name=settings.manufacturer, model_name=card.name,
        serial_number=settings.device_serial_number,
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DEVICE_OBSERVER, observer_identifying_attributes=device
        )
    )
    primary = primary_segments(segments, result)
    groups = []
    for i, disc in enumerate(result.discs):
        s = primary.get(i)
        uid = tracking_uids[s.number] if s is not None else hd.UID()
        groups.append(_group(disc, s, seg, vol.series_uid, uid, card))
    if not groups:
        groups = [_no_disc_group(card)]
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=codes.PROCEDURE_CT,
        imaging_measurements=groups,
        referenced_images=library_images(result, vol) or None,
    )
    comments = _comments(result)
    if comments:
        box = hd.sr.ContainerContentItem(
            name=codes.QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        box.ContentSequence = hd.sr.ContentSequence([
            hd.sr.TextContentItem(name=codes.COMMENT, value=c[:1024],
                                  relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
            for c in comments
        ])
        report[0].ContentSequence.append(box)
    evidence = list(vol.instances) + ([seg] if seg is not None else [])
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=hd.UID(),
        series_number=settings.sr_series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=settings.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=settings.institution_name,
        series_description=SERIES_DESCRIPTION,
    )

