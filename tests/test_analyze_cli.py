"""`idaics analyze` end to end with the bundled model, and its answers on bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from node.cli import DEFAULT_MODEL, main
from node.inference.model import ModelError, load_model, read_card
from node.phantom.generate import SERIES_DIR


def test_bundled_model_loads_once_and_predicts_in_one_batch():
    model = load_model(DEFAULT_MODEL, "cpu")
    assert load_model(DEFAULT_MODEL, "cpu") is model
    size = model.card.views.size
    images = [np.zeros((size, size), np.uint8), np.full((size, size), 128, np.uint8)]
    out = model.predict(images)
    assert len(out) == 2 and all(isinstance(d, list) for d in out)


def test_a_card_with_views_of_no_known_kind_is_refused(tmp_path):
    (tmp_path / "weights.pt").write_bytes(b"")
    card = "classes: [normal, schmorl, bulge, protrusion]\nweights: weights.pt\nviews: {}\n"
    (tmp_path / "model.yaml").write_text(card.format("whole"))
    with pytest.raises(ModelError, match="neither 'native'"):
        read_card(tmp_path)
    (tmp_path / "model.yaml").write_text(card.format("native"))
    assert read_card(tmp_path).native


def test_analyze_prints_every_level_and_writes_json_and_previews(phantom, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(["analyze", str(phantom.folder / SERIES_DIR), "--out", str(out), "--device", "cpu"])
        == 0
    )
    table = capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    assert result["study_instance_uid"] == phantom.truth["study_instance_uid"]
    levels = {lv["level"] for lv in result["levels"]}
    for lv in phantom.truth["levels"]:
        assert lv["level"] in levels and lv["level"] in table
        assert (out / "previews" / f"{lv['level']}.png").is_file()
    for lv in result["levels"]:
        assert all(c in {"normal", "schmorl", "bulge", "protrusion"} for c in lv["classes"])
    assert {"spine", "views", "inference", "fusion+measure"} <= set(result["timings_s"])
    written = sorted(p.name for p in (out / "dicom").iterdir())
    assert written[:2] == ["key-01.dcm", "key-02.dcm"] and {"seg.dcm", "sr.dcm"} <= set(written)
    assert str(out / "dicom" / "sr.dcm") in table


def test_analyze_writes_only_the_objects_asked_for_and_rejects_unknown_ones(
    phantom, tmp_path, capsys
):
    out = tmp_path / "out"
    assert (
        main(["analyze", str(phantom.folder / SERIES_DIR), "--out", str(out), "--objects", "sr"])
        == 0
    )
    assert [p.name for p in (out / "dicom").iterdir()] == ["sr.dcm"]
    assert main(["analyze", str(phantom.folder / SERIES_DIR), "--objects", "seg,pdf"]) == 2
    assert "unknown output object(s) pdf" in capsys.readouterr().err


def test_analyze_refuses_a_series_of_two_slice_spacings_without_a_traceback(shared_data, capsys):
    rc = main(["analyze", str(shared_data / "real" / "ge_head_ct_gantry_tilt"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 3 and "slice spacing varies" in err and "Traceback" not in err


def test_analyze_refuses_a_short_thoracolumbar_series_with_the_reason(shared_data, capsys):
    rc = main(
        [
            "analyze",
            str(shared_data / "real" / "siemens_ct_j2k_blank_uids"),
            "--json",
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err
    # 20 slices of 2 mm: too short to hold a disc space between two bodies
    assert rc == 3 and "no lumbar spine to analyse" in err and "Traceback" not in err


def test_analyze_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err
