"""Radiologists' corrections: a DICOM SEG sent back to the node becomes a labelled case.

A radiologist edits the node's SEG in 3D Slicer or OHIF (or draws one) and sends it to the
node. A SEG is taken as a correction when it references a CT series the node analysed and is
not one the node made. Each segment is read for its level and class:

- the class from its label (after the level, e.g. "L4-L5 disc protrusion"): the node's own
  names, then the corrections mapping file (label -> class, or ``ignore``); where the label
  names none, from its segmented property type when that is one of the node's finding codes.
  The node's plain disc ("L4-L5 disc", disc anatomy) carries no class of its own;
- the level from its label, else its anatomic region code, else the analysed level nearest
  the segment (within `NEAREST_LEVEL_MM`).

A segment whose class or level cannot be read is recorded with the reason and left out; the
rest is kept. A level the correction has segments for is labelled with their classes (a plain
disc alone: normal); a level without segments is not labelled.

A case is a study folder as the dataset builders and `idaics evaluate --studies` read them
(``ct/``, ``truth.json``, ``labels.npz``), plus the SEG itself and ``case.json``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import yaml
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.analysis.volume import Volume, VolumeError, load_series
from node.classes import DiscClass
from node.config import Settings
from node.db import Job, LabelledCase, State
from node.geometry import frame_from_normal
from node.ingest.series import SEG_STORAGE
from node.jobs import audit, transition
from node.outputs import codes
from node.training.importers import frame_positions, mapping_entries

log = logging.getLogger(__name__)

CASE_FILE = "case.json"
SEG_FILE = "seg.dcm"
#: A segment without a level in its label or codes belongs to the analysed level nearest it.
NEAREST_LEVEL_MM = 20.0
#: A frame lies on a CT slice when its position is this close to the slice's (mm).
ON_SLICE_MM = 0.05

LEVEL = re.compile(r"^\s*(T12|L[1-5])\s*[-/ ]\s*(L[1-5]|S1)\b[\s:,-]*", re.IGNORECASE)
#: The node's own segment names (after the level): class, or None for the plain disc.
OWN_NAMES: dict[str, DiscClass | None] = {
    **{c.display.casefold(): c for c in DiscClass},
    **{c.value: c for c in DiscClass},
    "disc": None,
}


class CorrectionError(ValueError):
    """A SEG that cannot be taken as a correction, with the reason in words."""


@dataclass(frozen=True)
class SegmentRead:
    """What one segment of a correction says, or why it says nothing."""

    number: int
    label: str
    level: str | None
    cls: DiscClass | None  # None: the plain disc, or unreadable (then ``problem`` says why)
    problem: str | None = None
    #: The mapping file says to leave this label out.
    ignored: bool = False


@dataclass(frozen=True)
class LevelLabel:
    level: str
    classes: tuple[DiscClass, ...]
    node_classes: tuple[str, ...]  # what the node's analysis said

    @property
    def changed(self) -> bool:
        return sorted(c.value for c in self.classes) != sorted(self.node_classes)


@dataclass(frozen=True)
class Correction:
    seg_sop_uid: str
    study_uid: str
    series_uid: str  # the CT series it references
    segments: tuple[SegmentRead, ...]
    levels: tuple[LevelLabel, ...]

    @property
    def problems(self) -> list[str]:
        return [s.problem for s in self.segments if s.problem]


def load_mapping(path: Path | None) -> dict[str, DiscClass | None]:
    """The corrections mapping file: ``label: class`` (``ignore`` or null leaves it out), its
    labels compared without case; no file, or an empty one, maps nothing."""
    if path is None:
        return {}
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a table of label: class")
    return {label.casefold(): cls for label, cls in mapping_entries(raw, Path(path)).items()}


def referenced_series(seg: Dataset) -> tuple[str, str]:
    """(study, series) of the CT a SEG was drawn on."""
    try:
        series = str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
        return str(seg.StudyInstanceUID), series
    except (AttributeError, IndexError) as exc:
        raise CorrectionError(f"the SEG names no referenced series ({exc})") from None


def _code(item: Dataset, keyword: str) -> tuple[str, str] | None:
    seq = item.get(keyword)
    if not seq:
        return None
    return str(seq[0].CodeValue), str(seq[0].CodingSchemeDesignator)


def _class_of(label: str, rest: str, item: Dataset, mapping: dict) -> tuple[bool, DiscClass | None]:
    """(found, class) of a segment from its label, else its type code; class None: the plain
    disc (or, from the mapping, a label to leave out)."""
    for key in (label.casefold(), rest.casefold()):
        if key in mapping:
            return True, mapping[key]
    if rest.casefold() in OWN_NAMES:
        return True, OWN_NAMES[rest.casefold()]
    kind = _code(item, "SegmentedPropertyTypeCodeSequence")
    for cls, code in codes.FINDING_CODES.items():
        if kind == (code.value, code.scheme_designator):
            return True, cls
    if kind in {(c.value, c.scheme_designator) for c in codes.DISC_CODES.values()}:
        return True, None
    return False, None


def _level_of(label: str, item: Dataset) -> tuple[str | None, str]:
    """The level a segment's label or anatomic region names, and the label after the level."""
    m = LEVEL.match(label)
    if m:
        return f"{m.group(1).upper()}-{m.group(2).upper()}", label[m.end() :].strip()
    region = _code(item, "AnatomicRegionSequence")
    for level, code in codes.DISC_CODES.items():
        if region == (code.value, code.scheme_designator):
            return level, label.strip()
    return None, label.strip()


