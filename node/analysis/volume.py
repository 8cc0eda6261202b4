"""Read the instances of one CT series into a HU volume on a patient-space grid."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from node.geometry import Grid

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
#: Relative spread of slice gaps above which a series is refused.
MAX_GAP_SPREAD = 0.05


class VolumeError(ValueError):
    """A series that cannot be analysed, with the reason in words."""


@dataclass(frozen=True)
class Volume:
    hu: np.ndarray  # float32 (k, r, c)
    grid: Grid
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: tuple[str, ...]  # in slice order
    warnings: tuple[str, ...] = ()


def _read(path: Path) -> Dataset | None:
    try:
        return pydicom.dcmread(path, force=True)
    except Exception as exc:  # unreadable file: skip it, say why
        log.warning("skipping %s: not readable as DICOM (%s)", path.name, exc)
        return None


def load_series(paths: Iterable[Path]) -> Volume:
    """Load one axial CT series; raises `VolumeError` with the reason when it cannot.

    Slices are sorted by their position along the slice normal (not by file name or
    instance number), rescaled to HU, and ordered from the most cranial to the most caudal.
    """
    datasets = [ds for p in sorted(paths) if (ds := _read(p)) is not None and "PixelData" in ds]
    if not datasets:
        raise VolumeError("no image instances")
    modalities = Counter(str(ds.get("Modality", "")) for ds in datasets)
    if set(modalities) != {"CT"}:
        raise VolumeError(f"not a CT series (modalities {dict(modalities)})")
    series = Counter(str(ds.get("SeriesInstanceUID", "")) for ds in datasets)
    if len(series) > 1:
        raise VolumeError(f"instances of {len(series)} series mixed together")
    iops = {tuple(np.round(np.array(ds.ImageOrientationPatient, dtype=float), 4)) for ds in datasets}
    if len(iops) > 1:
        raise VolumeError("slices have different orientations")
    iop = np.array(next(iter(iops)), dtype=float)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    pos = np.array([[float(x) for x in ds.ImagePositionPatient] for ds in datasets])
    along = pos @ normal
    order = np.argsort(-along, kind="stable")
    datasets = [datasets[i] for i in order]
    pos, along = pos[order], along[order]
    keep = np.concatenate([[True], np.abs(np.diff(along)) > 1e-3])
    warnings = []
    if not keep.all():
        warnings.append(f"{int((~keep).sum())} duplicate slice positions dropped")
        datasets = [d for d, k in zip(datasets, keep) if k]
        pos, along = pos[keep], along[keep]
    if len(datasets) < 2:
        raise VolumeError("fewer than two distinct slices")
    gaps = -np.diff(along)
    spacing = float(np.median(gaps))
    if (gaps.max() - gaps.min()) > MAX_GAP_SPREAD * spacing:
        raise VolumeError(f"slice spacing varies ({gaps.min():.2f}-{gaps.max():.2f} mm)")
    step = (pos[-1] - pos[0]) / (len(pos) - 1)
    if abs(abs(step @ normal) - np.linalg.norm(step)) > 1e-3 * np.linalg.norm(step):
        raise VolumeError("slices are sheared against their normal (gantry tilt)")
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    ps = [float(x) for x in datasets[0].PixelSpacing]
    hu = np.empty((len(datasets), rows, cols), dtype=np.float32)
    for k, ds in enumerate(datasets):
        if int(ds.Rows) != rows or int(ds.Columns) != cols:
            raise VolumeError("slices differ in size")
        arr = ds.pixel_array.astype(np.float32)
        hu[k] = arr * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    affine = np.eye(4)
    affine[:3, 0] = step
    affine[:3, 1] = col_dir * ps[0]
    affine[:3, 2] = row_dir * ps[1]
    affine[:3, 3] = pos[0]
    first = datasets[0]
    return Volume(
        hu=hu,
        grid=Grid((len(datasets), rows, cols), affine),
        study_uid=str(first.get("StudyInstanceUID", "")),
        series_uid=str(first.get("SeriesInstanceUID", "")),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        sop_instance_uids=tuple(str(ds.get("SOPInstanceUID", "")) for ds in datasets),
        warnings=tuple(warnings),
    )


def load_folder(folder: Path) -> Volume:
    """Load every file under ``folder`` as one series."""
    return load_series(p for p in Path(folder).rglob("*") if p.is_file())
