"""Key images: Secondary Capture pictures of each level for PACS and viewers without SEG or SR.

For every disc level, the mid axial (disc-parallel) and mid sagittal slices are drawn with
the model's masks outlined in their class colours, a caption naming level, view, classes and
confidence, orientation letters on every edge, and a banner at the top and at the bottom that
says the picture is an AI result, not for diagnosis.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import highdicom as hd
import numpy as np
from PIL import ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from node.analysis.report import mid_slice, outlined_tile
from node.analysis.study import StudyResult
from node.analysis.volume import Volume
from node.classes import DiscClass
from node.inference.interface import View
from node.inference.model import ModelCard
from node.outputs.settings import OutputSettings

SERIES_DESCRIPTION = "IDAICS key images (AI result, not for diagnosis)"
BANNER = "AI RESULT - NOT FOR DIAGNOSIS"
BANNER_COLOUR = (200, 0, 0)
SIZE = 512
#: Patient orientation of the picture's rows and columns (DICOM PatientOrientation):
#: axial slices show the patient's left to the right and posterior down; sagittal slices
#: posterior to the right and feet down. The disc planes are oblique, so these are nearest.
ORIENTATION = {View.AXIAL: ("L", "P"), View.SAGITTAL: ("P", "F")}


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


#: The letters at the picture's left, right, top and bottom edges: where the patient's
#: sides lie on each view (rows and columns as in `ORIENTATION`).
EDGE_LETTERS = {View.AXIAL: ("R", "L", "A", "P"), View.SAGITTAL: ("A", "P", "H", "F")}


def draw(
    grey: np.ndarray,
    masks: Iterable[tuple[np.ndarray, DiscClass]],
    caption: str,
    view: View = View.AXIAL,
) -> np.ndarray:
    """RGB picture: the slice with masks outlined, the banner along the top and again along
    the bottom (a viewer's overlays, its cine bar among them, cover at most one of them),
    the caption above the lower banner, and orientation letters at the edges."""
    img = outlined_tile(grey, masks, "", size=SIZE)
    d = ImageDraw.Draw(img)
    bar = SIZE // 16
    big, small = _font(bar * 2 // 3), _font(bar // 2)
    for top in (0, SIZE - bar):
        d.rectangle([0, top, SIZE, top + bar], fill=BANNER_COLOUR)
        d.text((SIZE // 2, top + bar // 2), BANNER, fill=(255, 255, 255), font=big, anchor="mm")
    d.rectangle([0, SIZE - 2 * bar, SIZE, SIZE - bar], fill=(0, 0, 0))
    d.text((8, SIZE - bar - bar // 2), caption, fill=(255, 255, 0), font=small, anchor="lm")
    left, right, up, down = EDGE_LETTERS[view]
    mid = (bar + SIZE - 2 * bar) // 2
    d.text((6, mid), left, fill=(255, 255, 0), font=big, anchor="lm")
    d.text((SIZE - 6, mid), right, fill=(255, 255, 0), font=big, anchor="rm")
    d.text((SIZE // 2, bar + 4), up, fill=(255, 255, 0), font=big, anchor="mt")
    d.text((SIZE // 2, SIZE - 2 * bar - 4), down, fill=(255, 255, 0), font=big, anchor="mb")
    return np.asarray(img.convert("RGB"))


def build_key_images(
    result: StudyResult, vol: Volume, card: ModelCard, settings: OutputSettings
) -> list[Dataset]:
    """Two pictures per level (axial, sagittal), in one series, cranial to caudal."""
    if not vol.headers or not result.discs:
        return []
    series_uid = hd.UID()
    ref = vol.instances[0]
    out: list[Dataset] = []
    for d in result.discs:
        for view in (View.AXIAL, View.SAGITTAL):
            grey, masks = mid_slice(vol, d, view, card.windowing, card.views)
            classes = " + ".join(c.display for c in d.classes) or "nothing found"
            caption = f"{d.level} {view.value}: {classes} ({d.confidence:.2f})"
            pixels = draw(grey, masks, caption, view)
            sc = hd.sc.SCImage.from_ref_dataset(
                ref_dataset=ref,
                pixel_array=pixels,
                photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
                bits_allocated=8,
                coordinate_system=hd.CoordinateSystemNames.PATIENT,
                series_instance_uid=series_uid,
                series_number=settings.key_images_series_number,
                sop_instance_uid=hd.UID(),
                instance_number=len(out) + 1,
                manufacturer=settings.manufacturer,
                # the field of view over SIZE pixels (highdicom's hint says int; it takes mm)
                pixel_spacing=cast(Any, (card.views.fov(view) / SIZE,) * 2),
                patient_orientation=ORIENTATION[view],
                series_description=SERIES_DESCRIPTION,
                institution_name=settings.institution_name,
                transfer_syntax_uid=ExplicitVRLittleEndian,
            )
            sc.BurnedInAnnotation = "YES"
            sc.BodyPartExamined = str(ref.get("BodyPartExamined") or "LSPINE")
            sc.ImageComments = f"{caption}. {BANNER}. Model {card.name}."
            sc.DerivationDescription = (
                f"{view.value} slice through the {d.level} disc, resampled from the CT"
            )
            out.append(sc)
    return out