def rasterise(seg: Dataset, vol: Volume) -> dict[int, np.ndarray]:
    """Each segment's voxels on the CT's grid: segment number -> (n, 3) indices (k, r, c)."""
    try:
        frames = seg.pixel_array
        if frames.ndim == 2:
            frames = frames[None]
        per_frame = seg.PerFrameFunctionalGroupsSequence
    except Exception as exc:  # pydicom raises many kinds on a broken pixel module
        raise CorrectionError(
            f"the SEG's frames cannot be read ({type(exc).__name__}: {exc})"
        ) from None
    if len(per_frame) != len(frames):
        raise CorrectionError(
            f"the SEG has {len(frames)} frames but {len(per_frame)} per-frame descriptions"
        )
    try:
        positions = frame_positions(seg)
    except (AttributeError, IndexError, TypeError, ValueError) as exc:  # ImportError_ is one
        raise CorrectionError(f"a frame has no segment number or position ({exc})") from None
    out: dict[int, list[np.ndarray]] = {}
    for f, (number, ipp) in enumerate(positions):
        kf = vol.grid.to_index(ipp)
        k = int(round(float(kf[0])))
        spacing = vol.grid.spacing
        off = np.abs(kf - np.array([k, 0.0, 0.0])) * np.array(spacing)
        if not (0 <= k < vol.grid.shape[0]) or off.max() > max(ON_SLICE_MM, 0.05 * spacing[0]):
            raise CorrectionError(
                f"frame {f + 1} at {np.round(ipp, 2).tolist()} lies on no slice of CT series "
                f"{vol.series_uid}"
            )
        if frames[f].shape != vol.grid.shape[1:]:
            raise CorrectionError(
                f"frame {f + 1} is {frames[f].shape[0]}x{frames[f].shape[1]}, the CT's slices "
                f"{vol.grid.shape[1]}x{vol.grid.shape[2]}"
            )
        rc = np.argwhere(frames[f] > 0)
        if rc.size:
            out.setdefault(number, []).append(np.column_stack([np.full(len(rc), k), rc]))
    return {n: np.concatenate(v) for n, v in out.items()}


