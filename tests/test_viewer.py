"""The node's objects as a radiologist opens them: OHIF in headless Chromium on Orthanc's DICOMweb.

A phantom's CT and the node's SEG, SR and key images are stored in Orthanc; OHIF reads them
through DICOMweb, as a reading room would, and the test checks what it shows: the SR's
outlines with their labels and numbers and no error, the SEG's segments named and coloured,
the key images; and the report of a series the node could not analyse.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from node.analysis.study import analyze_volume
from node.analysis.volume import load_folder
from node.classes import CLASS_COLOURS, DISC_COLOUR
from node.inference.model import load_model
from node.outputs import codes
from node.outputs.build import build_outputs, write_outputs
from node.outputs.settings import OutputSettings
from node.outputs.sr import build_not_analysed_sr
from node.phantom.generate import SERIES_DIR
from tests.browser import Browser
from tests.servers import orthanc
from tests.viewer import ohif

pytestmark = pytest.mark.slow

MODEL = Path(__file__).resolve().parents[1] / "models" / "idaics-v2"
DICOMWEB = {
    "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
    "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
}
SERVICES = "window.services"


def _store(pacs, files) -> None:
    for f in files:
        req = urllib.request.Request(
            pacs.url + "/instances", data=Path(f).read_bytes(), method="POST"
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            assert json.loads(r.read())["Status"] in ("Success", "AlreadyStored")


def _display_sets(b: Browser) -> list[dict]:
    return json.loads(
        b.js(
            f"JSON.stringify({SERVICES}.displaySetService.getActiveDisplaySets().map(d => "
            "({uid: d.displaySetInstanceUID, modality: d.Modality, number: d.SeriesNumber})))"
        )
    )


def _show(b: Browser, series_number: int) -> str:
    """Double-click the series' thumbnail in the study browser, as a radiologist opens it."""
    assert b.js(
        f'(() => {{ const t = document.querySelector(\'[data-cy^="study-browser-thumbnail"]'
        f'[data-series="{series_number}"]\'); if (!t) return false;'
        " t.dispatchEvent(new MouseEvent('dblclick', {bubbles: true})); return true; })()"
    ), series_number
    return b.js(f"{SERVICES}.viewportGridService.getActiveViewportId()")


def _viewport_shows_image(shot: Path) -> bool:
    """Whether the viewport (the middle of the page) shows an image rather than black."""
    rgb = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("L")).astype(int)
    h, w = rgb.shape
    middle = rgb[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3]
    return float((middle > 40).mean()) > 0.2


def _click(b: Browser, text: str) -> None:
    b.js(
        f"[...document.querySelectorAll('button, span, a')].filter(e => e.textContent.trim() === {text!r})"
        ".forEach(e => e.click())"
    )


def _open_study(b: Browser, url: str, n_series: int) -> list[dict]:
    b.go(url)
    b.wait(
        f"{SERVICES} && {SERVICES}.displaySetService.getActiveDisplaySets().length >= {n_series}",
        180,
    )
    b.wait("document.querySelector('canvas') !== null", 60)
    time.sleep(2)
    _click(b, "Skip all")  # the viewer's first-visit tour
    return _display_sets(b)


def _viewer_text(b: Browser) -> str:
    return b.js("document.body.innerText")


def _keep(shots: list[Path]) -> None:
    if os.environ.get("IDAICS_SCREENSHOT_DIR"):  # to refresh the README's pictures
        for shot in shots:
            shutil.copy(shot, Path(os.environ["IDAICS_SCREENSHOT_DIR"]) / shot.name)


@pytest.fixture(scope="module")
def analysed(phantom, tmp_path_factory):
    model = load_model(MODEL)
    vol = load_folder(phantom.folder / SERIES_DIR)
    result = analyze_volume(vol, model)
    outputs = build_outputs(result, vol, model.card, OutputSettings())
    folder = tmp_path_factory.mktemp("viewer-objects")
    return vol, result, outputs, write_outputs(outputs, folder)


