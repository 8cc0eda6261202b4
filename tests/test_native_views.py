"""Models trained on native views (whole slices, as the paper annotated them in LabelMe) run
in the node: the slices are cut whole, and what the model finds is carried back to its disc."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from scipy import ndimage

from node.analysis.study import analyze_volume, cut_views
from node.analysis.views import disc_plane, native_plane, onto_view
from node.analysis.volume import load_folder
from node.classes import CLASS_NAMES, DiscClass
from node.cli import DEFAULT_MODEL, main
from node.geometry import Plane, frame_from_normal, sample_plane
from node.inference.interface import Detection, View, Windowing
from node.inference.model import read_card
from node.phantom.generate import SERIES_DIR, load_labels
from node.training.from_cases import native_samples
from node.training.importers import build_from_labelme
from tests.test_training import tiny_train_args

LABELME_NAMES = {c: f"disc {c.value}" for c in DiscClass}


def _grid(shape=(60, 200, 180), spacing=(2.0, 0.7, 0.7)):
    from node.geometry import axial_grid

    return axial_grid(
        rows=shape[1],
        columns=shape[2],
        slices=shape[0],
        pixel_spacing=spacing[1:],
        slice_spacing=spacing[0],
        first_position=(-60.0, -70.0, 40.0),
    )


def test_a_whole_slice_holds_the_disc_view_at_the_series_pixel_size():
    grid = _grid()
    frame = frame_from_normal(np.array([0.0, 0.2, 1.0]) / np.hypot(0.2, 1.0))
    centre = grid.to_patient(np.array([30.0, 150.0, 60.0]))  # posterior and to the right
    for view in View:
        plane = disc_plane(view, centre, frame, read_card(DEFAULT_MODEL).views)
        whole = native_plane(plane, grid)
        assert whole.size == 200 and whole.pixel_mm == pytest.approx(0.7)
        assert np.allclose(whole.u, plane.u) and np.allclose(whole.v, plane.v)
        assert abs((whole.centre - plane.centre) @ plane.normal) < 1e-9  # the same plane
        # every corner of the disc's view lies inside the whole slice
        corners = plane.pixel_to_patient(np.array([[0, 0], [0, 511], [511, 0], [511, 511]]))
        rc = whole.patient_to_pixel(corners)[:, :2]
        assert (rc >= -0.5).all() and (rc <= whole.size - 0.5).all()


def test_a_detection_carried_from_a_whole_slice_lies_where_it_was_drawn():
    view = Plane(
        np.array([5.0, 20.0, -3.0]), np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), 512, 0.15
    )
    whole = Plane(np.array([-40.0, -10.0, -3.0]), view.u, view.v, 300, 0.8)
    spot = np.array([9.0, 17.0, -3.0])  # 4 mm left and 3 mm anterior of the view's centre
    r, c, _ = whole.patient_to_pixel(spot)
    yy, xx = np.mgrid[: whole.size, : whole.size]
    mask = (yy - r) ** 2 + (xx - c) ** 2 <= (5.0 / whole.pixel_mm) ** 2  # a 5 mm disc
    det = Detection(2, 0.8, (c - 6.25, r - 6.25, c + 6.25, r + 6.25), mask)
    out = onto_view(det, whole, view)
    assert out is not None and out.class_id == 2 and out.confidence == 0.8
    assert out.mask.shape == (512, 512)
    r2, c2, _ = view.patient_to_pixel(spot)
    assert out.mask[int(round(r2)), int(round(c2))]
    ys, xs = np.nonzero(out.mask)
    assert abs(ys.mean() - r2) < 2 and abs(xs.mean() - c2) < 2
    area_mm2 = out.mask.sum() * view.pixel_mm**2
    assert area_mm2 == pytest.approx(np.pi * 25, rel=0.1)
    x0, y0, x1, y1 = out.box
    assert x0 < c2 < x1 and y0 < r2 < y1 and (x1 - x0) * view.pixel_mm == pytest.approx(10.0)
    far = Detection(0, 0.9, (0, 0, 10, 10), np.zeros_like(mask))
    far.mask[:10, :10] = True  # 30 mm away: not on the disc's view
    assert onto_view(far, whole, view) is None
    turned = Plane(whole.centre, view.v, view.u, whole.size, whole.pixel_mm)
    with pytest.raises(ValueError, match="same orientation"):
        onto_view(det, turned, view)


class _Oracle:
    """A native-view model that segments perfectly: it is handed the truth labels on the
    planes the analysis will cut, in order, and returns their regions as detections."""

    def __init__(self, card, labels, planes: list[Plane]) -> None:
        self.card, self.device = card, "cpu"
        self._labels, self._planes = labels, planes
        self.shapes: list[tuple[int, int]] = []

    def predict(self, images):
        assert len(images) == len(self._planes)
        out = []
        for image, plane in zip(images, self._planes):
            self.shapes.append(image.shape)
            cls = sample_plane(self._labels.disc_class, self._labels.grid, plane, order=0)
            dets = []
            for cid in range(len(CLASS_NAMES)):
                parts, n = ndimage.label(cls == cid + 1)
                for k in range(1, n + 1):
                    m = parts == k
                    ys, xs = np.nonzero(m)
                    box = (
                        float(xs.min()),
                        float(ys.min()),
                        float(xs.max() + 1),
                        float(ys.max() + 1),
                    )
                    dets.append(Detection(cid, 0.9, box, m))
            out.append(dets)
        return out


def _morphology(classes) -> str:
    return next((c.value for c in classes if c is not DiscClass.SCHMORL), "normal")


def _oracle_results(phantoms, card):
    from node.analysis.spine import find_spine

    out = []
    for p in phantoms:
        vol = load_folder(p.folder / SERIES_DIR)
        labels = load_labels(p.folder)
        sites = find_spine(vol).discs
        views = cut_views(vol, sites, _Oracle(card, labels, []))  # type: ignore[arg-type]
        planes = [v.source for v in views]
        assert all(pl is not None and pl.size == max(vol.grid.shape[1:]) for pl in planes)
        oracle = _Oracle(card, labels, planes)
        result = analyze_volume(vol, oracle)  # type: ignore[arg-type]
        assert set(oracle.shapes) == {(planes[0].size, planes[0].size)}
        truth = {e["level"]: e for e in p.truth["levels"]}
        out += [(d, truth[d.level], labels) for d in result.discs]
    return out


def test_a_native_view_model_that_segments_right_gives_each_disc_its_class(phantoms, monkeypatch):
    """With perfect masks on the whole slices, every disc gets its own morphology and its
    Schmorl's node (but where the endplate slice only grazes the node: at the series' 0.7 mm
    pixels a sliver of a few tenths of a millimetre is lost). Read on the whole slice's pixels
    as if they were the disc's view, the masks are neither where nor as large as the disc."""
    base = read_card(DEFAULT_MODEL)
    card = replace(base, native=True, raw={k: v for k, v in base.raw.items() if k != "calibration"})
    found = _oracle_results(phantoms, card)
    assert len(found) >= 12
    for d, t, _ in found:
        assert _morphology(d.classes) == t["morphology"], d.level
    nodes = [d for d, t, _ in found if t.get("schmorl")]
    hit = sum(DiscClass.SCHMORL in d.classes for d in nodes)
    assert nodes and hit >= len(nodes) - 1
    assert all(DiscClass.SCHMORL not in d.classes for d, t, _ in found if not t.get("schmorl"))

    # each disc's own axial mask is the disc's section: as large, and where the disc is
    for d, _, labels in found:
        mask = _disc_mask(d)
        assert mask is not None, d.level
        area, centre = mask
        true_area, true_centre = _section(d, labels)
        assert area == pytest.approx(true_area, rel=0.1), d.level
        assert np.linalg.norm(centre - true_centre) < 1.0, d.level

    monkeypatch.setattr("node.analysis.study.on_views", lambda views, dets: dets)
    unmapped = _oracle_results(phantoms[:1], card)
    off = 0
    for d, _, labels in unmapped:
        mask = _disc_mask(d)
        if mask is None:
            off += 1
            continue
        area, centre = mask
        true_area, true_centre = _section(d, labels)
        off += area < 0.5 * true_area or np.linalg.norm(centre - true_centre) > 3
    assert off == len(unmapped)


