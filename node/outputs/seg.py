"""The DICOM Segmentation: BINARY segments of each disc and its findings, on the CT's own grid.

What viewers need (OHIF, 3D Slicer, Weasis): the CT's study, patient and frame of
reference; a reference to the source series and, per frame, to the source image and its
plane position; segments labelled with level and class, coded category and type, a
recommended display colour and the algorithm that made them.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from node.analysis.volume import Volume
from node.classes import CLASS_COLOURS, DISC_COLOUR
from node.inference.model import ModelCard
from node.outputs import codes
from node.outputs.segments import Segment, label_volume
from node.outputs.settings import OutputSettings

SERIES_DESCRIPTION = "IDAICS disc findings SEG (AI, unverified)"


def algorithm(card: ModelCard) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=card.name,
        family=codes.ALGORITHM_FAMILY,
        version=card.version,
        source=card.raw.get("format", "YOLOv8-seg"),
    )


def segment_description(
    seg: Segment, card: ModelCard, tracking_uid: str
) -> hd.seg.SegmentDescription:
    category, kind = codes.segment_property(seg.cls, seg.level, seg.plain)
    return hd.seg.SegmentDescription(
        segment_number=seg.number,
        segment_label=seg.label,
        segmented_property_category=category,
        segmented_property_type=kind,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm(card),
        tracking_uid=tracking_uid,
        tracking_id=seg.label,
        anatomic_regions=[codes.disc_code(seg.level)],
        display_color=hd.color.CIELabColor.from_rgb(
            *(DISC_COLOUR if seg.plain else CLASS_COLOURS[seg.cls])
        ),
    )


def build_seg(
    segments: list[Segment],
    vol: Volume,
    card: ModelCard,
    settings: OutputSettings,
    tracking_uids: list[str],
) -> Dataset:
    """The SEG for ``segments`` (at least one) of a volume loaded from DICOM."""
    if not segments:
        raise ValueError("a SEG needs at least one segment")
    if not vol.headers:
        raise ValueError("the volume has no source instances to derive a SEG from")
    labels = label_volume(segments, vol.grid.shape)
    first = vol.headers[0]
    if vol.multi_frame:
        # one enhanced CT instance: a frame per source frame, in the source's frame order
        # (empty ones are left out), matched by highdicom to the source's frames
        pixels = np.zeros((len(vol.headers), *labels.shape[1:]), dtype=labels.dtype)
        for k, f in zip(vol.slice_index, vol.frames):
            pixels[f] = labels[k]
        positions = None
    else:
        # Frames exist only on the acquired slices: a slice the loader filled in has no
        # instance in PACS for a frame to reference.
        used = [i for i, k in enumerate(vol.slice_index) if labels[k].any()]
        pixels = labels[[vol.slice_index[i] for i in used]]
        positions = [
            hd.PlanePositionSequence(
                hd.CoordinateSystemNames.PATIENT, vol.headers[i].ImagePositionPatient
            )
            for i in used
        ]
    return hd.seg.Segmentation(
        source_images=list(vol.instances),
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            segment_description(s, card, u) for s, u in zip(segments, tracking_uids)
        ],
        series_instance_uid=hd.UID(),
        series_number=settings.seg_series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=settings.manufacturer,
        manufacturer_model_name=settings.model_name,
        software_versions=settings.software_version,
        device_serial_number=settings.device_serial_number,
        content_description="Intervertebral disc findings",
        content_label="DISCS",
        content_creator_name=None,
        pixel_measures=None
        if positions is None
        else hd.PixelMeasuresSequence(
            pixel_spacing=[float(x) for x in first.PixelSpacing],
            slice_thickness=float(first.get("SliceThickness") or vol.grid.spacing[0]),
        ),
        plane_orientation=None
        if positions is None
        else hd.PlaneOrientationSequence(
            hd.CoordinateSystemNames.PATIENT, [float(x) for x in first.ImageOrientationPatient]
        ),
        plane_positions=positions,
        series_description=SERIES_DESCRIPTION,
        institution_name=settings.institution_name,
    )