def read_correction(
    seg: Dataset, vol: Volume, analysed: dict, mapping: dict[str, DiscClass | None]
) -> tuple[Correction, dict[int, np.ndarray]]:
    """What a SEG drawn on ``vol`` says about the levels of its analysis (``analysed``, the
    job's result), and each segment's voxels."""
    try:
        items = list(seg.SegmentSequence)
    except AttributeError:
        raise CorrectionError("the SEG has no SegmentSequence") from None
    voxels = rasterise(seg, vol)
    levels = {lv["level"]: lv for lv in analysed.get("levels", [])}
    reads = []
    for item in items:
        number = int(item.get("SegmentNumber") or 0)
        label = str(item.get("SegmentLabel") or "")
        level, rest = _level_of(label, item)
        found, cls = _class_of(label, rest, item, mapping)
        ignored = cls is None and any(k in mapping for k in (label.casefold(), rest.casefold()))
        if ignored:
            reads.append(SegmentRead(number, label, level, None, None, True))
            continue
        problem = None
        if not found:
            kind = _code(item, "SegmentedPropertyTypeCodeSequence")
            problem = (
                f"segment {number} {label!r}: neither its label nor its type code {kind} names "
                "a class (add the label to the corrections mapping file)"
            )
        vox = voxels.get(number)
        if problem is None and level is None and vox is not None and levels:
            centre = vol.grid.to_patient(vox.mean(axis=0))
            near = min(
                levels.values(),
                key=lambda lv: np.linalg.norm(np.subtract(lv["centre_lps"], centre)),
            )
            if np.linalg.norm(np.subtract(near["centre_lps"], centre)) <= NEAREST_LEVEL_MM:
                level = near["level"]
        if problem is None and level is None:
            problem = f"segment {number} {label!r}: no level in its label or codes, nor an analysed level within {NEAREST_LEVEL_MM:g} mm"
        if problem is None and level not in levels:
            problem = f"segment {number} {label!r}: level {level} is not one the node analysed ({', '.join(levels) or 'none'})"
        if problem is None and vox is None:
            problem = f"segment {number} {label!r}: no voxel in any frame"
        reads.append(
            SegmentRead(number, label, level, cls if problem is None else None, problem, ignored)
        )
    labelled = []
    for name, lv in levels.items():
        mine = [r for r in reads if r.level == name and r.problem is None and not r.ignored]
        if not mine:
            continue
        got = {r.cls for r in mine if r.cls is not None}
        if not got or got == {DiscClass.NORMAL}:
            classes: tuple[DiscClass, ...] = (DiscClass.NORMAL,)
        else:
            got.discard(DiscClass.NORMAL)
            classes = tuple(c for c in DiscClass if c in got)
        labelled.append(LevelLabel(name, classes, tuple(lv.get("classes", ()))))
    study, series = referenced_series(seg)
    correction = Correction(str(seg.SOPInstanceUID), study, series, tuple(reads), tuple(labelled))
    return correction, voxels


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # the spool's retention may remove its file; the link stays
    except OSError:
        shutil.copy2(src, dst)


