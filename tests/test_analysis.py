"""Study analysis stages on phantoms, and clear refusals on real data."""

from __future__ import annotations

import re
import shutil
from dataclasses import replace

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from scipy import ndimage

from node.analysis.fusion import SliceDetections, fuse
from node.analysis.grain import FINE_PIXEL_MM, MAX_HU, TARGET_HU, soften
from node.analysis.measure import disc_extension
from node.analysis.spine import find_spine
from node.analysis.views import disc_plane
from node.analysis.volume import VolumeError, load_folder, load_nifti, load_series
from node.classes import DiscClass
from node.geometry import Grid, sample_plane
from node.inference.interface import Detection, View, ViewSpec
from node.phantom.generate import SERIES_DIR, load_labels


def _copy_series(src, dst, transform=None, names=None):
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted((src).glob("*.dcm"))
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        if transform is not None:
            ds = transform(i, ds)
            if ds is None:
                continue
        ds.save_as(dst / (names[i] if names else f.name))
    return files


# -- volume ---------------------------------------------------------------------------------


def test_slices_are_sorted_by_position_not_by_name(phantom, tmp_path):
    ref = load_folder(phantom.folder / SERIES_DIR)
    n = ref.hu.shape[0]
    names = [f"x{(i * 7919) % 1000:04d}_{i}.dcm" for i in range(n)]  # scrambled names
    _copy_series(
        phantom.folder / SERIES_DIR,
        tmp_path / "s",
        names=names,
        transform=lambda i, ds: (setattr(ds, "InstanceNumber", n - i), ds)[1],
    )
    vol = load_folder(tmp_path / "s")
    np.testing.assert_array_equal(vol.hu, ref.hu)
    np.testing.assert_allclose(vol.grid.affine, ref.grid.affine)


def test_duplicates_and_localizers_are_left_out_with_a_warning(phantom, tmp_path):
    src = phantom.folder / SERIES_DIR
    _copy_series(src, tmp_path / "s")
    first = sorted(src.glob("*.dcm"))[0]
    shutil.copy(first, tmp_path / "s" / "dup.dcm")
    loc = pydicom.dcmread(first)
    loc.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    loc.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    loc.SOPInstanceUID = pydicom.uid.generate_uid()
    loc.save_as(tmp_path / "s" / "scout.dcm")
    vol = load_folder(tmp_path / "s")
    assert vol.hu.shape[0] == 150
    assert any("duplicate" in w for w in vol.warnings) and any(
        "localizer" in w for w in vol.warnings
    )


def test_a_missing_slice_is_filled_and_many_are_refused(phantom, tmp_path):
    ref = load_folder(phantom.folder / SERIES_DIR)
    _copy_series(
        phantom.folder / SERIES_DIR,
        tmp_path / "one",
        transform=lambda i, ds: None if i == 70 else ds,
    )
    vol = load_folder(tmp_path / "one")
    assert vol.hu.shape == ref.hu.shape and any("missing" in w for w in vol.warnings)
    np.testing.assert_array_equal(vol.hu[69], ref.hu[69])
    _copy_series(
        phantom.folder / SERIES_DIR,
        tmp_path / "many",
        transform=lambda i, ds: None if 40 <= i < 50 else ds,
    )
    with pytest.raises(VolumeError, match="missing"):
        load_folder(tmp_path / "many")


@pytest.mark.parametrize("syntax", [pydicom.uid.RLELossless, pydicom.uid.JPEG2000Lossless])
def test_compressed_series_load_to_the_same_hu(phantom, tmp_path, syntax):
    ref = load_folder(phantom.folder / SERIES_DIR)

    def compress(i, ds):
        ds.compress(syntax)
        return ds

    _copy_series(phantom.folder / SERIES_DIR, tmp_path / "c", transform=compress)
    assert pydicom.dcmread(next((tmp_path / "c").iterdir())).file_meta.TransferSyntaxUID == syntax
    vol = load_folder(tmp_path / "c")
    np.testing.assert_array_equal(vol.hu, ref.hu)


