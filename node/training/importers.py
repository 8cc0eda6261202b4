"""Datasets from a hospital's own annotations: LabelMe JSON, or DICOM SEG with its CT.

Both need a mapping file (YAML or JSON) from the source's label names to the four classes;
a label missing from the mapping is an error that names the file and the label. Map a
label to ``ignore`` to leave it out on purpose.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from pathlib import Path

import numpy as np
import pydicom
import yaml
from PIL import Image
from pydicom.errors import InvalidDicomError

from node.classes import DiscClass, most_severe, parse_class
from node.inference.interface import Windowing
from node.ingest.series import SEG_STORAGE
from node.training.yolo import DatasetWriter, Instance, Sample, mask_polygons, split_studies

IGNORE = "ignore"


log = logging.getLogger(__name__)


class ImportError_(ValueError):
    """An annotation that cannot be imported, naming the file and the reason."""


def load_mapping(path: Path | None) -> dict[str, DiscClass | None]:
    """Read ``label: class`` pairs; ``ignore`` (or null) drops a label on purpose."""
    if path is None:
        raise ValueError(
            "a --mapping file is required: source label name -> one of "
            "normal, schmorl, bulge, protrusion (or ignore)"
        )
    raw = yaml.safe_load(Path(path).read_text())
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: mapping must be a non-empty table of label: class")
    return mapping_entries(raw, path)


def mapping_entries(raw: dict, source: Path) -> dict[str, DiscClass | None]:
    """A mapping file's table read as ``label: class`` (``ignore`` or null: None)."""
    out: dict[str, DiscClass | None] = {}
    for label, cls in raw.items():
        if cls is None or str(cls).lower() == IGNORE:
            out[str(label)] = None
            continue
        try:
            out[str(label)] = parse_class(str(cls).lower())
        except ValueError as exc:
            raise ValueError(f"{source}: label {label!r}: {exc}") from None
    return out


def _map(mapping: dict[str, DiscClass | None], label: str, source: Path) -> DiscClass | None:
    if label not in mapping:
        raise ImportError_(f"{source}: label {label!r} is not in the mapping file")
    return mapping[label]


def _labelme_image(doc: dict, json_path: Path) -> np.ndarray:
    if doc.get("imageData"):
        img = Image.open(io.BytesIO(base64.b64decode(doc["imageData"])))
    else:
        rel = doc.get("imagePath")
        if not rel:
            raise ImportError_(f"{json_path}: neither imageData nor imagePath")
        path = (json_path.parent / rel).resolve()
        if not path.is_file():
            raise ImportError_(f"{json_path}: image {rel} not found")
        img = Image.open(path)
    return np.asarray(img.convert("L"))


def labelme_sample(json_path: Path, mapping: dict[str, DiscClass | None], study: str) -> Sample:
    """One LabelMe annotation file as a sample (polygons and rectangles)."""
    try:
        doc = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ImportError_(f"{json_path}: not a LabelMe JSON file ({exc})") from None
    image = _labelme_image(doc, json_path)
    instances = []
    for shape in doc.get("shapes", []):
        cls = _map(mapping, str(shape.get("label", "")), json_path)
        if cls is None:
            continue
        pts = np.asarray(shape.get("points", []), dtype=float)
        kind = shape.get("shape_type") or "polygon"
        if kind == "rectangle" and len(pts) == 2:
            (x0, y0), (x1, y1) = pts
            pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
        elif kind != "polygon":
            raise ImportError_(
                f"{json_path}: shape type {kind!r} of label {shape.get('label')!r} "
                "is not supported (polygon or rectangle)"
            )
        if len(pts) < 3:
            raise ImportError_(
                f"{json_path}: polygon of label {shape.get('label')!r} has {len(pts)} points"
            )
        instances.append(Instance(cls, pts))
    target = most_severe({i.cls for i in instances}) if instances else None
    return Sample(
        name=f"{study}_{json_path.stem}".replace("/", "_"),
        image=image,
        instances=tuple(instances),
        study=study,
        target=target,
        source=f"labelme:{json_path.name}",
    )


def build_from_labelme(
    inputs: list[Path],
    out: Path,
    *,
    mapping: Path | None,
    val_fraction: float = 0.15,
    seed: int = 0,
) -> DatasetWriter:
    """Each sub-folder of an input folder is one study (split as a whole)."""
    table = load_mapping(mapping)
    found: list[tuple[Path, str]] = []
    for root in inputs:
        files = [root] if root.is_file() else sorted(root.rglob("*.json"))
        for f in files:
            rel = f.parent.relative_to(root) if root.is_dir() else Path(".")
            found.append((f, str(rel) if str(rel) != "." else f.stem))
    if not found:
        raise ValueError(f"no LabelMe .json files under {', '.join(map(str, inputs))}")
    samples = [labelme_sample(f, table, study) for f, study in found]  # all errors before writing
    splits = split_studies(sorted({s.study for s in samples}), val_fraction, seed)
    writer = DatasetWriter(
        out, extra={"source": "labelme", "views": "native", "mapping": str(mapping)}
    )
    for s in samples:
        writer.add(s, splits[s.study])
    writer.finish()
    return writer


