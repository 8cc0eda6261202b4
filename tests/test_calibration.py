"""Calibrated confidence: the fit, the error it removes, and its use in the analysis."""

from __future__ import annotations

import shutil

import numpy as np
import yaml

from node.calibration import Calibration, Platt
from node.training.calibrate import calibrate_from_rows, ece, fit_platt
from tests.test_outputs import MODEL


def overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Confidences near 0.9 for discs that are right only 60% of the time, as a model sure
    of itself on scans unlike its training data."""
    rng = np.random.default_rng(seed)
    conf = np.clip(rng.normal(0.9, 0.05, n), 0.5, 0.999)
    return conf, (rng.random(n) < 0.6).astype(float)


def test_platt_scaling_removes_most_of_the_calibration_error_on_held_out_discs():
    cf, yf = overconfident(400, 1)
    ct, yt = overconfident(400, 2)
    platt = fit_platt(cf, yf)
    after = np.array([platt(c) for c in ct])
    assert ece(ct, yt) > 0.2
    assert ece(after, yt) < 0.08
    assert abs(float(after.mean()) - float(yt.mean())) < 0.08
    card = Calibration.from_card(platt.to_dict())
    assert card == Calibration(Platt(round(platt.a, 5), round(platt.b, 5)))


def test_a_fit_needs_right_and_wrong_discs():
    import pytest

    with pytest.raises(ValueError, match="both right and wrong"):
        fit_platt(np.full(20, 0.9), np.ones(20))


def test_calibration_rows_are_split_by_study_and_the_error_measured_on_the_other_half(tmp_path):
    conf, right = overconfident(300, 3)
    rows = [
        {
            "study": f"s{i // 3}",
            "found": True,
            "confidence": float(c),
            "truth": ["bulge"],
            "predicted": ["bulge" if r else "protrusion"],
        }
        for i, (c, r) in enumerate(zip(conf, right))
    ]
    entry = calibrate_from_rows(rows, tmp_path / "rel.png", "test")
    assert entry["fitted_on_discs"] + entry["measured_on_discs"] == 300
    assert entry["ece_after"] < entry["ece_before"]
    assert (tmp_path / "rel.png").stat().st_size > 1000


def test_classes_the_rule_decided_get_a_map_of_their_own(tmp_path):
    """The model's vote is sure and right 60% of the time; where it was weak (a vote of about
    0.1 for the class) the 25% rule decided, right 75% of the time. One map for both would
    call the rule's classes unlikely; a map for each gives each its own rate."""
    rng = np.random.default_rng(5)
    rows = []
    for i in range(600):
        by_rule = i % 2 == 1
        c = float(np.clip(rng.normal(0.1 if by_rule else 0.9, 0.04), 0.01, 0.99))
        right = rng.random() < (0.75 if by_rule else 0.6)
        rows.append(
            {
                "study": f"s{i // 6}",
                "found": True,
                "confidence": c,
                "by_rule": by_rule,
                "truth": ["bulge"],
                "predicted": ["bulge" if right else "protrusion"],
            }
        )
    entry = calibrate_from_rows(rows)
    cal = Calibration.from_card(entry)
    assert cal is not None and cal.rule is not None
    assert abs(cal(0.1, by_rule=True) - 0.75) < 0.08 and abs(cal(0.9) - 0.6) < 0.08
    one = calibrate_from_rows([r | {"by_rule": False} for r in rows])
    assert "rule" not in one and entry["ece_after"] < one["ece_after"]


def test_the_analysis_reports_the_calibrated_confidence(analysed_phantoms, tmp_path):
    """Each class's confidence through its own map: the model's (here a coin toss) or the
    rule's (here 0.8). The rule is made to decide wherever it disagrees with the model, so
    that the phantom shows classes of both kinds; the classes are those of the same analysis
    without calibration."""
    from node.analysis.study import analyze_volume
    from node.inference.model import load_model

    model_dir = tmp_path / "calibrated"
    shutil.copytree(MODEL, model_dir)
    card = yaml.safe_load((model_dir / "model.yaml").read_text())
    card["calibration"] = {"method": "platt", "a": 0.0, "b": 0.0, "rule": {"a": 0.0, "b": 1.38629}}
    (model_dir / "model.yaml").write_text(yaml.safe_dump(card))
    _study, vol, _plain = analysed_phantoms[0]
    plain = analyze_volume(vol, load_model(MODEL), rule_below_vote=1.01)
    result = analyze_volume(vol, load_model(model_dir), rule_below_vote=1.01)
    confs = [(f.by_rule, f.confidence) for d in result.discs for f in d.findings]
    assert {rule for rule, _ in confs} == {True, False}, confs
    assert all(abs(c - (0.8 if rule else 0.5)) < 1e-4 for rule, c in confs)
    assert [d.classes for d in result.discs] == [d.classes for d in plain.discs]