def test_mixed_and_non_ct_series_are_refused(phantom, tmp_path):
    def other_series(i, ds):
        if i % 2:
            ds.SeriesInstanceUID = "1.2.3.4"
        return ds

    _copy_series(phantom.folder / SERIES_DIR, tmp_path / "mixed", transform=other_series)
    with pytest.raises(VolumeError, match="2 series mixed"):
        load_folder(tmp_path / "mixed")

    def mr(i, ds):
        ds.Modality = "MR"
        return ds

    _copy_series(phantom.folder / SERIES_DIR, tmp_path / "mr", transform=mr)
    with pytest.raises(VolumeError, match="not a CT series"):
        load_folder(tmp_path / "mr")


@pytest.mark.parametrize(
    "raw, why",
    [
        (b"abc ", "ImagePositionPatient 'abc' is not 3 numbers"),
        (b"", "ImagePositionPatient 'None' is not 3 numbers"),
    ],
)
def test_an_instance_with_malformed_geometry_is_refused_with_a_one_line_reason(
    phantom, tmp_path, raw, why
):
    """A careless modality's slice position (not numbers, or empty) is a reason to skip the
    series, named with the instance, not an error to retry."""
    tag = Tag(0x00200032)

    def spoil(i, ds):
        if i == 7:
            ds._dict[tag] = RawDataElement(tag, "DS", len(raw), raw, 0, False, True)
        return ds

    _copy_series(phantom.folder / SERIES_DIR, tmp_path / "bad", transform=spoil)
    with pytest.raises(VolumeError, match=re.escape(why)) as got:
        load_folder(tmp_path / "bad")
    assert "\n" not in str(got.value) and str(got.value).startswith("instance 1.")


def test_a_colour_image_in_a_ct_series_is_refused(phantom, tmp_path):
    def colour(i, ds):
        if i == 3:
            ds.SamplesPerPixel = 3
        return ds

    _copy_series(phantom.folder / SERIES_DIR, tmp_path / "rgb", transform=colour)
    with pytest.raises(VolumeError, match="SamplesPerPixel 3: not a greyscale CT image"):
        load_folder(tmp_path / "rgb")


def test_real_ge_head_ct_of_two_slice_spacings_is_refused_with_the_reason(shared_data):
    """The head CT's 4 mm slices are followed by 7 mm ones: no one grid holds them."""
    with pytest.raises(VolumeError, match=r"slice spacing varies \(1.08-7.00 mm\)"):
        load_folder(shared_data / "real" / "ge_head_ct_gantry_tilt")


def test_the_tilted_slices_of_a_real_ge_ct_are_placed_as_acquired(shared_data):
    """The first 14 slices of the GE head CT (4 mm apart, gantry tilted 18.5 degrees: the
    images lie tilted, and each is 4.22 mm further along the table) load as a sheared grid
    on which every slice lies where its ImagePositionPatient says."""
    files = sorted((shared_data / "real" / "ge_head_ct_gantry_tilt").glob("*.dcm"))[:14]
    vol = load_series(files)
    assert vol.warnings == ("gantry tilt of 18.5 degrees: slices placed as acquired",)
    assert vol.grid.sheared and vol.grid.plane_spacing(0) == pytest.approx(4.0, abs=0.01)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    where = {ds.SOPInstanceUID: [float(x) for x in ds.ImagePositionPatient] for ds in headers}
    assert sorted(vol.sop_instance_uids) == sorted(where) and vol.slice_index == tuple(range(14))
    for k, uid in enumerate(vol.sop_instance_uids):
        assert np.allclose(vol.grid.to_patient(np.array([k, 0, 0])), where[uid], atol=0.01)


def test_real_jpeg2000_series_with_blank_uids_is_decoded(shared_data):
    vol = load_folder(shared_data / "real" / "siemens_ct_j2k_blank_uids")
    assert vol.hu.shape == (20, 512, 512)
    assert vol.hu.min() <= -1000 and vol.hu.max() > 1000  # air and bone: decoded, rescaled
    assert vol.grid.spacing[0] == pytest.approx(2.0, abs=0.01)


# -- spine ----------------------------------------------------------------------------------