def frame_positions(seg: pydicom.Dataset) -> list[tuple[int, np.ndarray]]:
    """(segment number, ImagePositionPatient) of every frame of a SEG."""
    shared = seg.get("SharedFunctionalGroupsSequence", [None])[0]
    out = []
    for fg in seg.PerFrameFunctionalGroupsSequence:
        seg_no = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        pp = fg.get("PlanePositionSequence") or (
            shared.get("PlanePositionSequence") if shared else None
        )
        if not pp:
            raise ImportError_("SEG frame without PlanePositionSequence")
        out.append((seg_no, np.array([float(x) for x in pp[0].ImagePositionPatient])))
    return out


def _ct_index(folders: list[Path]) -> list[pydicom.Dataset]:
    out: list[pydicom.Dataset] = []
    for folder in folders:
        for p in sorted(folder.rglob("*")) if folder.is_dir() else [folder]:
            if not p.is_file():
                continue
            try:
                ds = pydicom.dcmread(p, force=True)
            except (OSError, InvalidDicomError, ValueError, TypeError, KeyError) as exc:
                log.warning("%s: not read as DICOM, left out of the CT index: %s", p, exc)
                continue
            if "PixelData" in ds and str(ds.get("Modality", "")) == "CT":
                out.append(ds)
    return out


def seg_samples(
    seg_path: Path,
    mapping: dict[str, DiscClass | None],
    cts: list[pydicom.Dataset],
    window: Windowing,
) -> list[Sample]:
    """One sample per CT slice that a SEG has any mapped segment on."""
    seg = pydicom.dcmread(seg_path)
    if str(seg.get("SOPClassUID", "")) != SEG_STORAGE:
        raise ImportError_(f"{seg_path}: not a DICOM Segmentation Storage object")
    classes = {
        int(s.SegmentNumber): _map(mapping, str(s.SegmentLabel), seg_path)
        for s in seg.SegmentSequence
    }
    frames = seg.pixel_array
    if frames.ndim == 2:
        frames = frames[None]
    positions = frame_positions(seg)
    study = str(seg.StudyInstanceUID)
    candidates = [
        c for c in cts if str(c.get("FrameOfReferenceUID", "")) == str(seg.FrameOfReferenceUID)
    ]
    by_slice: dict[int, list[Instance]] = {}
    for f, (seg_no, ipp) in enumerate(positions):
        cls = classes.get(seg_no)
        if cls is None or not frames[f].any():
            continue
        match = [
            i
            for i, c in enumerate(candidates)
            if np.allclose([float(x) for x in c.ImagePositionPatient], ipp, atol=0.01)
        ]
        if not match:
            raise ImportError_(
                f"{seg_path}: no CT slice at {np.round(ipp, 2).tolist()} in frame of reference "
                f"{seg.FrameOfReferenceUID}; pass the SEG's CT series with --ct"
            )
        ct = candidates[match[0]]
        if (int(ct.Rows), int(ct.Columns)) != frames[f].shape:
            raise ImportError_(
                f"{seg_path}: frame {f + 1} is {frames[f].shape}, its CT slice "
                f"{int(ct.Rows)}x{int(ct.Columns)}"
            )
        for poly in mask_polygons(frames[f] > 0):
            by_slice.setdefault(match[0], []).append(Instance(cls, poly))
    samples = []
    for i, inst in sorted(by_slice.items()):
        ct = candidates[i]
        hu = ct.pixel_array.astype(np.float32) * float(ct.get("RescaleSlope", 1)) + float(
            ct.get("RescaleIntercept", 0)
        )
        samples.append(
            Sample(
                name=f"{seg_path.stem}_{int(ct.get('InstanceNumber', i) or i):04d}",
                image=window.apply(hu),
                instances=tuple(inst),
                study=study,
                target=most_severe({x.cls for x in inst}),
                source=f"seg:{seg_path.name}",
            )
        )
    return samples


def build_from_seg(
    inputs: list[Path],
    out: Path,
    *,
    mapping: Path | None,
    ct: list[Path],
    val_fraction: float = 0.15,
    seed: int = 0,
    window: Windowing | None = None,
) -> DatasetWriter:
    """SEG files (or folders of them) plus the CT folders they were made on."""
    window = window or Windowing()
    table = load_mapping(mapping)
    segs: list[Path] = []
    for p in inputs:
        for f in [p] if p.is_file() else sorted(p.rglob("*")):
            if f.is_file():
                try:
                    if (
                        str(pydicom.dcmread(f, stop_before_pixels=True).get("SOPClassUID", ""))
                        == SEG_STORAGE
                    ):
                        segs.append(f)
                except (OSError, InvalidDicomError, ValueError, TypeError, KeyError) as exc:
                    log.info("%s: not a DICOM file, not taken as a SEG: %s", f, exc)
                    continue
    if not segs:
        raise ValueError(f"no DICOM SEG files in {', '.join(map(str, inputs))}")
    cts = _ct_index(list(ct) or sorted({s.parent for s in segs}))
    samples = [x for s in segs for x in seg_samples(s, table, cts, window)]
    if not samples:
        raise ValueError("the SEGs hold no mapped segment on any CT slice")
    splits = split_studies(sorted({s.study for s in samples}), val_fraction, seed)
    writer = DatasetWriter(
        out,
        extra={
            "source": "seg",
            "views": "native",
            "windowing": {"center": window.center, "width": window.width},
            "mapping": str(mapping),
        },
    )
    for s in samples:
        writer.add(s, splits[s.study])
    writer.finish()
    return writer
