"""The phantom generator: DICOM validity, geometry, truth on the right voxels, definitions."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from node.analysis.measure import BULGE_SHARE, EXTENDS_MM
from node.analysis.volume import load_folder
from node.classes import DISC_LEVELS, DiscClass
from node.phantom.generate import (
    LABELS_FILE,
    SERIES_DIR,
    TRUTH_FILE,
    generate_study,
    load_labels,
    measure_against_vertebrae,
)
from node.phantom.series import MANUFACTURER

REQUIRED = [
    "PatientName",
    "PatientID",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "Modality",
    "SeriesInstanceUID",
    "SeriesNumber",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "Manufacturer",
    "InstanceNumber",
    "ImageType",
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "SliceThickness",
    "RescaleIntercept",
    "RescaleSlope",
    "KVP",
    "WindowCenter",
    "WindowWidth",
    "BodyPartExamined",
    "SOPClassUID",
    "SOPInstanceUID",
]


def _frame(entry):
    up = np.array(entry["normal_lps"])
    left = np.array(entry["left_lps"])
    return np.stack([left, np.cross(up, left), up], axis=1)


def test_series_is_complete_ct_with_consistent_geometry(phantom):
    files = sorted((phantom.folder / SERIES_DIR).glob("*.dcm"))
    truth = phantom.truth
    assert len(files) == truth["grid"]["shape"][0] == 150
    affine = np.array(truth["grid"]["affine_kji_to_lps"])
    uids = set()
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        for kw in REQUIRED:
            assert kw in ds, f"{f.name}: {kw} missing"
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert ds.Modality == "CT" and ds.BodyPartExamined == "LSPINE"
        assert ds.Manufacturer == MANUFACTURER and "phantom" in ds.Manufacturer.lower()
        assert (
            (ds.Rows, ds.Columns) == (512, 512)
            and ds.BitsAllocated == 16
            and ds.PixelRepresentation == 1
        )
        assert 0.6 <= float(ds.PixelSpacing[0]) <= 0.9
        assert 0.625 <= float(ds.SliceThickness) <= 3.0
        assert ds.StudyInstanceUID == truth["study_instance_uid"]
        assert ds.SeriesInstanceUID == truth["series_instance_uid"]
        assert ds.FrameOfReferenceUID == truth["frame_of_reference_uid"]
        # position agrees with the voxel grid the labels live on
        np.testing.assert_allclose(
            [float(x) for x in ds.ImagePositionPatient],
            affine[:3, :3] @ [k, 0, 0] + affine[:3, 3],
            atol=1e-3,
        )
        uids.add(ds.SOPInstanceUID)
    assert len(uids) == len(files)
    vol = load_folder(phantom.folder / SERIES_DIR)
    np.testing.assert_allclose(vol.grid.affine, affine, atol=1e-3)
    labels = load_labels(phantom.folder)
    assert labels.disc_class.shape == vol.hu.shape
    # HU range of a CT: air outside, bone inside
    assert vol.hu.min() < -900 and vol.hu.max() > 600


def test_truth_masks_sit_on_the_right_voxels(phantoms):
    for study in phantoms:
        vol = load_folder(study.folder / SERIES_DIR)
        labels = load_labels(study.folder)
        assert study.truth["levels"], "no disc level inside the scanned range"
        for entry in study.truth["levels"]:
            code = entry["label_code"]
            disc = (labels.disc_level == code) & (
                labels.disc_class != DiscClass.SCHMORL.class_id + 1
            )
            # erode one voxel in 3D so partial volume with the endplates does not count;
            # a disc with height loss may be too thin to keep a core on thick slices
            core = ndimage.binary_erosion(disc, iterations=1)
            if core.sum() < 200:
                assert "height_loss" in entry["lookalikes"], f"{entry['level']}: disc too thin"
                continue
            med = float(np.median(vol.hu[core]))
            assert 40.0 <= med <= 130.0, f"{entry['level']}: disc voxels have median {med:.0f} HU"
            k, r, c = np.rint(vol.grid.to_index(np.array(entry["centre_lps"])[None])[0]).astype(int)
            assert labels.disc_level[k, r, c] == code, (
                f"{entry['level']}: centre is not on a disc voxel"
            )
        body = labels.vertebra[(labels.vertebra > 0) & (labels.vertebra < 100)]
        assert body.size
        bone = vol.hu[(labels.vertebra > 0) & (labels.vertebra < 100)]
        assert np.median(bone) > 150


def test_every_condition_meets_its_definition(phantoms):
    seen: set[str] = set()
    for study in phantoms:
        labels = load_labels(study.folder)
        vol = load_folder(study.folder / SERIES_DIR)
        vnames = study.truth["vertebrae"]
        for entry in study.truth["levels"]:
            code = entry["label_code"]
            upper, lower = (vnames.index(v) + 1 for v in entry["vertebrae"])
            ext = measure_against_vertebrae(
                labels.disc_level == code,
                labels.vertebra,
                labels.grid,
                centre=np.array(entry["centre_lps"]),
                frame=_frame(entry),
                up_mm=entry["up_mm"],
                down_mm=entry["down_mm"],
                upper_code=upper,
                lower_code=lower,
            )
            morph = entry["morphology"]
            seen.update(entry["classes"])
            name = f"{study.folder.name} {entry['level']} {morph}"
            if morph == "normal":
                assert ext.share < 0.02 and ext.max_mm < EXTENDS_MM + 0.5, (
                    f"{name}: {ext.max_mm:.1f} mm, {ext.share:.2f}"
                )
            elif morph == "bulge":
                assert ext.share > BULGE_SHARE, f"{name}: only {ext.share:.2f} of the circumference"
                assert ext.max_mm > EXTENDS_MM
            else:
                assert 0.0 < ext.share < BULGE_SHARE, f"{name}: share {ext.share:.2f}"
                assert ext.max_mm >= 2.0
                off = abs((ext.direction_deg - 90.0 + 180.0) % 360.0 - 180.0)
                assert off <= 60.0, (
                    f"{name}: points {ext.direction_deg:.0f} deg, not posterior(-lateral)"
                )
                # base wider than dome
                assert ext.width_deg(0.25) > ext.width_deg(0.75 * ext.max_mm)
            if "schmorl" in entry["classes"]:
                node = (labels.disc_level == code) & (
                    labels.disc_class == DiscClass.SCHMORL.class_id + 1
                )
                assert node.sum() > 20, f"{name}: node has {node.sum()} voxels"
                pts = labels.grid.to_patient(np.argwhere(node))
                depth = (pts - np.array(entry["centre_lps"])) @ np.array(entry["normal_lps"])
                beyond = (depth > entry["up_mm"]) | (depth < -entry["down_mm"])
                assert beyond.mean() > 0.9, f"{name}: node is not inside a vertebral body"
                # sclerotic rim: bone around the node
                shell = (
                    ndimage.binary_dilation(node, iterations=2)
                    & ~node
                    & (labels.vertebra > 0)
                    & (labels.vertebra < 100)
                )
                assert shell.any() and np.median(vol.hu[shell]) > 300
            else:
                assert not (
                    (labels.disc_level == code)
                    & (labels.disc_class == DiscClass.SCHMORL.class_id + 1)
                ).any()
            assert entry["level"] in DISC_LEVELS
    assert seen >= {c.value for c in DiscClass}, f"fixture studies lack classes: {seen}"


def _digest(folder):
    h = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return h


def test_the_in_memory_phantom_is_the_volume_its_series_holds(phantom):
    from node.phantom.generate import phantom_volume

    seed, index = phantom.truth["seed"], phantom.truth["index"]
    vol, truth = phantom_volume(seed, index, slices=150, surroundings=False)
    read = load_folder(phantom.folder / SERIES_DIR)
    np.testing.assert_allclose(vol.grid.affine, read.grid.affine, atol=1e-3)
    assert vol.hu.shape == read.hu.shape and np.array_equal(vol.hu, read.hu)
    assert [lv["level"] for lv in truth["levels"]] == [
        lv["level"] for lv in phantom.truth["levels"]
    ]
    assert [lv["centre_lps"] for lv in truth["levels"]] == [
        lv["centre_lps"] for lv in phantom.truth["levels"]
    ]


def test_same_seed_gives_the_same_files(phantom, tmp_path):
    again = generate_study(tmp_path, 10, 0, slices=150, surroundings=False)
    assert _digest(again.folder) == _digest(phantom.folder)
    other = generate_study(tmp_path / "other", 11, 0, slices=150)
    assert (
        json.loads((other.folder / TRUTH_FILE).read_text())["study_instance_uid"]
        != phantom.truth["study_instance_uid"]
    )
    assert (again.folder / LABELS_FILE).is_file()


def test_class_mix_follows_the_paper():
    from node.phantom.plan import plan_study

    counts = dict.fromkeys(DiscClass, 0)
    for i in range(120):
        for d in plan_study(42, i).discs:
            if d.reported:
                for c in d.classes:
                    counts[c] += 1
    total = sum(counts[c] for c in (DiscClass.NORMAL, DiscClass.BULGE, DiscClass.PROTRUSION))
    # primary classes near 104 : 128 : 211 of 443 (Schmorl's adds to them)
    assert abs(counts[DiscClass.PROTRUSION] / total - 211 / 443) < 0.06
    assert abs(counts[DiscClass.BULGE] / total - 128 / 443) < 0.06
    assert counts[DiscClass.SCHMORL] > 0


@pytest.mark.parametrize("bad", [0, -1])
def test_synth_refuses_bad_counts(tmp_path, bad, capsys):
    from node.cli import main

    assert main(["synth", "--out", str(tmp_path), "--studies", str(bad)]) == 2
    assert "studies" in capsys.readouterr().err