def test_disc_levels_are_found_and_named_on_phantoms(phantoms):
    total = right = 0
    for study in phantoms:
        spine = find_spine(load_folder(study.folder / SERIES_DIR))
        assert spine.sacrum_found
        found = {d.level: d for d in spine.discs}
        for lv in study.truth["levels"]:
            total += 1
            d = found.get(lv["level"])
            if d is not None and np.linalg.norm(d.centre - np.array(lv["centre_lps"])) < 6.0:
                right += 1
                angle = np.degrees(
                    np.arccos(min(1.0, abs(d.frame[:, 2] @ np.array(lv["normal_lps"]))))
                )
                assert angle < 15.0, f"{lv['level']}: disc plane off by {angle:.0f} deg"
    assert total >= 8 and right == total, f"{right}/{total} levels named right"


def _chest_ct(shared_data):
    d = shared_data / "real" / "chest_ct_t1_l3_labels"
    return load_nifti(d / "ct.nii.gz"), np.asarray(nib.load(d / "labels.nii.gz").dataobj)


#: TotalSegmentator label ids of the vertebrae in the real chest CT (labels.csv).
CHEST_LABELS = {"T10": 34, "T11": 33, "T12": 32, "L1": 31, "L2": 30, "L3": 29}


def _labelled_disc_centre(vol, labels, upper: str, lower: str) -> np.ndarray:
    """Midway between the lower endplate of the upper body and the upper endplate of the lower."""

    def body(name):
        p = vol.grid.to_patient(np.argwhere(labels == CHEST_LABELS[name]))
        return p[p[:, 1] < np.percentile(p[:, 1], 40)]  # the front of the vertebra: its body

    up, lo = body(upper), body(lower)
    return (
        up[up[:, 2] < np.percentile(up[:, 2], 5)].mean(axis=0)
        + lo[lo[:, 2] > np.percentile(lo[:, 2], 95)].mean(axis=0)
    ) / 2


def test_real_contrast_chest_ct_levels_are_named_from_the_ribs(shared_data):
    vol, labels = _chest_ct(shared_data)
    spine = find_spine(vol)
    assert not spine.sacrum_found and spine.rib_anchor
    assert any("named from the lowest ribs" in w for w in spine.warnings)
    named = {d.level: d for d in spine.named}
    for upper, lower in (("T11", "T12"), ("T12", "L1"), ("L1", "L2"), ("L2", "L3")):
        level = f"{upper}-{lower}"
        assert level in named, f"{level} not found: {sorted(named)}"
        miss = np.linalg.norm(
            named[level].centre - _labelled_disc_centre(vol, labels, upper, lower)
        )
        assert miss < 10.0, f"{level} is {miss:.1f} mm from the labelled disc"
    # the levels the node reports (L2-L3, 16 mm above the last slice, found on its endplates)
    assert [d.level for d in spine.discs] == ["T12-L1", "L1-L2", "L2-L3"]


def _grainy(vol, sd_hu: float, seed: int = 7):
    """``vol`` with the grain of a sharp kernel added in each axial slice: noise whose power
    lies between 0.35 and 1.2 mm (a band of Gaussian widths), ``sd_hu`` in SD; air left as is."""
    ax = vol.grid.slice_axis
    widths = [(0.0 if i == ax else 1.0 / s) for i, s in enumerate(vol.grid.spacing)]  # per mm
    w = np.random.default_rng(seed).normal(size=vol.hu.shape).astype(np.float32)
    band = ndimage.gaussian_filter(w, [x * 0.35 for x in widths]) - ndimage.gaussian_filter(
        w, [x * 1.2 for x in widths]
    )
    band *= sd_hu / band.std()
    return replace(vol, hu=np.where(vol.hu < -900, vol.hu, vol.hu + band).astype(np.float32))


