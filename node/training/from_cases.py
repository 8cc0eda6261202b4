"""A dataset from the hospital's labelled cases (radiologists' corrections, `node.cases`),
split by patient, with a test split that never moves once chosen.

Each patient's split is chosen once, the first time a dataset is built with one of their
cases, and written to ``splits.json`` in the cases folder; later builds read it and only
choose for new patients (by a hash of the patient's id, so the choice does not depend on
which other patients there are). The test split's cases are never written into a dataset:
they are listed (``test-studies/``, one link per case) for `idaics evaluate --studies` and the
model gate, so that every model is measured on the same patients.

Views: disc-centred slices as the bundled model sees them (the default, to fine-tune it), or
native (the scanner's own axial slices through the labelled discs and a mid-sagittal
reformat at the series' pixel size, as the paper annotated them).
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np

from node.analysis.volume import load_folder
from node.classes import DiscClass
from node.geometry import Plane, sample_plane
from node.inference.interface import ViewSpec, Windowing
from node.phantom.generate import SERIES_DIR, TRUTH_FILE, load_labels
from node.training.from_phantoms import study_samples
from node.training.yolo import DatasetWriter, Sample, class_map_instances

SPLITS_FILE = "splits.json"
TEST_STUDIES = "test-studies"
SPLITS = ("train", "val", "test")


def case_folders(root: Path) -> list[Path]:
    """The case folders (with truth.json and case.json) under ``root``."""
    from node.cases import CASE_FILE

    return sorted(
        p.parent for p in Path(root).glob(f"*/{CASE_FILE}") if (p.parent / TRUTH_FILE).is_file()
    )


def patient_key(about: dict) -> str:
    """Whom a case (its case.json) is of: the patient ID, else the study."""
    return str(about.get("patient_id") or f"study:{about['study_instance_uid']}")


def patient_of(case: Path) -> str:
    from node.cases import CASE_FILE

    return patient_key(json.loads((case / CASE_FILE).read_text()))


def _choose(patient: str, test_fraction: float, val_fraction: float) -> str:
    h = zlib.crc32(patient.encode()) / 2**32
    if h < test_fraction:
        return "test"
    return "val" if h < test_fraction + val_fraction else "train"


def chosen_splits(root: Path) -> dict[str, str]:
    """The splits chosen so far, patient -> split (``splits.json``; none yet: empty)."""
    path = Path(root) / SPLITS_FILE
    if not path.is_file():
        return {}
    raw = json.loads(path.read_text())
    known = {str(k): str(v) for k, v in raw.get("patients", {}).items()}
    if bad := set(known.values()) - set(SPLITS):
        raise ValueError(f"{path}: unknown split(s) {sorted(bad)}")
    return known


def frozen_splits(
    root: Path, patients: list[str], *, test_fraction: float = 0.2, val_fraction: float = 0.15
) -> dict[str, str]:
    """Each patient's split: as ``splits.json`` says, else chosen now and written there."""
    if not (0 <= test_fraction < 1 and 0 <= val_fraction < 1 and test_fraction + val_fraction < 1):
        raise ValueError("test and val fractions must be in [0, 1) and leave some for training")
    path = Path(root) / SPLITS_FILE
    known = chosen_splits(root)
    new = {p: _choose(p, test_fraction, val_fraction) for p in patients if p not in known}
    if new:
        known.update(new)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(
            json.dumps(
                {
                    "note": "Each patient's split, chosen once; never edit a patient's split.",
                    "patients": dict(sorted(known.items())),
                },
                indent=1,
            )
        )
        os.replace(tmp, path)
    return {p: known[p] for p in patients}


def native_samples(folder: Path, window: Windowing) -> Iterator[Sample]:
    """The scanner's own axial slices through each labelled disc, and a mid-sagittal reformat
    at the series' pixel size, with the case's labels."""
    truth = json.loads((folder / TRUTH_FILE).read_text())
    vol = load_folder(folder / SERIES_DIR)
    labels = load_labels(folder)
    g = vol.grid
    size, pixel = max(g.shape[1:]), min(g.spacing[1:])
    middle = g.to_patient((np.asarray(g.shape, float) - 1) / 2)
    left, post, head = np.eye(3)
    planes: list[tuple[str, str, Plane, str | None]] = []
    for lv in truth["levels"]:
        k = int(round(float(g.to_index(np.array(lv["centre_lps"]))[0])))
        centre = g.to_patient(np.array([k, (g.shape[1] - 1) / 2, (g.shape[2] - 1) / 2]))
        planes.append(
            (f"{lv['level']}_axial", "axial", Plane(centre, left, post, size, pixel), lv["level"])
        )
    x = float(np.mean([lv["centre_lps"][0] for lv in truth["levels"]]))
    mid = Plane(np.array([x, middle[1], middle[2]]), post, -head, size, pixel)
    planes.append(("sagittal", "sagittal", mid, None))
    for name, view, plane, level in planes:
        cls = sample_plane(labels.disc_class, labels.grid, plane, order=0)
        inst = class_map_instances(cls)
        if not inst:
            continue
        img = window.apply(sample_plane(vol.hu, g, plane, order=1, fill=-1000.0))
        target = next((i.cls for i in inst if i.cls is not DiscClass.SCHMORL), inst[0].cls)
        yield Sample(
            name=f"{folder.name}_{name}",
            image=img,
            instances=inst,
            study=folder.name,
            level=level or "",
            view=view,
            target=target,
            source="case",
        )


def build_from_cases(
    root: Path,
    out: Path,
    *,
    views: str = "disc",
    test_fraction: float = 0.2,
    val_fraction: float = 0.15,
    spec: ViewSpec | None = None,
    window: Windowing | None = None,
) -> DatasetWriter:
    """Write a dataset of the train and val patients' cases; link the test patients' cases."""
    if views not in ("disc", "native"):
        raise ValueError(f"views must be disc or native, not {views!r}")
    spec = spec or ViewSpec()
    window = window or Windowing()
    cases = case_folders(root)
    if not cases:
        raise ValueError(f"{root}: no labelled cases (folders with case.json and truth.json)")
    patients = {c: patient_of(c) for c in cases}
    splits = frozen_splits(
        root, sorted(set(patients.values())), test_fraction=test_fraction, val_fraction=val_fraction
    )
    by_split = {s: [c for c in cases if splits[patients[c]] == s] for s in SPLITS}
    writer = DatasetWriter(
        out,
        extra={
            "source": "cases",
            "windowing": asdict(window),
            "views": asdict(spec) if views == "disc" else "native",
            "cases": str(Path(root).resolve()),
            "studies": {s: [c.name for c in v] for s, v in by_split.items()},
            "patients": {
                s: sum(1 for p in set(patients.values()) if splits[p] == s) for s in SPLITS
            },
        },
    )
    for split in ("train", "val"):
        for case in by_split[split]:
            samples = (
                study_samples(case, spec, window)
                if views == "disc"
                else native_samples(case, window)
            )
            for sample in samples:
                writer.add(sample, split)
    test = out / TEST_STUDIES
    test.mkdir(parents=True, exist_ok=True)
    for link in test.iterdir():
        link.unlink()
    for case in by_split["test"]:
        (test / case.name).symlink_to(case.resolve(), target_is_directory=True)
    writer.finish()
    return writer
