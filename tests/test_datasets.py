"""Dataset builders: phantoms, LabelMe and DICOM SEG into the YOLO-seg format."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image

from node.classes import CLASS_NAMES, DiscClass
from node.training.data import read_data_yaml
from node.training.from_phantoms import build_from_phantoms
from node.training.importers import ImportError_, build_from_labelme, build_from_seg
from node.training.yolo import Instance, rasterize


def _read_instances(label_file, shape):
    h, w = shape
    out = []
    for line in label_file.read_text().splitlines():
        v = line.split()
        pts = np.array(v[1:], dtype=float).reshape(-1, 2) * [w, h]
        out.append(Instance(DiscClass(CLASS_NAMES[int(v[0])]), pts))
    return out


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def test_phantom_dataset_is_split_by_study(phantoms, tmp_path, capsys):
    writer = build_from_phantoms(
        [p.folder for p in phantoms], tmp_path / "ds", val_fraction=0.34, progress=False
    )
    spec = read_data_yaml(tmp_path / "ds" / "data.yaml")
    assert spec.names == CLASS_NAMES
    assert spec.idaics["windowing"]["width"] > 0 and spec.idaics["views"]["size"] == 512
    manifest = spec.manifest()
    studies = {
        s: {r["study"] for r in manifest.values() if r["split"] == s} for s in ("train", "val")
    }
    assert studies["train"] and studies["val"] and not (studies["train"] & studies["val"])
    assert len(spec.images("train")) + len(spec.images("val")) == len(manifest)
    img = np.asarray(Image.open(spec.images("train")[0]))
    assert img.shape == (512, 512) and img.dtype == np.uint8 and img.std() > 5
    # every image shows its target, near the centre, with the right class
    for rel, row in manifest.items():
        label = spec.root / rel.replace("images/", "labels/").replace(".png", ".txt")
        inst = _read_instances(label, (512, 512))
        assert row["target"] in {i.cls.value for i in inst}, rel
    table = writer.summary()
    assert "train" in table and "val" in table and all(n in table for n in CLASS_NAMES)
    assert sum(writer.counts["val"].values()) > 0


def _labelme(tmp_path, labels):
    folder = tmp_path / "study-a"
    folder.mkdir(parents=True)
    img = np.zeros((64, 80), dtype=np.uint8)
    img[10:30, 10:40] = 200
    Image.fromarray(img).save(folder / "img1.png")
    shapes = [{"label": lab, "points": pts, "shape_type": "polygon"} for lab, pts in labels]
    (folder / "img1.json").write_text(
        json.dumps(
            {
                "imagePath": "img1.png",
                "imageHeight": 64,
                "imageWidth": 80,
                "imageData": None,
                "shapes": shapes,
            }
        )
    )
    return tmp_path


def test_labelme_import_gives_the_expected_masks(tmp_path):
    tri = [[10, 10], [40, 10], [40, 30]]
    sq = [[50, 40], [70, 40], [70, 60], [50, 60]]
    src = _labelme(tmp_path / "src", [("Disc protrusion", tri), ("SN", sq)])
    mapping = tmp_path / "map.yaml"
    mapping.write_text("Disc protrusion: protrusion\nSN: schmorl\n")
    build_from_labelme([src], tmp_path / "ds", mapping=mapping)
    spec = read_data_yaml(tmp_path / "ds" / "data.yaml")
    images = spec.images("train") + spec.images("val")
    assert len(images) == 1
    split = "train" if spec.images("train") else "val"
    inst = _read_instances(spec.root / "labels" / split / (images[0].stem + ".txt"), (64, 80))
    got = rasterize(inst, (64, 80))
    want = np.zeros((64, 80), np.uint8)
    cv2.fillPoly(want, [np.array(tri, np.int32)], DiscClass.PROTRUSION.class_id + 1)
    cv2.fillPoly(want, [np.array(sq, np.int32)], DiscClass.SCHMORL.class_id + 1)
    for c in (DiscClass.PROTRUSION, DiscClass.SCHMORL):
        assert _iou(got == c.class_id + 1, want == c.class_id + 1) > 0.97


def test_labelme_unknown_label_names_file_and_label(tmp_path):
    src = _labelme(tmp_path / "src", [("herniation??", [[1, 1], [9, 1], [9, 9]])])
    mapping = tmp_path / "map.yaml"
    mapping.write_text("bulge: bulge\n")
    with pytest.raises(ImportError_, match=r"img1\.json.*'herniation\?\?'"):
        build_from_labelme([src], tmp_path / "ds", mapping=mapping)


def test_mapping_to_an_unknown_class_is_an_error(tmp_path):
    src = _labelme(tmp_path / "src", [("x", [[1, 1], [9, 1], [9, 9]])])
    mapping = tmp_path / "map.yaml"
    mapping.write_text("x: herniation\n")
    with pytest.raises(ValueError, match="herniation"):
        build_from_labelme([src], tmp_path / "ds", mapping=mapping)


def test_seg_import_matches_the_seg_frames(shared_data, tmp_path):
    d = shared_data / "real" / "third_party_seg_sr"
    mapping = tmp_path / "map.yaml"
    mapping.write_text(
        "Liver: normal\nGREEN: bulge\nORANGE: protrusion\nPURPLE: schmorl\n"
        "LIGHT_BLUE: ignore\nDARK_BLUE: normal\n"
    )
    build_from_seg(
        [d / "liver.dcm", d / "partial_overlaps.dcm"],
        tmp_path / "ds",
        mapping=mapping,
        ct=[d / "ct-3slice"],
    )
    spec = read_data_yaml(tmp_path / "ds" / "data.yaml")
    images = {p.stem: p for p in spec.images("train") + spec.images("val")}
    seg = pydicom.dcmread(d / "liver.dcm")
    frames = seg.pixel_array
    cts = {
        round(float(c.ImagePositionPatient[2]), 2): c
        for c in (pydicom.dcmread(p) for p in sorted((d / "ct-3slice").glob("*.dcm")))
    }
    checked = 0
    for f, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        z = round(float(fg.PlanePositionSequence[0].ImagePositionPatient[2]), 2)
        ct = cts[z]
        name = f"liver_{int(ct.InstanceNumber):04d}"
        split = "train" if (spec.train / f"{name}.png").exists() else "val"
        inst = _read_instances(spec.root / "labels" / split / f"{name}.txt", frames[f].shape)
        got = rasterize(inst, frames[f].shape) == DiscClass.NORMAL.class_id + 1
        assert _iou(got, frames[f] > 0) > 0.9, name
        img = np.asarray(Image.open(images[name]))
        assert img.shape == frames[f].shape
        checked += 1
    assert checked == 3


def test_seg_without_its_ct_says_which_slice_is_missing(shared_data, tmp_path):
    d = shared_data / "real" / "third_party_seg_sr" / "sr-example"
    mapping = tmp_path / "map.yaml"
    mapping.write_text("'Neoplasm, Primary': protrusion\n")
    with pytest.raises(ImportError_, match="no CT slice at .* pass the SEG's CT series"):
        build_from_seg([d / "seg.dcm"], tmp_path / "ds", mapping=mapping, ct=[d])
    mapping.write_text("Liver: normal\n")
    with pytest.raises(ImportError_, match="'Neoplasm, Primary' is not in the mapping"):
        build_from_seg([d / "seg.dcm"], tmp_path / "ds", mapping=mapping, ct=[d])


@pytest.mark.parametrize(
    "content,match",
    [
        (None, "not found"),
        ("names: [a, b]\n", "missing"),
        (
            "train: images/train\nval: images/val\nnames: [normal, bulge, schmorl, protrusion]\n",
            "order",
        ),
        (
            "train: images/train\nval: images/val\nnames: [normal, schmorl, bulge, herniation]\n",
            "herniation",
        ),
        ("train: [\n", "YAML"),
    ],
)
def test_bad_data_yaml_is_a_clear_error(tmp_path, content, match):
    from node.training.data import DataError

    path = tmp_path / "data.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=match):
        read_data_yaml(path)


def test_render_writes_pictures(phantom, tmp_path):
    from node.cli import main

    assert main(["render", str(phantom.folder), "--out", str(tmp_path)]) == 0
    png = tmp_path / f"{phantom.folder.name}.png"
    img = np.asarray(Image.open(png))
    assert img.ndim == 3 and img.shape[0] >= 320 and img.std() > 10