def test_a_grainy_chest_ct_is_smoothed_before_its_discs_are_found(shared_data):
    vol, labels = _chest_ct(shared_data)
    same, grain = soften(vol)  # a soft kernel, as received
    assert same is vol and not grain.smoothed and grain.before_hu < MAX_HU
    soft, grain = soften(_grainy(vol, 60.0))
    assert grain.smoothed and grain.before_hu > MAX_HU
    assert grain.after_hu <= TARGET_HU and grain.sigma_mm <= 1.0
    assert "grainy" in grain.warning()
    named = {d.level: d for d in find_spine(soft).discs}
    for upper, lower in (("T12", "L1"), ("L1", "L2"), ("L2", "L3")):
        level = f"{upper}-{lower}"
        assert level in named, f"{level} not found: {sorted(named)}"
        miss = np.linalg.norm(
            named[level].centre - _labelled_disc_centre(vol, labels, upper, lower)
        )
        assert miss < 10.0, f"{level} is {miss:.1f} mm from the labelled disc"


def test_a_grainy_series_of_coarse_voxels_is_left_as_it_is(shared_data):
    crop = load_nifti(
        shared_data / "real" / "lumbar_ct_crop_l2_l4" / "sub-ct_label-22_ct.nii.gz"
    )  # 1.5 mm voxels: its voxels average the grain; a blur would erase its cortex
    same, grain = soften(crop)
    assert grain.before_hu > MAX_HU and grain.pixel_mm >= FINE_PIXEL_MM
    assert same is crop and not grain.smoothed


def test_a_series_with_ribs_down_to_its_lowest_vertebra_names_no_lumbar_level(shared_data):
    vol, labels = _chest_ct(shared_data)
    # the chest CT from T10 up: every vertebra in view bears ribs
    k = int(np.argwhere(labels == CHEST_LABELS["T11"])[:, 2].mean())
    top = replace(
        vol,
        hu=vol.hu[:, :, k:],
        grid=Grid(
            vol.hu[:, :, k:].shape,
            vol.grid.affine
            @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, k], [0, 0, 0, 1]], dtype=float),
        ),
    )
    spine = find_spine(top)
    assert not any(d.level.startswith("L") or d.level == "T12-L1" for d in spine.discs)


@pytest.mark.parametrize(
    "case, pairs, max_mm, max_deg",
    [
        ("lumbar", {"L2-L3", "L3-L4"}, 6.0, 10.0),
        ("chest", {"T12-L1", "L1-L2"}, 6.0, 6.0),
    ],
)
def test_disc_sites_on_real_ct_sit_on_the_plane_and_centre_the_labels_define(
    shared_data, case, pairs, max_mm, max_deg
):
    """Each disc the node finds, against the disc its vertebra labels define (the endplate
    planes of the two labelled bodies, `node.phantom.insert.measure_level`)."""
    from node.phantom.insert import base_levels, load_base

    real = shared_data / "real"
    if case == "lumbar":
        d = real / "lumbar_ct_crop_l2_l4"
        base = load_base(
            d / "sub-ct_label-22_ct.nii.gz", d / "sub-ct_seg-vert_label-22_msk.nii.gz", "verse"
        )
    else:
        d = real / "chest_ct_t1_l3_labels"
        base = load_base(d / "ct.nii.gz", d / "labels.nii.gz", "totalsegmentator")
    truth = {lv.level: lv for lv in base_levels(base)}
    spine = find_spine(base.volume())
    seen = set()
    for disc in spine.discs:
        lv = min(truth.values(), key=lambda t: float(np.linalg.norm(t.centre - disc.centre)))
        if lv.level not in pairs:
            continue
        seen.add(lv.level)
        miss = float(np.linalg.norm(lv.centre - disc.centre))
        turn = float(np.degrees(np.arccos(min(1.0, abs(float(lv.frame[:, 2] @ disc.frame[:, 2]))))))
        assert miss < max_mm and turn < max_deg, f"{lv.level}: {miss:.1f} mm, {turn:.0f} deg off"
    assert seen == pairs


