"""DICOM objects made from a study's result: SEG, TID 1500 SR and key images.

The builders (highdicom, the analysis) load only when first used, so that importing
`node.outputs.settings` (the configuration does) stays cheap.
"""

from __future__ import annotations

from typing import Any

from node.outputs.settings import OBJECTS, OutputSettings

__all__ = ["OBJECTS", "DicomOutputs", "OutputSettings", "build_outputs", "write_outputs"]


def __getattr__(name: str) -> Any:
    if name in ("DicomOutputs", "build_outputs", "write_outputs"):
        from node.outputs import build

        return getattr(build, name)
    raise AttributeError(f"module 'node.outputs' has no attribute {name!r}")
