"""Read the instances of one CT series into a HU volume on a patient-space grid."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from node.geometry import Grid

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PIXEL_DATA = 0x7FE00010
#: Relative spread of slice gaps above which a series is refused.
MAX_GAP_SPREAD = 0.05
#: A gantry tilt (slices shifted sideways along the stack: a sheared grid) is taken as
#: acquired up to this angle, the most a CT gantry tilts; a larger one is refused.
MAX_TILT_DEG = 30.0
#: ... and below this it is rounding in the positions, not a tilt.
TILT_NOTED_DEG = 0.5
#: The slices' sideways shift must follow a straight line to within this (mm) plus 1% of
#: the stack's length: a tilt shifts every slice by the same step.
SHEAR_FIT_MM = 0.5
MAX_OBLIQUE_DEG = 30.0
#: Missing slices are filled by interpolation up to this share of the series and run length.
MAX_MISSING_SHARE = 0.05
MAX_MISSING_RUN = 2


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
    slice_index: tuple[int, ...] = ()  # volume index k of each instance (missing slices are filled)
    warnings: tuple[str, ...] = ()
    #: The instances' headers (no pixel data) in slice order: what derived objects copy
    #: their patient, study and frame-of-reference modules from and reference.
    headers: tuple[Dataset, ...] = ()
    #: The received instances' headers: the same as ``headers`` for a single-frame series, the
    #: one multi-frame instance (whose frames the headers describe) for an enhanced CT.
    instances: tuple[Dataset, ...] = ()
    #: Frame index (0-based) within its instance of each header's slice.
    frames: tuple[int, ...] = ()

    @property
    def multi_frame(self) -> bool:
        return len(self.instances) == 1 and len(self.headers) > 1


def _read(path: Path) -> Dataset | None:
    try:
        return pydicom.dcmread(path, force=True)
    except Exception as exc:  # unreadable file: skip it, say why
        log.warning("skipping %s: not readable as DICOM (%s)", path.name, exc)
        return None


def _orientation(ds: Dataset) -> tuple[float, ...]:
    return tuple(np.round(np.array(ds.ImageOrientationPatient, dtype=float), 3))


#: The geometry attributes of a slice, with how many numbers each holds.
GEOMETRY = {"ImageOrientationPatient": 6, "ImagePositionPatient": 3, "PixelSpacing": 2}


def _check_instance(ds: Dataset) -> None:
    """Refuse, with a one-line reason naming the instance, a slice whose geometry is not
    numbers or whose pixels are not one grey sample: a careless modality's mistakes are a
    reason to skip the series, not an error to retry."""
    who = f"instance {ds.get('SOPInstanceUID', '?')}"
    for kw, n in GEOMETRY.items():
        value = ds.get(kw)
        items = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
        try:
            numbers = [float(x) for x in items]
        except (TypeError, ValueError):
            numbers = []
        if len(numbers) != n or not np.all(np.isfinite(numbers)):
            raise VolumeError(f"{who}: {kw} {str(value)!r} is not {n} numbers")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise VolumeError(f"{who}: SamplesPerPixel {ds.SamplesPerPixel}: not a greyscale CT image")


def load_series(paths: Iterable[Path]) -> Volume:
    """Load one axial CT series; raises `VolumeError` with the reason when it cannot.

    Slices are sorted by their position along the slice normal (not by file name or
    instance number), rescaled to HU, and ordered from the most cranial to the most caudal.
    """
    read = [ds for p in sorted(paths) if (ds := _read(p)) is not None and "PixelData" in ds]
    if not read:
        raise VolumeError("no image instances")
    multi = [ds for ds in read if int(ds.get("NumberOfFrames") or 1) > 1]
    if multi and len(read) > 1:
        raise VolumeError(
            f"{len(multi)} multi-frame instance(s) mixed with {len(read) - len(multi)} other(s)"
        )
    datasets = _frames(read[0]) if multi else read
    warnings: list[str] = []
    images = [
        ds
        for ds in datasets
        if "LOCALIZER" not in [str(x).upper() for x in ds.get("ImageType", [])]
    ]
    if len(images) < len(datasets):
        warnings.append(f"{len(datasets) - len(images)} localizer image(s) left out")
        datasets = images
    if not datasets:
        raise VolumeError("only localizer images")
    modalities = Counter(str(ds.get("Modality", "")) for ds in datasets)
    if set(modalities) != {"CT"}:
        raise VolumeError(f"not a CT series (modalities {dict(modalities)})")
    series = Counter(str(ds.get("SeriesInstanceUID", "")) for ds in datasets)
    if len(series) > 1:
        raise VolumeError(f"instances of {len(series)} series mixed together")
    missing = [
        kw
        for kw in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing")
        if any(kw not in ds for ds in datasets)
    ]
    if missing:
        raise VolumeError(f"no {', '.join(missing)}: the slices cannot be placed in patient space")
    for ds in datasets:
        _check_instance(ds)
    iops = Counter(_orientation(ds) for ds in datasets)
    if len(iops) > 1:
        main_iop, n_main = iops.most_common(1)[0]
        if n_main < 0.9 * len(datasets):
            raise VolumeError(f"slices have {len(iops)} different orientations")
        odd = len(datasets) - n_main
        warnings.append(f"{odd} image(s) in another orientation left out")
        datasets = [ds for ds in datasets if _orientation(ds) == main_iop]
    iop = np.array(datasets[0].ImageOrientationPatient, dtype=float)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    off_axis = float(np.degrees(np.arccos(min(1.0, abs(normal[2])))))
    if off_axis > MAX_OBLIQUE_DEG:
        raise VolumeError(
            f"not an axial series (slice normal {off_axis:.0f} degrees from the body axis)"
        )
    pos = np.array([[float(x) for x in ds.ImagePositionPatient] for ds in datasets])
    along = pos @ normal
    order = np.argsort(-along, kind="stable")
    datasets = [datasets[i] for i in order]
    pos, along = pos[order], along[order]
    keep = np.concatenate([[True], np.abs(np.diff(along)) > 1e-3])
    if not keep.all():
        warnings.append(f"{int((~keep).sum())} duplicate slice position(s) dropped")
        datasets = [d for d, k in zip(datasets, keep) if k]
        pos, along = pos[keep], along[keep]
    if len(datasets) < 2:
        raise VolumeError("fewer than two distinct slices")
    shear = _shear(pos, along, normal)
    tilt = float(np.degrees(np.arctan(np.linalg.norm(shear))))
    if tilt > MAX_TILT_DEG:
        raise VolumeError(
            f"gantry tilt of {tilt:.1f} degrees (slices shifted sideways along the stack); "
            f"the node takes up to {MAX_TILT_DEG:g} degrees"
        )
    if tilt > TILT_NOTED_DEG:
        warnings.append(f"gantry tilt of {tilt:.1f} degrees: slices placed as acquired")
    else:
        shear = np.zeros(3)
    gaps = -np.diff(along)
    # the regular spacing: the gaps that are not a missing slice or more
    spacing = float(np.median(gaps[gaps < 1.5 * gaps.min()]))
    steps = gaps / spacing
    whole = np.rint(steps)
    if np.any(np.abs(steps - whole) > MAX_GAP_SPREAD) or np.any(whole < 1):
        raise VolumeError(f"slice spacing varies ({gaps.min():.2f}-{gaps.max():.2f} mm)")
    n_missing = int((whole - 1).sum())
    if n_missing:
        if n_missing > MAX_MISSING_SHARE * len(datasets) or whole.max() > MAX_MISSING_RUN + 1:
            raise VolumeError(f"{n_missing} slice(s) missing (gaps up to {gaps.max():.1f} mm)")
        warnings.append(
            f"{n_missing} missing slice(s) filled by interpolation (gaps up to {gaps.max():.1f} mm)"
        )
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    ps = [float(x) for x in datasets[0].PixelSpacing]
    index = np.concatenate([[0], np.cumsum(whole)]).astype(int)
    hu = np.empty((int(index[-1]) + 1, rows, cols), dtype=np.float32)
    for k, ds in zip(index, datasets):
        if int(ds.Rows) != rows or int(ds.Columns) != cols:
            raise VolumeError("slices differ in size")
        if not np.allclose([float(x) for x in ds.PixelSpacing], ps, atol=1e-3):
            raise VolumeError("slices differ in pixel spacing")
        try:
            arr = (ds._frame_pixels if hasattr(ds, "_frame_pixels") else ds.pixel_array).astype(
                np.float32
            )
        except Exception as exc:  # a codec missing or corrupt data: say which
            raise VolumeError(
                f"cannot decode pixel data ({ds.file_meta.get('TransferSyntaxUID', '?')}): {exc}"
            ) from None
        hu[k] = arr * float(ds.get("RescaleSlope", 1) or 1) + float(
            ds.get("RescaleIntercept", 0) or 0
        )
    for a, b in zip(index[:-1], index[1:]):
        for k in range(a + 1, b):  # fill missing slices linearly
            w = (k - a) / (b - a)
            hu[k] = (1 - w) * hu[a] + w * hu[b]
    step = -(normal + shear) * spacing  # along the stack, sideways too where it is sheared
    affine = np.eye(4)
    affine[:3, 0] = step
    affine[:3, 1] = col_dir * ps[0]
    affine[:3, 2] = row_dir * ps[1]
    affine[:3, 3] = pos[0]
    first = datasets[0]
    headers = tuple(_header(ds) for ds in datasets)
    return Volume(
        hu=hu,
        grid=Grid(hu.shape, affine),
        study_uid=str(first.get("StudyInstanceUID", "")),
        series_uid=str(first.get("SeriesInstanceUID", "")),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        sop_instance_uids=tuple(str(ds.get("SOPInstanceUID", "")) for ds in datasets),
        slice_index=tuple(int(k) for k in index),
        warnings=tuple(warnings),
        headers=headers,
        instances=(_header(read[0]),) if multi else headers,
        frames=tuple(int(getattr(ds, "_frame_index", 0)) for ds in datasets),
    )


def _shear(pos: np.ndarray, along: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """The slices' sideways shift per millimetre along the slice normal (a gantry tilt's
    shear: the tangent of the tilt angle, in the slice plane), fitted as a straight line
    through the positions ``pos`` at distances ``along`` the normal."""
    rel = along - along[0]
    side = pos - pos[0] - np.outer(rel, normal)  # in the slice plane
    span = float(abs(rel[-1]))
    if span < 1e-6:
        return np.zeros(3)
    shear = np.linalg.lstsq(rel[:, None], side, rcond=None)[0][0]
    off = float(np.abs(side - np.outer(rel, shear)).max())
    if off > SHEAR_FIT_MM + 0.01 * span:
        raise VolumeError(
            f"slices are shifted sideways unevenly along the stack (up to {off:.1f} mm off a "
            "straight line): they cannot be placed on one grid"
        )
    return shear


def _frames(ds: Dataset) -> list[Dataset]:
    """The frames of an enhanced (multi-frame) CT instance as single-slice datasets.

    Each carries the plane position, orientation, pixel measures and rescale of its frame
    (per-frame functional groups, else the shared ones), its pixels, and its frame index.
    """
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        raise VolumeError(
            f"cannot decode pixel data ({ds.file_meta.get('TransferSyntaxUID', '?')}): {exc}"
        ) from None
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", [])
    if len(per_frame) != pixels.shape[0]:
        raise VolumeError("multi-frame instance without a functional group per frame")

    def group(fg: Dataset, keyword: str) -> Dataset | None:
        for src in (fg, shared):
            if keyword in src and len(src[keyword].value):
                return src[keyword].value[0]
        return None

    top = {
        tag: elem
        for tag, elem in ds.items()
        if tag not in (PIXEL_DATA, 0x52009229, 0x52009230, 0x00280008)
    }  # pixels, functional groups, frames
    out = []
    for i, fg in enumerate(per_frame):
        f = Dataset(dict(top))
        f.file_meta = ds.file_meta
        pos, ori, meas = (
            group(fg, "PlanePositionSequence"),
            group(fg, "PlaneOrientationSequence"),
            group(fg, "PixelMeasuresSequence"),
        )
        if pos is None or ori is None or meas is None:
            raise VolumeError(f"frame {i + 1} has no plane position, orientation or pixel measures")
        f.ImagePositionPatient = pos.ImagePositionPatient
        f.ImageOrientationPatient = ori.ImageOrientationPatient
        f.PixelSpacing = meas.PixelSpacing
        if "SliceThickness" in meas:
            f.SliceThickness = meas.SliceThickness
        rescale = group(fg, "PixelValueTransformationSequence")
        if rescale is not None:
            f.RescaleSlope, f.RescaleIntercept = (
                rescale.get("RescaleSlope", 1),
                rescale.get("RescaleIntercept", 0),
            )
        f._frame_pixels = pixels[i]
        f._frame_index = i
        out.append(f)
    return out


def _header(ds: Dataset) -> Dataset:
    """A copy of ``ds`` without its pixel data."""
    out = Dataset({tag: elem for tag, elem in ds.items() if tag != PIXEL_DATA})
    out.file_meta = ds.file_meta
    return out


def load_folder(folder: Path) -> Volume:
    """Load every file under ``folder`` as one series."""
    return load_series(p for p in Path(folder).rglob("*") if p.is_file())


def load_nifti(path: Path) -> Volume:
    """A NIfTI CT volume (HU) as a `Volume`, for research data that has no DICOM."""
    import nibabel as nib

    img: Any = nib.load(str(path))  # a NIfTI image: dataobj and affine
    hu = np.asarray(img.dataobj, dtype=np.float32)
    if hu.ndim != 3:
        raise VolumeError(f"{path}: expected a 3D volume, got shape {hu.shape}")
    ras_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    return Volume(
        hu=hu,
        grid=Grid(hu.shape, ras_to_lps @ img.affine),
        study_uid="",
        series_uid="",
        frame_of_reference_uid="",
        sop_instance_uids=(),
    )