def test_disc_spaces_of_the_real_lumbar_crop(shared_data):
    d = shared_data / "real" / "lumbar_ct_crop_l2_l4"
    vol = load_nifti(d / "sub-ct_label-22_ct.nii.gz")
    verts = np.asarray(nib.load(d / "sub-ct_seg-vert_label-22_msk.nii.gz").dataobj)
    spine = find_spine(vol)
    assert not spine.sacrum_found and any("sacrum" in w for w in spine.warnings)
    assert all(not d.level for d in spine.discs)  # no anchor in view: nothing named

    def label(p):
        k = np.rint(vol.grid.to_index(p[None])[0]).astype(int)
        return int(verts[tuple(np.clip(k, 0, np.array(verts.shape) - 1))])

    pairs = set()
    for disc in spine.discs:
        up = disc.frame[:, 2]
        assert label(disc.centre) == 0, "disc centre inside a vertebra"
        above = {label(disc.centre + up * t) for t in (8, 12, 16)} - {0}
        below = {label(disc.centre - up * t) for t in (8, 12, 16)} - {0}
        assert len(above) == 1 and len(below) == 1
        pairs.add((above.pop(), below.pop()))
    assert pairs == {(21, 22), (22, 23)}  # L2|L3 and L3|L4 in VerSe numbering


# -- views ----------------------------------------------------------------------------------


def test_views_are_centred_on_the_disc_and_map_back_to_voxels(phantom):
    labels = load_labels(phantom.folder)
    spec = ViewSpec(size=256)
    for lv in phantom.truth["levels"]:
        up, left = np.array(lv["normal_lps"]), np.array(lv["left_lps"])
        frame = np.stack([left, np.cross(up, left), up], axis=1)
        for view in View:
            plane = disc_plane(view, np.array(lv["centre_lps"]), frame, spec)
            lab = sample_plane(labels.disc_level, labels.grid, plane, order=0)
            assert lab[128, 128] == lv["label_code"], f"{lv['level']} {view.value}"
            # pixel -> patient -> voxel lands on the same label
            k, r, c = np.rint(
                labels.grid.to_index(plane.pixel_to_patient(np.array([[128.0, 128.0]])))[0]
            ).astype(int)
            assert labels.disc_level[k, r, c] == lv["label_code"]
        axial = disc_plane(View.AXIAL, np.array(lv["centre_lps"]), frame, spec)
        np.testing.assert_allclose(axial.normal, up, atol=1e-3)


# -- fusion and measurements ----------------------------------------------------------------


def _det(cls: DiscClass, conf: float, rows: slice, cols: slice, size: int = 64) -> Detection:
    m = np.zeros((size, size), bool)
    m[rows, cols] = True
    return Detection(cls.class_id, conf, (cols.start, rows.start, cols.stop, rows.stop), m)


def _slice(role, view, *dets, size=64):
    return SliceDetections(role, view, tuple(dets), size, 0.5)


def test_fusion_votes_and_keeps_a_node_beside_the_disc():
    centre = slice(24, 40)
    slices = [
        _slice("disc", "axial", _det(DiscClass.PROTRUSION, 0.8, centre, centre)),
        _slice("disc", "axial", _det(DiscClass.BULGE, 0.5, centre, centre)),
        _slice(
            "disc",
            "sagittal",
            _det(DiscClass.PROTRUSION, 0.7, centre, centre),
            _det(DiscClass.SCHMORL, 0.6, slice(18, 22), slice(30, 34)),
        ),  # 6 mm above the centre
    ]
    findings, votes = fuse(slices, disc_half_height_mm=5.0)
    assert [f.cls for f in findings] == [DiscClass.PROTRUSION, DiscClass.SCHMORL]
    assert votes["protrusion"] == pytest.approx(1.5 / 3)


def test_fusion_node_on_a_normal_disc_and_a_far_node_ignored():
    centre = slice(24, 40)
    near = [
        _slice("disc", "axial", _det(DiscClass.NORMAL, 0.9, centre, centre)),
        _slice("endplate", "axial", _det(DiscClass.SCHMORL, 0.7, slice(28, 36), slice(28, 36))),
    ]
    findings, _ = fuse(near, disc_half_height_mm=5.0)
    assert [f.cls for f in findings] == [DiscClass.SCHMORL]
    far = [
        _slice("disc", "axial", _det(DiscClass.NORMAL, 0.9, centre, centre)),
        _slice(
            "disc",
            "sagittal",
            _det(DiscClass.NORMAL, 0.9, centre, centre),
            _det(DiscClass.SCHMORL, 0.9, slice(0, 4), slice(30, 34)),
        ),
    ]  # 15 mm away: next disc
    findings, _ = fuse(far, disc_half_height_mm=5.0)
    assert [f.cls for f in findings] == [DiscClass.NORMAL]


