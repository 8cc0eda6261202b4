"""The bundled model's classes on phantoms it never trained on, checked against their truth.

The three session phantoms (seed 10; the model was trained on seed 1000) hold 18 disc
levels: 7 bulges, 8 protrusions, 1 normal disc and 2 normal discs with a Schmorl's node,
and 6 nodes in all. The test checks the disc's shape class of every level and the nodes,
and that the same check fails for a model that swaps bulge and protrusion.
"""

from __future__ import annotations

from node.classes import DiscClass

#: Least share of levels whose shape class (normal, bulge, protrusion) is right: measured
#: 16 of 18 (0.89) with the bundled model; 0.8 allows one more miss.
MIN_SHAPE_ACCURACY = 0.8
#: Bulges called protrusions and protrusions called bulges, at most (measured: none).
MAX_SWAPS = 1
#: Schmorl's nodes found of the 6 (measured: 5; 3 before the CT was read for nodes), and nodes
#: reported where there is none.
MIN_NODES_FOUND, MAX_FALSE_NODES = 2, 0


def _shape(classes) -> str:
    return next((c for c in classes if c != DiscClass.SCHMORL.value), DiscClass.NORMAL.value)


def score(pairs: list[tuple[list[str], list[str]]]) -> dict[str, float]:
    """(truth classes, predicted classes) per level -> shape accuracy, swaps, nodes."""
    shapes = [(_shape(t), _shape(p)) for t, p in pairs]
    swaps = sum(
        1 for t, p in shapes if {t, p} == {DiscClass.BULGE.value, DiscClass.PROTRUSION.value}
    )
    node = DiscClass.SCHMORL.value
    return {
        "shape_accuracy": sum(t == p for t, p in shapes) / len(shapes),
        "swaps": swaps,
        "nodes_found": sum(1 for t, p in pairs if node in t and node in p),
        "false_nodes": sum(1 for t, p in pairs if node in p and node not in t),
    }


def passes(s: dict[str, float]) -> bool:
    return (
        s["shape_accuracy"] >= MIN_SHAPE_ACCURACY
        and s["swaps"] <= MAX_SWAPS
        and s["nodes_found"] >= MIN_NODES_FOUND
        and s["false_nodes"] <= MAX_FALSE_NODES
    )


def test_the_bundled_model_classifies_held_out_phantom_discs(analysed_phantoms):
    pairs = []
    for study, _vol, result in analysed_phantoms:
        got = {d.level: [c.value for c in d.classes] for d in result.discs}
        for lv in study.truth["levels"]:
            assert lv["level"] in got, lv["level"]
            pairs.append((list(lv["classes"]), got[lv["level"]]))
    assert len(pairs) == 18
    s = score(pairs)
    assert passes(s), s
    # the same check on the predictions of a model that swaps bulge and protrusion fails
    swap = {
        DiscClass.BULGE.value: DiscClass.PROTRUSION.value,
        DiscClass.PROTRUSION.value: DiscClass.BULGE.value,
    }
    swapped = [(t, [swap.get(c, c) for c in p]) for t, p in pairs]
    assert not passes(score(swapped)), score(swapped)


def test_the_vote_below_which_the_rule_decides_is_the_one_given(analysed_phantoms):
    """`analyze_volume(..., rule_below_vote=...)`: at 0 the model decides every disc (no
    finding by the rule), above 1 the 25% rule read on the disc's margin decides every disc
    where that margin was read (its class is the disc's shape, a Schmorl's node kept beside
    it); the default decides by the rule only where the model is unsure, which on these
    phantoms leaves some discs to the model against the margin."""
    from node.analysis.study import analyze_volume
    from node.inference.model import load_model
    from tests.conftest import ROOT

    model = load_model(ROOT / "models" / "idaics-v2")
    _study, vol, default = analysed_phantoms[0]
    model_only = analyze_volume(vol, model, rule_below_vote=0.0)
    rule_only = analyze_volume(vol, model, rule_below_vote=1.01)
    assert not any(f.by_rule for d in model_only.discs for f in d.findings)
    read = [d for d in rule_only.discs if d.measurements.tissue_class is not None]
    assert read
    for d in read:
        assert _shape([c.value for c in d.classes]) == d.measurements.tissue_class.value, d.level
    disagree = [
        d
        for d in default.discs
        if d.measurements.tissue_class is not None
        and _shape([c.value for c in d.classes]) != d.measurements.tissue_class.value
    ]
    assert disagree, "the default left no disc to the model against the margin"
