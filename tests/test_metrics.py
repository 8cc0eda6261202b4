"""Metrics: exact on hand-computed cases and on the IDAICS paper's tables."""

from __future__ import annotations

import numpy as np
import pytest

from node.cli import main
from node.training.metrics import compute, parse_confusion

PAPER_TABLE_1 = "19,2,0,0;2,26,1,0;0,0,14,0;0,0,0,10"
PAPER_LABELS = ["bulge", "protrusion", "normal", "schmorl"]
# The paper's Table 2, recomputed by hand from Table 1: (sens, spec, PPV, NPV, Youden).
PAPER_TABLE_2 = {
    "bulge": (19 / 21, 51 / 53, 19 / 21, 51 / 53, 19 / 21 + 51 / 53 - 1),
    "protrusion": (26 / 29, 43 / 45, 26 / 28, 43 / 46, 26 / 29 + 43 / 45 - 1),
    "normal": (1.0, 59 / 60, 14 / 15, 1.0, 59 / 60),
    "schmorl": (1.0, 1.0, 1.0, 1.0, 1.0),
}


def test_paper_table_1_gives_table_2_and_kappa():
    m = compute(parse_confusion(PAPER_TABLE_1), PAPER_LABELS)
    assert m.n == 74
    assert round(m.accuracy, 3) == 0.932
    assert round(m.kappa, 3) == 0.905
    for c in m.per_class:
        want = PAPER_TABLE_2[c.label]
        got = (c.sensitivity, c.specificity, c.ppv, c.npv, c.youden)
        assert [round(x, 3) for x in got] == [round(x, 3) for x in want], c.label
    lo, hi = m.kappa_ci95
    assert lo < m.kappa < hi and hi <= 1.0 and lo > 0.8
    assert m.kappa_p < 1e-10


def test_hand_computed_two_by_two():
    m = compute([[20, 5], [10, 15]], ["a", "b"])
    assert m.accuracy == pytest.approx(0.7)
    assert m.kappa == pytest.approx(0.4)  # po 0.7, pe (25*30 + 25*20)/2500 = 0.5
    a = m.per_class[0]
    assert (a.sensitivity, a.specificity, a.ppv, a.npv) == pytest.approx(
        (0.8, 0.6, 20 / 30, 15 / 20)
    )
    # standard error under kappa = 0 (Fleiss et al. 1969), by hand:
    # (pe + pe^2 - sum r c (r + c)) / (n (1 - pe)^2) = (0.75 - 0.51) / 12.5 = 0.0192
    z = m.kappa / 0.0192**0.5
    from math import erfc, sqrt

    assert m.kappa_p == pytest.approx(erfc(z / sqrt(2)), rel=1e-3)


def test_perfect_and_chance_agreement():
    assert compute(np.diag([3, 4, 5]), ["x", "y", "z"]).kappa == pytest.approx(1.0)
    assert compute([[5, 5], [5, 5]], ["x", "y"]).kappa == pytest.approx(0.0)


@pytest.mark.parametrize("bad", ["1,2;3", "a,b;c,d", ""])
def test_malformed_confusion_is_refused(bad):
    with pytest.raises(ValueError):
        compute(parse_confusion(bad), ["x", "y"])


def test_metrics_command_prints_the_paper_figures(capsys):
    assert main(["metrics", "--confusion", PAPER_TABLE_1, "--labels", ",".join(PAPER_LABELS)]) == 0
    out = capsys.readouterr().out
    assert "kappa = 0.905" in out and "accuracy = 0.932" in out
    assert main(["metrics", "--confusion", PAPER_TABLE_1, "--labels", "a,b"]) == 2
