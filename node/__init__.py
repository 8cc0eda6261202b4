"""IDAICS node: lumbar intervertebral disc classification on CT, DICOM in and DICOM out."""

__version__ = "0.1.0"