def test_a_node_in_an_endplate_slice_counts_only_over_the_central_endplate():
    """Beside the sacrum's top the alae and the S1 foramina show as holes in bone 13-26 mm
    from the disc centre; in an endplate slice only a node within 12 mm of it is one."""
    centre = slice(44, 56)  # 100 px of 0.5 mm: the disc centre at column 50

    def level(node_cols: slice) -> list[DiscClass]:
        slices = [
            _slice("disc", "axial", _det(DiscClass.NORMAL, 0.9, centre, centre, 100), size=100),
            _slice(
                "endplate",
                "axial",
                _det(DiscClass.SCHMORL, 0.8, slice(52, 58), node_cols, 100),
                size=100,
            ),
        ]
        return [f.cls for f in fuse(slices, disc_half_height_mm=5.0)[0]]

    assert level(slice(66, 72)) == [DiscClass.SCHMORL]  # 9.2 mm to the left
    assert level(slice(28, 34)) == [DiscClass.SCHMORL]  # 9.2 mm to the right
    assert level(slice(76, 82)) == [DiscClass.NORMAL]  # 14.2 mm: beside the body
    assert level(slice(18, 24)) == [DiscClass.NORMAL]


def test_a_node_seen_in_the_ct_stands_for_a_level_whose_shape_the_model_is_unsure_of():
    """A Schmorl's node seen in the CT (`find_node`) is a finding where the model found none;
    where the model's vote on the disc's shape is weak too, the node alone is the level's
    finding and the margin rule's protrusion is only a warning (its bulge stays beside the
    node). A sure vote keeps its shape (a sure "normal" gives way to the node, as in `fuse`),
    and without a node in the CT the rule decides as before."""
    from node.analysis.endplate import NodeInCT
    from node.analysis.fusion import Finding
    from node.analysis.measure import Measurements
    from node.analysis.study import RULE_BELOW_VOTE, _apply_rule

    m = Measurements(8.0, tissue_arc_deg=40.0, tissue_extension_mm=6.0)
    m = replace(m, tissue_class=DiscClass.PROTRUSION)
    node = NodeInCT(-1, np.zeros(3), 3.0, ())
    unsure = {"normal": 0.05, "bulge": 0.1, "protrusion": 0.2}
    shape = [Finding(DiscClass.BULGE, 0.1, 2)]
    warnings: list[str] = []
    out = _apply_rule(shape, unsure, m, warnings, RULE_BELOW_VOTE, node, 0.3)
    assert [(f.cls, f.by_rule, f.in_ct, f.confidence) for f in out] == [
        (DiscClass.SCHMORL, True, True, 0.3)
    ]
    assert any("rule's protrusion is not reported" in w and "lower body" in w for w in warnings)
    sure = {"normal": 0.0, "bulge": 0.1, "protrusion": 0.6}
    out = _apply_rule([Finding(DiscClass.PROTRUSION, 0.6, 3)], sure, m, [], RULE_BELOW_VOTE, node)
    assert [f.cls for f in out] == [DiscClass.PROTRUSION, DiscClass.SCHMORL]
    normal = {"normal": 0.7, "bulge": 0.0, "protrusion": 0.0}
    out = _apply_rule([Finding(DiscClass.NORMAL, 0.7, 3)], normal, m, [], RULE_BELOW_VOTE, node)
    assert [f.cls for f in out] == [DiscClass.SCHMORL]  # as `fuse` does for its own nodes
    out = _apply_rule(shape, unsure, m, [], RULE_BELOW_VOTE)
    assert [(f.cls, f.by_rule) for f in out] == [(DiscClass.PROTRUSION, True)]
    # a margin that reads bulge is rare on untouched real discs: it stays beside the node
    wide = replace(m, tissue_arc_deg=120.0, tissue_class=DiscClass.BULGE)
    warnings = []
    out = _apply_rule(shape, unsure, wide, warnings, RULE_BELOW_VOTE, node, 0.3)
    assert [(f.cls, f.by_rule, f.in_ct) for f in out] == [
        (DiscClass.BULGE, True, False),
        (DiscClass.SCHMORL, True, True),
    ]
    assert any("the node and the 25% rule's bulge are the level's findings" in w for w in warnings)


