"""Build the configured DICOM objects for one analysed study and write them to a folder."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
from pydicom.dataset import Dataset

from node.analysis.study import StudyResult
from node.analysis.volume import Volume
from node.inference.model import ModelCard
from node.outputs import codes
from node.outputs.keyimages import build_key_images
from node.outputs.seg import build_seg
from node.outputs.segments import Segment, build_segments
from node.outputs.settings import OutputSettings
from node.outputs.sr import build_sr, build_volumetric_sr


def warm_up() -> None:
    """Read the DICOM standard's tables that highdicom loads on its first object (0.5-0.6 s
    here), so that a worker's first job does not pay for them. The loaders are highdicom's
    own cached functions: where a release has none of them, nothing is done."""
    from highdicom import _standard_utils as standard

    for name in ("get_sop_class_iod_map", "get_iod_module_map", "get_module_attribute_map"):
        loader = getattr(standard, name, None)
        if callable(loader):
            loader()


@dataclass(frozen=True)
class DicomOutputs:
    seg: Dataset | None
    sr: Dataset | None
    key_images: tuple[Dataset, ...]
    segments: tuple[Segment, ...]
    timings: dict[str, float] = field(default_factory=dict)
    sr_volumetric: Dataset | None = None

    def datasets(self) -> list[tuple[str, Dataset]]:
        """(file name, dataset) of every object, SEG first: the SR refers to it."""
        out = [("seg.dcm", self.seg)] if self.seg is not None else []
        out += [("sr.dcm", self.sr)] if self.sr is not None else []
        out += [("sr-volumetric.dcm", self.sr_volumetric)] if self.sr_volumetric is not None else []
        out += [(f"key-{i:02d}.dcm", ds) for i, ds in enumerate(self.key_images, start=1)]
        return out


def build_outputs(
    result: StudyResult,
    vol: Volume,
    card: ModelCard,
    settings: OutputSettings,
    previous: Sequence[Dataset] = (),
) -> DicomOutputs:
    """SEG (when a finding has a mask), SR and key images, as ``settings.objects`` asks.
    ``previous``: the SRs of an earlier analysis of the series, which the new SR replaces."""
    if not vol.headers:
        raise ValueError("DICOM outputs need a volume loaded from DICOM instances")
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    segments = (
        build_segments(result, vol.grid, vol.hu)
        if {"seg", "sr", "sr_volumetric"} & set(settings.objects)
        else []
    )
    tracking = {s.number: hd.UID() for s in segments}
    t["segments"] = time.perf_counter() - t0
    seg = None
    if "seg" in settings.objects and segments:
        t0 = time.perf_counter()
        seg = build_seg(segments, vol, card, settings, [tracking[s.number] for s in segments])
        t["seg"] = time.perf_counter() - t0
    sr = None
    if "sr" in settings.objects:
        t0 = time.perf_counter()
        sr = build_sr(result, vol, card, settings, segments, seg, tracking, previous)
        t["sr"] = time.perf_counter() - t0
    volumetric = None
    if "sr_volumetric" in settings.objects and seg is not None:
        t0 = time.perf_counter()
        volumetric = build_volumetric_sr(result, vol, card, settings, segments, seg, tracking)
        t["sr_volumetric"] = time.perf_counter() - t0
    keys: list[Dataset] = []
    if "key_images" in settings.objects:
        t0 = time.perf_counter()
        keys = build_key_images(result, vol, card, settings)
        t["key_images"] = time.perf_counter() - t0
    for ds in (seg, sr, volumetric):
        if ds is not None:
            codes.declare_local_scheme(ds)
    return DicomOutputs(seg, sr, tuple(keys), tuple(segments), t, volumetric)


def write_outputs(outputs: DicomOutputs, folder: Path) -> list[Path]:
    """Write each object atomically (temporary file, fsync, rename) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, ds in outputs.datasets():
        path = folder / name
        tmp = folder / f".{name}.tmp"
        with open(tmp, "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        paths.append(path)
    return paths
