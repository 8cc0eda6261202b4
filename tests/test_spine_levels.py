"""Disc levels named on many phantom studies with the anatomy of real scans.

The phantoms carry ribs (11, 12 or 13 pairs), iliac wings, a sacrum with the rudimentary
S1-S2 disc, contrast-filled vessels, osteoporotic bodies, sclerotic endplates, bridging
osteophytes, 5 mm reconstructions and fields of view that stop above the sacrum.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from node.analysis.spine import find_spine
from node.classes import VERTEBRAE
from node.phantom.generate import phantom_volume

SEED = 4100
#: 32 studies hold about 185 levels and every variant: 11, 12 and 13 rib pairs, each with
#: and without the sacrum in view, five with odd ribs and both anchors in view.
STUDIES = 32
#: A disc is named right when the name matches and the centre is this close to the truth.
TOLERANCE_MM = 10.0


def _counted(level: str, shift: int) -> str:
    """The name a count from the ribs gives ``level`` when the ribs are ``shift`` pairs off."""
    up, lo = level.split("-")
    return f"{VERTEBRAE[VERTEBRAE.index(up) + shift]}-{VERTEBRAE[VERTEBRAE.index(lo) + shift]}"


def _off_deg(disc, level: dict) -> float:
    """Degrees between a found disc's plane and the truth's."""
    cos = min(1.0, abs(float(disc.frame[:, 2] @ np.array(level["normal_lps"]))))
    return float(np.degrees(np.arccos(cos)))


def _judge(args: tuple[int, int]) -> dict:
    seed, index = args
    vol, truth = phantom_volume(seed, index)  # the series' volume, not written and read back
    spine = find_spine(vol)
    found = {d.level: d for d in spine.discs}
    sk = truth["skeleton"]
    # without the sacrum, a radiologist (and the node) counts from the lowest ribs: with 11
    # or 13 pairs every name is one level off, as the node's warning says
    shift = 0 if sk["sacrum_in_view"] else 12 - sk["rib_pairs"]
    levels = []
    for lv in truth["levels"]:
        d = found.get(_counted(lv["level"], shift))
        miss = angle = None
        if d is not None:
            miss = float(np.linalg.norm(d.centre - np.array(lv["centre_lps"])))
            angle = _off_deg(d, lv)
        levels.append((lv["level"], miss, angle))
    return {
        "index": index,
        "levels": levels,
        "warnings": spine.warnings,
        "skeleton": truth["skeleton"],
        "slice_mm": truth["scanner"]["slice_spacing_mm"],
    }


@pytest.fixture(scope="module")
def judged():
    with ProcessPoolExecutor(2) as pool:
        return list(pool.map(_judge, [(SEED, i) for i in range(STUDIES)]))


@pytest.mark.slow
def test_at_least_99_percent_of_180_phantom_levels_are_named_right(judged):
    total = sum(len(s["levels"]) for s in judged)
    wrong = [
        (s["index"], s["slice_mm"], lv, miss)
        for s in judged
        for lv, miss, _ in s["levels"]
        if miss is None or miss > TOLERANCE_MM
    ]
    angles = [a for s in judged for _, _, a in s["levels"] if a is not None]
    variants = {
        (s["skeleton"]["rib_pairs"], s["skeleton"]["sacrum_in_view"], s["slice_mm"] == 5.0)
        for s in judged
    }
    print(
        f"{total - len(wrong)}/{total} levels named right; disc plane off by median "
        f"{np.median(angles):.1f} deg, 95th percentile {np.percentile(angles, 95):.1f} deg; variants (rib pairs, sacrum in view, 5 mm): "
        f"{sorted(variants)}; wrong: {wrong}"
    )
    assert total >= 180
    assert {11, 12, 13} <= {v[0] for v in variants} and {True, False} <= {v[1] for v in variants}
    assert len(wrong) <= 0.01 * total, wrong
    assert np.percentile(angles, 95) < 15.0


@pytest.mark.slow
def test_every_study_whose_anchors_disagree_is_named_from_the_sacrum_with_a_warning(judged):
    both = [
        s
        for s in judged
        if s["skeleton"]["sacrum_in_view"] and s["skeleton"]["lowest_ribs_in_view"]
    ]
    odd = [s for s in both if s["skeleton"]["rib_pairs"] != 12]
    assert odd, "no study with 11 or 13 rib pairs and both anchors in view"
    for s in odd:
        assert any("disagree by 1 level" in w for w in s["warnings"]), (s["index"], s["warnings"])
    # with 12 pairs the anchors agree; a disc missed at the top can still make them seem not
    # to (the levels stay named from the sacrum): rare, and counted
    normal = [s for s in both if s["skeleton"]["rib_pairs"] == 12]
    false = [s["index"] for s in normal if any("disagree" in w for w in s["warnings"])]
    print(
        f"disagreement warnings on {len(false)} of {len(normal)} studies with 12 rib pairs: {false}"
    )
    assert len(false) <= 0.05 * len(normal), false


#: Studies of one seed whose series have 5 mm slices (drawn with `THICK_SLICE_RATE`).
THICK_SEED, THICK_STUDIES = 4400, (1, 2, 32, 61, 69, 71)


def _planes(args: tuple[int, int]) -> list[float | None]:
    vol, truth = phantom_volume(*args)
    assert vol.grid.spacing[0] == 5.0
    discs = find_spine(vol).discs
    out: list[float | None] = []
    for lv in truth["levels"]:
        centre = np.array(lv["centre_lps"])
        near = [d for d in discs if np.linalg.norm(d.centre - centre) <= TOLERANCE_MM]
        if not near:
            out.append(None)
            continue
        out.append(_off_deg(near[0], lv))
    return out


@pytest.mark.slow
def test_on_5_mm_slices_each_disc_keeps_the_plane_its_valley_gave():
    """On 5 mm slices the endplates' cortex no longer stands out along the normal; measured
    on them, the disc planes turned 5-25 degrees and the heights read 20 mm (the far endplate
    of a body taken for the disc's)."""
    with ProcessPoolExecutor(2) as pool:
        angles = [a for s in pool.map(_planes, [(THICK_SEED, i) for i in THICK_STUDIES]) for a in s]
    seen = [a for a in angles if a is not None]
    print(f"{len(seen)}/{len(angles)} levels found; plane off by median {np.median(seen):.1f} deg")
    assert len(angles) >= 30 and len(seen) >= 0.95 * len(angles)
    assert np.percentile(seen, 95) < 5.0, sorted(seen)
