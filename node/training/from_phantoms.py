"""Build a YOLO-seg dataset from phantom studies: disc-parallel axial and sagittal slices."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from node.analysis.views import disc_plane
from node.analysis.volume import load_folder
from node.classes import DiscClass
from node.geometry import sample_plane
from node.inference.interface import View, ViewSpec, Windowing
from node.phantom.generate import SERIES_DIR, TRUTH_FILE, load_labels
from node.training.yolo import DatasetWriter, Sample, class_map_instances, split_studies

#: Offsets of the axial slices along the disc normal and of the sagittal slices to the left.
AXIAL_OFFSETS_MM = (-1.0, 1.0)
SAGITTAL_OFFSETS_MM = (0.0, 6.0, -6.0)


def disc_frame(entry: dict) -> tuple[np.ndarray, np.ndarray]:
    """Centre and frame (left, posterior, cranial columns) of a truth.json level."""
    up = np.array(entry["normal_lps"], dtype=float)
    left = np.array(entry["left_lps"], dtype=float)
    return np.array(entry["centre_lps"], dtype=float), np.stack(
        [left, np.cross(up, left), up], axis=1
    )


@dataclass(frozen=True)
class Randomise:
    """Domain randomisation of a slice before windowing, so the model does not learn one
    scanner: window jitter, extra blur (a softer kernel), extra correlated noise (a lower dose)."""

    share: float = 0.6  # of the slices that get any of it
    window_shift_hu: float = 25.0
    window_scale: tuple[float, float] = (0.8, 1.25)
    blur_px: tuple[float, float] = (0.4, 1.3)
    noise_hu: tuple[float, float] = (5.0, 30.0)

    def apply(
        self, hu: np.ndarray, window: Windowing, rng: np.random.Generator
    ) -> tuple[np.ndarray, Windowing]:
        if rng.random() >= self.share:
            return hu, window
        if rng.random() < 0.4:
            hu = ndimage.gaussian_filter(hu, float(rng.uniform(*self.blur_px)))
        if rng.random() < 0.4:
            noise = ndimage.gaussian_filter(rng.standard_normal(hu.shape).astype(np.float32), 1.0)
            hu = hu + noise * (float(rng.uniform(*self.noise_hu)) / max(float(noise.std()), 1e-6))
        window = Windowing(
            window.center + float(rng.uniform(-1, 1)) * self.window_shift_hu,
            window.width * float(rng.uniform(*self.window_scale)),
        )
        return hu, window


def _target(entry: dict) -> DiscClass:
    """The class a level's disc slices are labelled with; a real disc left as scanned counts
    as its ``assumed_for_training`` class (see `node.phantom.insert`)."""
    return DiscClass(entry.get("assumed_for_training") or entry["morphology"])


def study_samples(
    folder: Path, spec: ViewSpec, window: Windowing, randomise: Randomise | None = None
) -> Iterator[Sample]:
    """The samples of one study (a phantom, or a real CT with inserted lesions): per disc,
    axial and sagittal slices, and slices through each Schmorl's node."""
    truth = json.loads((folder / TRUTH_FILE).read_text())
    source = truth.get("source") or ("inserted" if "base" in truth else "phantom")
    rng = np.random.default_rng(zlib.crc32(folder.name.encode())) if randomise else None
    vol = load_folder(folder / SERIES_DIR)
    labels = load_labels(folder)
    study = folder.name
    for entry in truth["levels"]:
        centre, frame = disc_frame(entry)
        target = _target(entry)
        shots: list[tuple[View, float, np.ndarray, DiscClass]] = []
        shots += [(View.AXIAL, off, centre, target) for off in AXIAL_OFFSETS_MM]
        shots += [(View.SAGITTAL, off, centre, target) for off in SAGITTAL_OFFSETS_MM]
        node = entry.get("schmorl")
        if node:
            nc = np.array(node["centre_lps"], dtype=float)
            d = nc - centre
            shots.append((View.AXIAL, float(d @ frame[:, 2]), centre, DiscClass.SCHMORL))
            shots.append((View.SAGITTAL, float(d @ frame[:, 0]), centre, DiscClass.SCHMORL))
        for i, (view, off, c, tgt) in enumerate(shots):
            plane = disc_plane(view, c, frame, spec, offset_mm=off)
            hu = sample_plane(vol.hu, vol.grid, plane, order=1, fill=-1000.0)
            win = window
            if randomise is not None and rng is not None:
                hu, win = randomise.apply(hu, window, rng)
            img = win.apply(hu)
            cls = sample_plane(labels.disc_class, labels.grid, plane, order=0)
            yield Sample(
                name=f"{study}_{entry['level']}_{view.value}_{i}",
                image=img,
                instances=class_map_instances(cls),
                study=study,
                level=entry["level"],
                view=view.value,
                target=tgt,
                source=source,
            )


def build_from_phantoms(
    studies: list[Path],
    out: Path,
    *,
    val_fraction: float = 0.15,
    seed: int = 0,
    spec: ViewSpec | None = None,
    window: Windowing | None = None,
    randomise: Randomise | None = None,
    progress: bool = True,
) -> DatasetWriter:
    """Write a dataset from phantom study folders, split by study."""
    from tqdm import tqdm

    spec = spec or ViewSpec()
    window = window or Windowing()
    if not studies:
        raise ValueError("no phantom studies (folders with truth.json) given")
    for s in studies:
        if not (s / TRUTH_FILE).is_file():
            raise ValueError(f"{s}: not a phantom study (no {TRUTH_FILE})")
    splits = split_studies([s.name for s in studies], val_fraction, seed)
    writer = DatasetWriter(
        out,
        extra={
            "source": "phantoms",
            "windowing": asdict(window),
            "randomise": asdict(randomise) if randomise else None,
            "views": asdict(spec),
            "studies": {
                "train": sorted(k for k, v in splits.items() if v == "train"),
                "val": sorted(k for k, v in splits.items() if v == "val"),
            },
        },
    )
    for folder in tqdm(studies, desc="dataset", unit="study", disable=not progress):
        for sample in study_samples(folder, spec, window, randomise):
            writer.add(sample, splits[folder.name])
    writer.finish()
    return writer
