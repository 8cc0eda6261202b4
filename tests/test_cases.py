"""Radiologists' corrections over DICOM: a corrected SEG sent back to the node becomes a labelled
case, and the labelled cases a dataset with a frozen test split."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pydicom
import pytest
import yaml
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from node.cases import CASE_FILE, SEG_FILE
from node.classes import DiscClass
from node.cli import DEFAULT_MODEL, main
from node.config import Settings
from node.db import State, make_engine, make_sessions
from node.outputs import codes
from node.phantom.generate import LABELS_FILE, SERIES_DIR, TRUTH_FILE, load_labels
from node.training.from_cases import SPLITS_FILE, frozen_splits
from node.web.app import create_app
from node.web.view import NodeView
from tests.test_service import jobs, orthanc, start_node, storescu, wait_job

FINAL = (State.DONE, State.FAILED, State.SKIPPED)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    with orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


def _set_class(item, level: str, cls: DiscClass) -> None:
    """What a radiologist does in a viewer: rename a segment and set its type."""
    item.SegmentLabel = f"{level} {cls.display}"
    category, kind = codes.segment_property(cls, level)
    for keyword, code in (
        ("SegmentedPropertyCategoryCodeSequence", category),
        ("SegmentedPropertyTypeCodeSequence", kind),
    ):
        seq = getattr(item, keyword)[0]
        seq.CodeValue, seq.CodingSchemeDesignator, seq.CodeMeaning = (
            code.value,
            code.scheme_designator,
            code.meaning,
        )


def corrected(seg: pydicom.Dataset, changes: dict[str, DiscClass], unknown: str | None = None):
    """A copy of the node's SEG as a viewer saves it after the radiologist's edits: new UIDs,
    its own manufacturer, the finding segment of each level in ``changes`` set to that class,
    and (``unknown``) one more segment renamed to a label the node cannot read."""
    out = copy.deepcopy(seg)
    out.SOPInstanceUID = generate_uid()
    out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    out.SeriesInstanceUID = generate_uid()
    out.SeriesDescription = "Segmentation (corrected)"
    out.Manufacturer = "3D Slicer"
    done = set()
    for item in out.SegmentSequence:
        level = item.SegmentLabel.split(" ")[0]
        if level in changes and level not in done and item.SegmentLabel != f"{level} disc":
            if "Schmorl" in item.SegmentLabel:
                continue
            _set_class(item, level, changes[level])
            done.add(level)
    assert done == set(changes), (done, [i.SegmentLabel for i in out.SegmentSequence])
    if unknown is not None:
        # the plain disc beside a finding: the level keeps its class from the finding
        item = next(
            i
            for i in out.SegmentSequence
            if i.SegmentLabel.split(" ")[0] not in changes and i.SegmentLabel.endswith(" disc")
        )
        item.SegmentLabel = unknown
        kind = item.SegmentedPropertyTypeCodeSequence[0]
        kind.CodeValue, kind.CodingSchemeDesignator, kind.CodeMeaning = "85756007", "SCT", "Tissue"
        del item.AnatomicRegionSequence
    return out


def wait_series(home: Path, series_uid: str, timeout: float = 60):
    """The job of a series, once it has ended."""
    return wait_job(
        home,
        lambda _: any(j.series_uid == series_uid and j.state in FINAL for j in jobs(home)),
        timeout,
    ) and next(j for j in jobs(home) if j.series_uid == series_uid)


def _finding_levels(job) -> list[tuple[str, list[str]]]:
    return [(lv["level"], lv["classes"]) for lv in job.result["levels"]]


def test_a_corrected_seg_sent_back_becomes_a_labelled_case_and_a_dataset(
    phantom, pacs, tmp_path, capsys
):
    node, cfg = start_node(tmp_path / "node", pacs)
    try:
        assert storescu(node, phantom.folder / SERIES_DIR).returncode == 0
        ct = wait_job(node.home, lambda j: j.state in FINAL)
        assert ct.state is State.DONE, ct.reason
        own = pydicom.dcmread(Path(ct.outputs_dir) / "dicom" / "seg.dcm")
        levels = dict(_finding_levels(ct))
        # two levels changed: one to a protrusion, one to a bulge (whatever the node said)
        pick = [lv for lv, cls in levels.items() if "schmorl" not in cls][:2]
        changes = {
            pick[0]: DiscClass.BULGE if "protrusion" in levels[pick[0]] else DiscClass.PROTRUSION,
            pick[1]: DiscClass.PROTRUSION if "bulge" in levels[pick[1]] else DiscClass.BULGE,
        }
        fixed = corrected(own, changes, unknown="herniation??")
        folder = tmp_path / "send"
        folder.mkdir()
        fixed.save_as(folder / "corrected.dcm", enforce_file_format=True)

        # the node's own SEG coming back (a PACS that routes everything) is not a correction
        own_back = tmp_path / "own"
        own_back.mkdir()
        own.save_as(own_back / "seg.dcm", enforce_file_format=True)
        assert storescu(node, own_back).returncode == 0
        back = wait_series(node.home, own.SeriesInstanceUID)
        assert back.state is State.SKIPPED and "the node's own SEG" in back.reason, back.reason

        assert storescu(node, folder).returncode == 0
        seg_job = wait_series(node.home, fixed.SeriesInstanceUID)
        assert seg_job.state is State.DONE, seg_job.reason
        assert "kept as labelled case(s) 1" in seg_job.reason
        assert not seg_job.deliveries and seg_job.result["cases"] == [1]

        # a SEG of a study the node never saw, and a malformed one: refused with the reason
        stranger = corrected(own, {})
        stranger.StudyInstanceUID = generate_uid()
        stranger.ReferencedSeriesSequence[0].SeriesInstanceUID = generate_uid()
        broken = corrected(own, {})
        for fg in broken.PerFrameFunctionalGroupsSequence:  # frames half a slice off the CT
            ipp = fg.PlanePositionSequence[0].ImagePositionPatient
            fg.PlanePositionSequence[0].ImagePositionPatient = [ipp[0], ipp[1], float(ipp[2]) + 1.3]
        for name, ds in (("stranger", stranger), ("broken", broken)):
            d = tmp_path / name
            d.mkdir()
            ds.save_as(d / "seg.dcm", enforce_file_format=True)
            assert storescu(node, d).returncode == 0
        refused = {
            name: wait_series(node.home, ds.SeriesInstanceUID)
            for name, ds in (("stranger", stranger), ("broken", broken))
        }
        assert refused["stranger"].state is State.SKIPPED
        assert "which the node has not analysed" in refused["stranger"].reason
        assert refused["broken"].state is State.SKIPPED
        assert "lies on no slice of CT series" in refused["broken"].reason, refused["broken"].reason
        for j in refused.values():  # nothing lost: the SEG stays in the spool with its job
            assert j.instances == 1 and Path(j.received[0].path).is_file()
        assert "Traceback" not in node.log()
    finally:
        node.stop()

    # the case: the CT, the SEG, the corrected levels as truth, the labels on the CT's grid
    case = node.home / "cases" / "case-00001"
    about = json.loads((case / CASE_FILE).read_text())
    truth = json.loads((case / TRUTH_FILE).read_text())
    assert len(list((case / SERIES_DIR).iterdir())) == 150 and (case / SEG_FILE).is_file()
    by_level = {lv["level"]: lv for lv in truth["levels"]}
    assert set(by_level) == set(levels)
    for lv, cls in changes.items():
        assert by_level[lv]["classes"] == [cls.value] and by_level[lv]["morphology"] == cls.value
    for lv, cls in levels.items():
        if lv not in changes:
            assert sorted(by_level[lv]["classes"]) == sorted(cls), lv
    changed = [lv["level"] for lv in about["levels"] if lv["changed"]]
    assert sorted(changed) == sorted(changes)
    (problem,) = about["problems"]
    assert "'herniation??'" in problem and "corrections mapping" in problem
    labels = load_labels(case)
    assert (labels.disc_class == changes[pick[0]].class_id + 1).any()
    assert (case / LABELS_FILE).is_file()

    # the job page shows the case on the analysed job and on the SEG's job
    settings = Settings(home=node.home, web={"token": "t"}, receiver={"min_free_mb": 10})
    sessions = make_sessions(make_engine(settings.database_url))
    client = TestClient(create_app(NodeView(settings, sessions), "t"))
    for job_id in (ct.id, seg_job.id):
        page = client.get(f"/api/jobs/{job_id}", headers={"Authorization": "Bearer t"}).json()
        (shown,) = page["cases"]
        assert (
            shown["id"] == 1 and shown["analysed_job"] == ct.id and shown["seg_job"] == seg_job.id
        )
        assert sorted(lv["level"] for lv in shown["levels"] if lv["changed"]) == sorted(changes)
    events = [e for e in jobs(node.home)[0].events if e.event == "correction received"]
    assert events and "2 changed" in events[0].detail

    # a dataset from the cases: the one patient goes to training (no test split asked for)
    out = tmp_path / "ds"
    args = ["dataset", "build", "--source", "cases", str(node.home / "cases"), "--out", str(out)]
    assert main([*args, "--test-fraction", "0", "--val-fraction", "0"]) == 0
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data["idaics"]["source"] == "cases" and data["idaics"]["studies"]["train"] == [case.name]
    instances = data["idaics"]["instances"]["train"]
    for cls in changes.values():
        assert instances.get(cls.value, 0) > 0
    splits = json.loads((node.home / "cases" / SPLITS_FILE).read_text())["patients"]
    assert list(splits.values()) == ["train"]
    capsys.readouterr()
    assert main(["--config", str(node.home / "node.toml"), "cases", "list"]) == 0
    listed = capsys.readouterr().out
    assert listed.startswith(f"case-00001  job {ct.id} (SEG job {seg_job.id})  split train")
    assert all(f"{lv} " in listed.split("changed: ")[1] for lv in changes)
    assert "[1 segment(s) left out]" in listed

    # the same case as the paper annotated: the scanner's own axial slices and a sagittal one
    native = tmp_path / "ds-native"
    args = ["dataset", "build", "--source", "cases", str(node.home / "cases"), "--out", str(native)]
    assert main([*args, "--views", "native"]) == 0  # the patient's split is kept: train
    data = yaml.safe_load((native / "data.yaml").read_text())
    assert data["idaics"]["views"] == "native" and data["idaics"]["studies"]["train"] == [case.name]
    images = sorted((native / "images" / "train").glob("*.png"))
    # an axial slice per labelled level whose labels it crosses, and the sagittal one
    assert len(levels) - 1 <= len(images) - 1 <= len(levels)
    assert (native / "images" / "train" / f"{case.name}_sagittal.png") in images
    for im in images:
        assert (native / "labels" / "train" / f"{im.stem}.txt").read_text().strip()
    from PIL import Image

    assert Image.open(images[0]).size == (512, 512)  # the CT's own matrix


def test_a_patient_split_is_chosen_once_and_never_moves(tmp_path):
    first = frozen_splits(tmp_path, [f"P{i}" for i in range(40)], test_fraction=0.25)
    assert {"train", "test"} <= set(first.values())
    share = sum(v == "test" for v in first.values()) / len(first)
    assert 0.1 < share < 0.45
    # other fractions and more patients later: every known patient keeps its split
    later = frozen_splits(
        tmp_path, [f"P{i}" for i in range(80)], test_fraction=0.6, val_fraction=0.3
    )
    assert all(later[p] == s for p, s in first.items())
    new = [later[f"P{i}"] for i in range(40, 80)]
    assert sum(s == "train" for s in new) < sum(s == "train" for s in first.values())
    # the choice for a patient does not depend on who else is there
    alone = frozen_splits(tmp_path / "other", ["P7"], test_fraction=0.25)
    assert alone["P7"] == first["P7"]
    with pytest.raises(ValueError, match="leave some for training"):
        frozen_splits(tmp_path / "x", ["P1"], test_fraction=0.7, val_fraction=0.3)


def test_segments_are_read_from_labels_codes_and_the_mapping(phantom, tmp_path):
    """Without the network: a SEG from a viewer that names segments its own way."""
    from node.analysis.study import analyze_volume
    from node.analysis.volume import load_folder
    from node.cases import CorrectionError, load_mapping, read_correction
    from node.inference.model import load_model
    from node.outputs import build_outputs
    from node.outputs.settings import OutputSettings

    vol = load_folder(phantom.folder / SERIES_DIR)
    model = load_model(DEFAULT_MODEL)
    result = analyze_volume(vol, model)
    seg = build_outputs(result, vol, model.card, OutputSettings(objects=("seg",)), []).seg
    analysed = result.to_dict()
    items = list(seg.SegmentSequence)
    first = items[0]
    level = first.SegmentLabel.split(" ")[0]
    # a label of the hospital's own words, through the mapping; no level or class code in it
    said = next(lv["classes"] for lv in analysed["levels"] if lv["level"] == level)
    wanted = DiscClass.BULGE if "protrusion" in said else DiscClass.PROTRUSION
    first.SegmentLabel = "HNP"
    kind = first.SegmentedPropertyTypeCodeSequence[0]
    kind.CodeValue, kind.CodingSchemeDesignator, kind.CodeMeaning = "85756007", "SCT", "Tissue"
    del first.AnatomicRegionSequence
    mapping = tmp_path / "map.yaml"
    mapping.write_text(f"HNP: {wanted.value}\nartefact: ignore\n")
    items[1].SegmentLabel = "artefact"
    corr, _ = read_correction(seg, vol, analysed, load_mapping(mapping))
    got = {lv.level: lv for lv in corr.levels}
    assert wanted in got[level].classes  # its level from where it lies
    assert corr.problems == []
    # without the mapping the label is a problem, named; the rest is read
    corr, _ = read_correction(seg, vol, analysed, {})
    (problem,) = corr.problems
    assert "'HNP'" in problem and "85756007" in problem
    assert wanted not in {c for lv in corr.levels if lv.level == level for c in lv.classes}
    # a SEG without frames' positions is malformed
    broken = copy.deepcopy(seg)
    for fg in broken.PerFrameFunctionalGroupsSequence:
        del fg.PlanePositionSequence
    with pytest.raises(CorrectionError, match="no segment number or position"):
        read_correction(broken, vol, analysed, {})