def _disc_mask(d) -> tuple[float, np.ndarray] | None:
    """Area (mm2) and centroid (LPS) of a disc's own mid axial mask, if it has one."""
    m = next((m for m in d.masks if m.view is View.AXIAL and m.cls is not DiscClass.SCHMORL), None)
    if m is None:
        return None
    ij = np.argwhere(m.mask).mean(axis=0)
    return float(m.mask.sum()) * m.plane.pixel_mm**2, m.plane.pixel_to_patient(ij)


def _section(d, labels) -> tuple[float, np.ndarray]:
    """Area (mm2) and centroid (LPS) of the disc's section in the truth labels, on the plane
    of its mid axial mask."""
    plane = disc_plane(View.AXIAL, d.site.centre, d.site.frame, read_card(DEFAULT_MODEL).views)
    c = plane.size // 2
    cls = sample_plane(labels.disc_class, labels.grid, plane, order=0)
    parts, _ = ndimage.label(cls == cls[c, c])
    section = parts == parts[c, c]
    ij = np.argwhere(section).mean(axis=0)
    return float(section.sum()) * plane.pixel_mm**2, plane.pixel_to_patient(ij)


def _labelme_from_phantom(study, out: Path, window: Windowing) -> int:
    """Whole native slices of a phantom, annotated as a radiologist would in LabelMe: the
    scanner's axial slice through each disc and one mid-sagittal reformat (the slices and
    labels of a native-view dataset, `native_samples`), written as LabelMe JSON."""
    folder = out / study.folder.name
    folder.mkdir(parents=True)
    n = 0
    for sample in native_samples(study.folder, window):
        buf = io.BytesIO()
        Image.fromarray(sample.image).save(buf, format="PNG")
        shapes = [
            {"label": LABELME_NAMES[i.cls], "points": i.polygon.tolist(), "shape_type": "polygon"}
            for i in sample.instances
        ]
        h, w = sample.image.shape
        (folder / f"{sample.name}.json").write_text(
            json.dumps(
                {
                    "imagePath": f"{sample.name}.png",
                    "imageData": base64.b64encode(buf.getvalue()).decode(),
                    "imageHeight": h,
                    "imageWidth": w,
                    "shapes": shapes,
                }
            )
        )
        n += 1
    return n


