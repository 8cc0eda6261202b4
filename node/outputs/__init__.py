"""DICOM objects made from a study's result: SEG, TID 1500 SR and key images."""

from node.outputs.build import DicomOutputs, build_outputs, write_outputs
from node.outputs.settings import OBJECTS, OutputSettings

__all__ = ["OBJECTS", "DicomOutputs", "OutputSettings", "build_outputs", "write_outputs"]