def test_a_margin_read_abnormal_needs_a_surer_vote_to_be_overruled():
    """Where the disc's margin in the CT reads bulge or protrusion, the model's other shape
    stands only from `RULE_HOLDS_VOTE`; where it reads normal, from `RULE_BELOW_VOTE` as
    before. With a node seen in the CT, a vote between the two leaves the node and the
    margin's bulge (`NODE_KEEPS`), or the node alone where the margin reads protrusion."""
    from node.analysis.endplate import NodeInCT
    from node.analysis.fusion import Finding
    from node.analysis.measure import Measurements
    from node.analysis.study import RULE_BELOW_VOTE, RULE_HOLDS_VOTE, _apply_rule

    def read(cls: DiscClass) -> Measurements:
        m = Measurements(8.0, tissue_arc_deg=120.0, tissue_extension_mm=6.0)
        return replace(m, tissue_class=cls)

    vote = (RULE_BELOW_VOTE + RULE_HOLDS_VOTE) / 2
    votes = {"normal": 0.0, "bulge": 0.1, "protrusion": vote}
    says = [Finding(DiscClass.PROTRUSION, vote, 3)]

    def run(m: Measurements, v: dict, node: NodeInCT | None = None) -> list[DiscClass]:
        out = _apply_rule(says, v, m, [], RULE_BELOW_VOTE, node, 0.3, RULE_HOLDS_VOTE)
        return [f.cls for f in out]

    bulge = read(DiscClass.BULGE)
    assert run(bulge, votes) == [DiscClass.BULGE]
    assert run(read(DiscClass.NORMAL), votes) == [DiscClass.PROTRUSION]
    sure = {"normal": 0.0, "bulge": 0.1, "protrusion": RULE_HOLDS_VOTE}
    assert run(bulge, sure) == [DiscClass.PROTRUSION]
    node = NodeInCT(1, np.zeros(3), 3.0, ())
    assert run(bulge, votes, node) == [DiscClass.BULGE, DiscClass.SCHMORL]
    assert run(read(DiscClass.PROTRUSION), votes, node) == [DiscClass.SCHMORL]
    assert run(bulge, sure, node) == [DiscClass.PROTRUSION, DiscClass.SCHMORL]
    # without the second threshold, as before: the model's vote stands from RULE_BELOW_VOTE
    out = _apply_rule(says, votes, bulge, [], RULE_BELOW_VOTE)
    assert [f.cls for f in out] == [DiscClass.PROTRUSION]


def test_extension_measured_against_the_vertebral_edge():
    yy, xx = np.mgrid[0:200, 0:200]
    edge = (xx - 100) ** 2 + (yy - 100) ** 2 <= 60**2
    disc = (xx - 100) ** 2 + (yy - 100) ** 2 <= 59**2
    bump = (
        (np.hypot(xx - 100, yy - 100) <= 70)
        & (np.degrees(np.arctan2(yy - 100, xx - 100)) > 80)
        & (np.degrees(np.arctan2(yy - 100, xx - 100)) < 100)
    )
    ext = disc_extension(disc | bump, edge, pixel_mm=0.25)
    assert ext.max_mm == pytest.approx(2.5, abs=0.2)  # 10 px beyond the edge
    assert ext.share == pytest.approx(20 / 360, abs=0.01)
    assert 80 <= ext.direction_deg <= 100
    ring = disc_extension((xx - 100) ** 2 + (yy - 100) ** 2 <= 70**2, edge, pixel_mm=0.25)
    assert ring.share == 1.0