@pytest.mark.slow
def test_a_model_trained_on_labelme_whole_slices_runs_in_analyze_evaluate_and_the_node(
    phantoms, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    src = tmp_path / "labelme"
    n = sum(_labelme_from_phantom(p, src, Windowing()) for p in phantoms)
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(yaml.safe_dump({v: k.value for k, v in LABELME_NAMES.items()}))
    build_from_labelme([src], tmp_path / "ds", mapping=mapping, val_fraction=0.34)
    model = tmp_path / "models" / "native"
    rc = main(tiny_train_args(tmp_path / "ds" / "data.yaml", model))
    assert rc == 0 and n >= 15
    card = read_card(model)
    assert card.native and card.raw["views"] == "native"
    out = tmp_path / "out"
    study = phantoms[0]
    args = ["analyze", str(study.folder / SERIES_DIR), "--model", str(model), "--out", str(out)]
    assert main([*args, "--device", "cpu"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["model"] == "native"
    assert {lv["level"] for lv in result["levels"]} == {e["level"] for e in study.truth["levels"]}
    assert (out / "dicom" / "sr.dcm").is_file()  # a SEG only where the model drew a mask
    ev = tmp_path / "eval"
    assert (
        main(["evaluate", "--model", str(model), "--studies", str(study.folder), "--out", str(ev)])
        == 0
    )
    assert "levels found" in capsys.readouterr().out
    report = json.loads((ev / "metrics_per_disc.json").read_text())
    assert report["levels"] == len(study.truth["levels"])

    # the node itself, with the native-view model as its model: received, analysed, SR in PACS
    from tests.test_service import in_pacs, orthanc, start_node, storescu, wait_job

    with orthanc(tmp_path / "orthanc") as pacs:
        node, _ = start_node(tmp_path / "node", pacs, model=str(model))
        try:
            assert storescu(node, study.folder / SERIES_DIR).returncode == 0
            job = wait_job(node.home, lambda j: j.state.value in ("DONE", "FAILED", "SKIPPED"))
            assert job.state.value == "DONE", job.reason
            assert job.result["model"] == "native"
            assert job.result["model_version"] == card.version
            assert len(job.result["levels"]) == len(study.truth["levels"])
            assert in_pacs(pacs, study.truth["study_instance_uid"], "SR")
        finally:
            node.stop()