def keep_case(
    folder: Path,
    correction: Correction,
    seg_path: Path,
    ct_paths: list[Path],
    vol: Volume,
    voxels: dict[int, np.ndarray],
    analysed: dict,
    about: dict[str, Any],
) -> Path:
    """Write the case folder: the CT and the SEG, truth.json and labels.npz as a study folder
    (levels with their corrected classes), and case.json (what was read and why not)."""
    from node.phantom.generate import LABELS_FILE, SERIES_DIR, TRUTH_FILE, save_label_volumes

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / SERIES_DIR).mkdir(parents=True)
    for p in ct_paths:
        _link_or_copy(p, tmp / SERIES_DIR / p.name)
    _link_or_copy(seg_path, tmp / SEG_FILE)
    by_level = {lv.level: lv for lv in correction.levels}
    index = {name: i + 1 for i, name in enumerate(by_level)}
    disc_class = np.zeros(vol.grid.shape, np.uint8)
    disc_level = np.zeros(vol.grid.shape, np.uint8)
    nodes: dict[str, np.ndarray] = {}
    for r in correction.segments:
        if r.problem or r.ignored or r.level not in by_level:
            continue
        vox = voxels[r.number]
        lv = by_level[r.level]
        cls = r.cls if r.cls is DiscClass.SCHMORL else _morphology(lv.classes)
        where = tuple(vox.T)
        disc_class[where] = cls.class_id + 1
        disc_level[where] = index[r.level]
        if cls is DiscClass.SCHMORL:
            nodes[r.level] = np.concatenate([nodes.get(r.level, np.zeros((0, 3), int)), vox])
    save_label_volumes(
        tmp / LABELS_FILE,
        vol.grid,
        disc_class=disc_class,
        disc_level=disc_level,
        vertebra=np.zeros_like(disc_class),
    )
    analysed_levels = {lv["level"]: lv for lv in analysed.get("levels", [])}
    truth_levels = []
    for name, lv in by_level.items():
        a = analysed_levels[name]
        normal = np.array(a["normal_lps"], dtype=float)
        entry: dict[str, Any] = {
            "level": name,
            "classes": [c.value for c in lv.classes],
            "morphology": _morphology(lv.classes).value,
            "centre_lps": a["centre_lps"],
            "normal_lps": a["normal_lps"],
            "left_lps": [round(float(x), 5) for x in frame_from_normal(normal)[:, 0]],
            "node_classes": list(lv.node_classes),
            "schmorl": None,
        }
        if name in nodes:
            vox = nodes[name]
            volume_mm3 = len(vox) * float(np.prod(vol.grid.spacing))
            entry["schmorl"] = {
                "centre_lps": [round(float(x), 2) for x in vol.grid.to_patient(vox.mean(axis=0))],
                "radius_mm": round((3 * volume_mm3 / (4 * np.pi)) ** (1 / 3), 2),
                "voxels": int(len(vox)),
            }
        truth_levels.append(entry)
    truth = {
        "source": "case",
        "study_instance_uid": correction.study_uid,
        "series_instance_uid": correction.series_uid,
        "levels": truth_levels,
    }
    (tmp / TRUTH_FILE).write_text(json.dumps(truth, indent=1))
    record = {
        **about,
        "seg_sop_instance_uid": correction.seg_sop_uid,
        "study_instance_uid": correction.study_uid,
        "series_instance_uid": correction.series_uid,
        "segments": [
            {**asdict(s), "cls": s.cls.value if s.cls else None} for s in correction.segments
        ],
        "levels": case_levels(correction),
        "problems": correction.problems,
    }
    (tmp / CASE_FILE).write_text(json.dumps(record, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def case_levels(correction: Correction) -> list[dict]:
    return [
        {
            "level": lv.level,
            "classes": [c.value for c in lv.classes],
            "node_classes": list(lv.node_classes),
            "changed": lv.changed,
        }
        for lv in correction.levels
    ]


def _morphology(classes: tuple[DiscClass, ...]) -> DiscClass:
    return next((c for c in classes if c is not DiscClass.SCHMORL), DiscClass.NORMAL)


def read_seg(path: Path) -> Dataset:
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # any parse error of a received file
        raise CorrectionError(f"{path.name}: not readable as DICOM ({exc})") from None
    if str(ds.get("SOPClassUID", "")) != SEG_STORAGE:
        raise CorrectionError(f"{path.name}: not a Segmentation Storage object")
    return ds


def _own_seg(session: Session, study_uid: str, sop_uid: str) -> int | None:
    """The job whose results hold this SEG, if the node made it."""
    jobs = session.execute(
        select(Job).where(Job.study_uid == study_uid, Job.outputs_dir.is_not(None))
    ).scalars()
    for job in jobs:
        for path in sorted(Path(job.outputs_dir or "").glob("dicom/seg*.dcm")):
            try:
                if str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) == sop_uid:
                    return job.id
            except (OSError, InvalidDicomError, AttributeError) as exc:
                log.warning("%s not read to compare with a received SEG: %s", path, exc)
    return None


def _analysed(session: Session, series_uid: str) -> Job | None:
    """The latest job that analysed the CT series (its result has levels)."""
    for job in session.execute(
        select(Job)
        .where(Job.series_uid == series_uid, Job.state == State.DONE)
        .order_by(Job.id.desc())
    ).scalars():
        if job.result and job.result.get("analysed", True) and job.result.get("levels"):
            return job
    return None


def take_one(settings: Settings, sessions: sessionmaker, job_id: int, path: Path) -> int:
    """Keep one received SEG as a labelled case; its id. Raises CorrectionError with the reason
    it is not a correction the node can keep."""
    seg = read_seg(path)
    study, series = referenced_series(seg)
    with sessions() as s:
        own = _own_seg(s, study, str(seg.SOPInstanceUID))
        if own is not None:
            raise CorrectionError(f"the node's own SEG (results of job {own}), not a correction")
        analysed = _analysed(s, series)
        if analysed is None:
            raise CorrectionError(
                f"it references CT series {series} of study {study}, which the node has not "
                "analysed (send the CT first, then retry this job)"
            )
        if analysed.instances_deleted:
            raise CorrectionError(
                f"the CT of job {analysed.id} was removed by the retention rule; send it again"
            )
        ct_paths = [Path(i.path) for i in analysed.received]
        result, analysed_id, patient = dict(analysed.result or {}), analysed.id, analysed.patient_id
    try:
        vol = load_series(ct_paths)
    except VolumeError as exc:
        raise CorrectionError(f"the CT of job {analysed_id} cannot be read again: {exc}") from None
    correction, voxels = read_correction(
        seg, vol, result, load_mapping(settings.corrections.mapping)
    )
    if not correction.levels:
        raise CorrectionError(
            "no segment names a level and class: "
            + "; ".join(correction.problems or ["no segments"])
        )
    for problem in correction.problems:
        log.warning("job %s: %s", job_id, problem)
    with sessions() as s:
        row = LabelledCase(
            seg_job_id=job_id,
            analysed_job_id=analysed_id,
            study_uid=study,
            series_uid=series,
            seg_sop_uid=correction.seg_sop_uid,
            patient_id=patient,
            folder="",
            levels=case_levels(correction),
            problems=correction.problems,
        )
        s.add(row)
        s.flush()
        folder = settings.corrections.cases_dir / f"case-{row.id:05d}"
        about = {
            "case": row.id,
            "patient_id": patient,
            "seg_job": job_id,
            "analysed_job": analysed_id,
        }
        keep_case(folder, correction, path, ct_paths, vol, voxels, result, about)
        row.folder = str(folder)
        audit(
            s,
            s.get(Job, analysed_id),
            "corrections",
            "correction received",
            f"case {row.id} from job {job_id}: " + describe(correction),
        )
        s.commit()
        return row.id


def describe(correction: Correction) -> str:
    changed = [lv for lv in correction.levels if lv.changed]
    parts = [
        f"{lv.level} {'+'.join(lv.node_classes) or 'none'} -> {'+'.join(c.value for c in lv.classes)}"
        for lv in changed
    ]
    text = f"{len(correction.levels)} levels labelled, {len(changed)} changed"
    text += f" ({', '.join(parts)})" if parts else ""
    if correction.problems:
        text += f"; {len(correction.problems)} segment(s) left out"
    return text


def take(settings: Settings, sessions: sessionmaker, job_id: int, worker: str) -> None:
    """A claimed job of SEGs: each kept as a labelled case, or refused with its reason. The job
    ends DONE when one was kept, else SKIPPED; nothing is sent, and the files stay."""
    with sessions() as s:
        paths = [Path(i.path) for i in s.get(Job, job_id).received]
    kept, refused = [], []
    for path in paths:
        try:
            kept.append(take_one(settings, sessions, job_id, path))
        except CorrectionError as exc:
            log.warning("job %s: SEG %s not kept as a labelled case: %s", job_id, path.name, exc)
            refused.append(f"{path.stem}: {exc}" if len(paths) > 1 else str(exc))
        except OSError:
            raise  # the disk (full, gone): the job runner queues the job again
        except Exception as exc:  # a SEG malformed in a way not foreseen: recorded, never sent
            log.exception("job %s: SEG %s could not be read as a correction", job_id, path.name)
            why = f"unreadable as a correction ({type(exc).__name__}: {exc})"
            refused.append(f"{path.stem}: {why}" if len(paths) > 1 else why)
    with sessions() as s:
        job = s.get(Job, job_id)
        if job.state is not State.RUNNING or job.worker != worker:
            return
        job.result = {"analysed": False, "correction": True, "cases": kept, "refused": refused}
        if kept:
            note = f"kept as labelled case(s) {', '.join(map(str, kept))}"
            if refused:
                note += f"; refused: {'; '.join(refused)}"
            transition(s, job, State.DONE, worker, None)
            job.reason = note
        else:
            why = "corrected SEG not kept: " + "; ".join(refused)
            transition(s, job, State.SKIPPED, worker, why)
        s.commit()