def test_ohif_opens_the_sr_seg_and_key_images_of_a_study(analysed, phantom, tmp_path):
    vol, result, outputs, paths = analysed
    ct_files = sorted((phantom.folder / SERIES_DIR).iterdir())
    sr = pydicom.dcmread(next(p for p in paths if p.name == "sr.dcm"))
    groups = next(
        g for g in sr.ContentSequence if g.ConceptNameCodeSequence[0].CodeValue == "126010"
    ).ContentSequence
    assert len(groups) == len(outputs.segments)  # one planar group per segment
    with orthanc(tmp_path / "orthanc", extra=DICOMWEB) as pacs, ohif(pacs.url) as viewer:
        _store(pacs, ct_files + paths)
        b = Browser(tmp_path, size=(1400, 900))
        try:
            sets = _open_study(b, viewer.study_url(vol.study_uid), 4)
            by = {(d["modality"], d["number"]): d["uid"] for d in sets}
            shots = []

            # the SR: every group hydrates with its outline, its level and its numbers
            sr_set = by[("SR", 9802)]
            _show(b, 9802)
            got = json.loads(
                b.wait(
                    f"(() => {{ const d = {SERVICES}.displaySetService.getDisplaySetByUID('{sr_set}');"
                    " return d && d.isLoaded && d.measurements && d.measurements.length ? JSON.stringify("
                    "d.measurements.map(m => ({id: m.TrackingIdentifier, loaded: m.loaded, type: m.graphicType,"
                    " labels: m.labels}))) : null; })()",
                    60,
                )
            )
            time.sleep(3)
            assert not b.errors, b.errors
            assert "Something went wrong" not in _viewer_text(b)
            assert sorted(m["id"] for m in got) == sorted(s.label for s in outputs.segments)
            for m in got:
                assert m["loaded"] and m["type"] == "POLYLINE", m
                labels = {x["label"]: x["value"] for x in m["labels"]}
                seg = next(s for s in outputs.segments if s.label == m["id"])
                assert labels.get("363698007") == codes.disc_code(seg.level).meaning, (
                    m
                )  # the finding site
                assert any(v.endswith((" mm", " mm2", " %")) for v in labels.values()), m
                if not seg.plain:
                    conf = labels[codes.CONFIDENCE[seg.cls].meaning]
                    assert abs(float(conf.split()[0]) - 100 * seg.confidence) < 0.01, (
                        m,
                        seg.confidence,
                    )
            for disc in result.discs:  # one outline (or more) per level
                assert any(m["id"].startswith(disc.level + " ") for m in got), disc.level
            b.wait("document.querySelectorAll('svg path, svg polyline').length > 0", 30)
            shots.append(b.screenshot(tmp_path / "ohif-sr.png"))
            assert _viewport_shows_image(shots[-1]), "the SR viewport is black"

            # the SEG: one segment per segment of ours, named and coloured
            vp = _show(b, 9801)
            time.sleep(3)
            _click(b, "Yes")  # "Do you want to open this Segmentation?"
            segs = json.loads(
                b.wait(
                    f"(() => {{ const s = {SERVICES}.segmentationService.getSegmentations();"
                    " if (!s.length || !Object.keys(s[0].segments).length) return null;"
                    f" return JSON.stringify(Object.values(s[0].segments).filter(x => x).map(x => [x.segmentIndex,"
                    f" x.label, {SERVICES}.segmentationService.getSegmentColor('{vp}', s[0].segmentationId,"
                    " x.segmentIndex)])); })()",
                    90,
                )
            )
            time.sleep(2)
            assert not b.errors, b.errors
            assert {n: label for n, label, _ in segs} == {
                s.number: s.label for s in outputs.segments
            }
            for n, _label, colour in segs:
                s = next(x for x in outputs.segments if x.number == n)
                want = DISC_COLOUR if s.plain else CLASS_COLOURS[s.cls]
                assert colour and np.abs(np.array(colour[:3]) - np.array(want)).max() <= 12, (
                    s.label,
                    colour,
                )
            # on the slice through the middle of the largest finding
            s = max((x for x in outputs.segments if not x.plain), key=lambda x: len(x.voxels))
            k = int(np.median(s.voxels[:, 0]))
            sop = vol.headers[int(np.argmin(np.abs(np.array(vol.slice_index) - k)))].SOPInstanceUID
            assert b.js(
                f"(() => {{ const v = {SERVICES}.cornerstoneViewportService.getCornerstoneViewport('{vp}');"
                f" const i = v.getImageIds().findIndex(x => x.includes('{sop}')); if (i < 0) return false;"
                " v.setImageIdIndex(i); return true; })()"
            )
            time.sleep(2)
            shots.append(b.screenshot(tmp_path / "ohif-seg.png"))

            # the key images: shown, the red banner on screen
            _show(b, 9803)
            time.sleep(4)
            shot = b.screenshot(tmp_path / "ohif-key-image.png")
            shots.append(shot)
            rgb = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")).astype(int)
            red = (rgb[..., 0] > 170) & (rgb[..., 1] < 40) & (rgb[..., 2] < 40)
            assert red.sum() > 20_000, "no banner on screen"
            assert not b.errors, b.errors
            _keep(shots)
        finally:
            b.close()


def test_ohif_shows_why_a_series_was_not_analysed(shared_data, tmp_path):
    """The report of a series the node refused (a head CT of two slice spacings) opens as
    text."""
    files = sorted((shared_data / "real" / "ge_head_ct_gantry_tilt").glob("*.dcm"))
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    reason = "cannot analyse: slice spacing varies (1.08-7.00 mm)"
    sr = build_not_analysed_sr(headers, reason, OutputSettings(), "idaics-v2")
    codes.declare_local_scheme(sr)
    sr_path = tmp_path / "sr.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    with orthanc(tmp_path / "orthanc", extra=DICOMWEB) as pacs, ohif(pacs.url) as viewer:
        _store(pacs, files + [sr_path])
        b = Browser(tmp_path, size=(1400, 900))
        try:
            _open_study(b, viewer.study_url(headers[0].StudyInstanceUID), 2)
            _show(b, 9802)
            b.wait(f"document.body.innerText.includes({('Series not analysed: ' + reason)!r})", 60)
            time.sleep(2)
            assert not b.errors, b.errors
            _keep([b.screenshot(tmp_path / "ohif-not-analysed.png")])
        finally:
            b.close()
