"""Write a phantom's HU volume as a complete CT Image Storage series."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from node import __version__
from node.geometry import Grid
from node.phantom.plan import StudyPlan

#: Named in Manufacturer so that nobody mistakes a phantom for a patient.
MANUFACTURER = "IDAICS synthetic phantom (not a patient)"
IMPLEMENTATION_UID = generate_uid(entropy_srcs=["idaics-node implementation class"])


def phantom_uid(plan: StudyPlan, what: str) -> str:
    """A UID that depends only on the seed, the study index and ``what``."""
    return generate_uid(entropy_srcs=["idaics-phantom", str(plan.seed), str(plan.index), what])


def _base_dataset(plan: StudyPlan, grid: Grid) -> Dataset:
    sc = plan.scanner
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = plan.study_date
    ds.SeriesDate = plan.study_date
    ds.AcquisitionDate = plan.study_date
    ds.ContentDate = plan.study_date
    ds.StudyTime = "100000"
    ds.SeriesTime = "100500"
    ds.AcquisitionTime = "100500"
    ds.ContentTime = "100500"
    ds.AccessionNumber = f"PH{plan.seed:05d}{plan.index:04d}"[-16:]
    ds.Modality = "CT"
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = "IDAICS phantom generator"
    ds.ReferringPhysicianName = ""
    ds.StationName = "PHANTOM"
    ds.StudyDescription = "CT LUMBAR SPINE (PHANTOM)"
    ds.SeriesDescription = f"Lumbar spine {sc.slice_thickness:g}mm {sc.kernel.title()} (phantom)"
    ds.ManufacturerModelName = sc.model
    ds.PatientName = f"PHANTOM^SPINE^{plan.seed}-{plan.index}"
    ds.PatientID = f"PHANTOM-{plan.seed}-{plan.index}"
    ds.PatientBirthDate = ""
    ds.PatientSex = plan.patient_sex
    ds.PatientAge = f"{plan.patient_age:03d}Y"
    ds.PatientIdentityRemoved = "NO"
    ds.BodyPartExamined = "LSPINE"
    ds.SliceThickness = sc.slice_thickness
    ds.SpacingBetweenSlices = sc.slice_spacing
    ds.KVP = sc.kvp
    ds.DeviceSerialNumber = "0000"
    ds.SoftwareVersions = f"idaics {__version__}"
    ds.DataCollectionDiameter = 500.0
    ds.ReconstructionDiameter = round(512 * sc.pixel_spacing, 2)
    ds.GantryDetectorTilt = 0.0
    ds.TableHeight = 150.0
    ds.RotationDirection = "CW"
    ds.ExposureTime = 500
    ds.XRayTubeCurrent = int(round(sc.tube_current_ma))
    ds.Exposure = int(round(sc.tube_current_ma * 0.5))
    ds.ConvolutionKernel = sc.kernel
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = phantom_uid(plan, "study")
    ds.SeriesInstanceUID = phantom_uid(plan, "series")
    ds.StudyID = f"{plan.index + 1}"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = phantom_uid(plan, "frame-of-reference")
    ds.PositionReferenceIndicator = ""
    ds.WindowCenterWidthExplanation = ["SOFT TISSUE", "BONE"]
    return ds


def write_series(hu: np.ndarray, grid: Grid, plan: StudyPlan, folder: Path) -> list[Path]:
    """Write one file per slice into ``folder``; returns the paths in slice order."""
    ds = _base_dataset(plan, grid)
    return _write_slices(
        hu, grid, ds, lambda what: phantom_uid(plan, what), plan.scanner.rescale_intercept, folder
    )


def write_volume_series(
    hu: np.ndarray,
    grid: Grid,
    folder: Path,
    *,
    uid: Callable[[str], str],
    patient: str,
    description: str,
    rescale_intercept: float = -1024.0,
) -> list[Path]:
    """Write any HU volume on an axial-ish grid as a CT series (a real CT with inserted lesions).

    ``uid(what)`` gives the study, series, frame-of-reference and slice UIDs.
    """
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    for tag in ("StudyDate", "SeriesDate", "ContentDate"):
        setattr(ds, tag, "20260101")
    for tag in ("StudyTime", "SeriesTime", "ContentTime"):
        setattr(ds, tag, "100000")
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "IDAICS lesion insertion (synthetic lesions)"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT SPINE (INSERTED LESIONS)"
    ds.SeriesDescription = description[:64]
    ds.PatientName = f"INSERTED^{patient}"[:64]
    ds.PatientID = f"INS-{patient}"[:64]
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"
    ds.BodyPartExamined = "SPINE"
    ds.SliceThickness = round(grid.spacing[0], 4)
    ds.SpacingBetweenSlices = round(grid.spacing[0], 4)
    ds.KVP = 120
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = uid("frame-of-reference")
    ds.PositionReferenceIndicator = ""
    return _write_slices(hu, grid, ds, uid, rescale_intercept, folder)


def _write_slices(
    hu: np.ndarray,
    grid: Grid,
    ds: Dataset,
    uid: Callable[[str], str],
    rescale_intercept: float,
    folder: Path,
) -> list[Path]:
    """The geometry, the image pixel module and the rescale of ``ds`` from ``grid``, then one
    file per slice."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"IDAICS_{__version__}"[:16]
    ds.file_meta = meta
    row_dir = grid.affine[:3, 2] / grid.spacing[2]  # along a row: increasing column
    col_dir = grid.affine[:3, 1] / grid.spacing[1]
    ds.ImageOrientationPatient = [round(float(x), 6) for x in (*row_dir, *col_dir)]
    ds.PixelSpacing = [round(grid.spacing[1], 6), round(grid.spacing[2], 6)]
    ds.Rows = grid.shape[1]
    ds.Columns = grid.shape[2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.WindowCenter = [40, 400]
    ds.WindowWidth = [400, 1800]
    ds.RescaleIntercept = rescale_intercept
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    stored = np.clip(np.rint(hu - rescale_intercept), -32768, 32767).astype("<i2")
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    paths = []
    for k in range(grid.shape[0]):
        pos = grid.to_patient(np.array([k, 0, 0]))
        sop = UID(uid(f"slice-{k}"))
        meta.MediaStorageSOPInstanceUID = sop
        ds.SOPInstanceUID = sop
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [round(float(x), 4) for x in pos]
        ds.SliceLocation = round(float(pos @ normal), 4)
        plane = stored[k]
        ds.SmallestImagePixelValue = int(plane.min())
        ds.LargestImagePixelValue = int(plane.max())
        ds.PixelData = plane.tobytes()
        path = folder / f"CT{k + 1:04d}.dcm"
        tmp = path.with_suffix(".tmp")
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
        paths.append(path)
    return paths
