"""Calibrated confidence: Platt scaling of the per-disc confidence, fitted on held-out discs.

The fused confidence of a disc's class (the mean detection confidence of its slices) is not a
probability: a model trained on phantoms is sure of itself on scans it has never seen. A
two-parameter logistic map ``p = 1 / (1 + exp(-(a * logit(c) + b)))`` fitted on discs the
model did not train on turns it into the observed chance that the class is right; the
classes the 25% rule decided where the model's vote was weak get a map of their own. The fit
uses half of the evaluation studies; the expected calibration error (ECE) before and after
is measured on the other half, and the reliability diagram shows both.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from node.calibration import EPS, Calibration, Platt

BINS = 10


def fit_platt(conf: np.ndarray, correct: np.ndarray, iterations: int = 100) -> Platt:
    """Maximum-likelihood (a, b) by Newton's method, with a little ridge for stability."""
    c = np.clip(np.asarray(conf, dtype=float), EPS, 1 - EPS)
    y = np.asarray(correct, dtype=float)
    if c.size < 5 or y.min() == y.max():
        raise ValueError(
            f"calibration needs at least 5 discs with both right and wrong classes ({c.size} given)"
        )
    x = np.log(c / (1 - c))
    ridge = 1e-2

    def loss(w: np.ndarray) -> float:
        z = w[0] * x + w[1]
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * ridge * (w @ w))

    w = np.array([1.0, 0.0])
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-np.clip(w[0] * x + w[1], -30, 30)))
        g = np.array([np.sum((p - y) * x), np.sum(p - y)]) + ridge * w
        q = p * (1 - p)
        h = np.array(
            [[np.sum(q * x * x), np.sum(q * x)], [np.sum(q * x), np.sum(q)]]
        ) + ridge * np.eye(2)
        step = np.linalg.solve(h, g)
        t, now = 1.0, loss(w)
        while loss(w - t * step) > now and t > 1e-6:  # damped: never uphill
            t /= 2
        w = w - t * step
        if np.abs(t * step).max() < 1e-8:
            break
    return Platt(float(w[0]), float(w[1]))


def ece(conf: np.ndarray, correct: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: the mean |accuracy - confidence| over equal-width bins,
    weighted by the share of discs in each."""
    conf, correct = np.asarray(conf, dtype=float), np.asarray(correct, dtype=float)
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)


def split_by_study(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Half the studies (by a hash of the name) to fit on, the other half to measure on."""
    fit = [r for r in rows if zlib.crc32(r["study"].encode()) % 2 == 0]
    test = [r for r in rows if zlib.crc32(r["study"].encode()) % 2 == 1]
    return fit, test


def reliability_diagram(
    conf: np.ndarray, calibrated: np.ndarray, correct: np.ndarray, path: Path, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 4.6), dpi=110)
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfectly calibrated")
    for values, name, colour in (
        (conf, "fused confidence", "tab:red"),
        (calibrated, "calibrated", "tab:blue"),
    ):
        idx = np.minimum((np.asarray(values) * BINS).astype(int), BINS - 1)
        xs, ys = [], []
        for b in range(BINS):
            sel = idx == b
            if sel.sum() >= 3:
                xs.append(float(np.mean(np.asarray(values)[sel])))
                ys.append(float(np.mean(np.asarray(correct)[sel])))
        ax.plot(xs, ys, "o-", color=colour, label=f"{name} (ECE {ece(values, correct):.3f})")
    ax.set_xlabel("confidence")
    ax.set_ylabel("share of discs classed right")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


#: Fewest discs of one source (the model's vote, the rule) on each half for a map of its own.
MIN_DISCS_PER_SOURCE = 10


def calibrate_from_rows(rows: list[dict], out_png: Path | None = None, title: str = "") -> dict:
    """Fit on half the studies' discs, measure on the other half; the card's entry.

    The classes the model's vote decided and those the 25% rule decided (``by_rule``) get
    a map each, where each half holds at least `MIN_DISCS_PER_SOURCE` of both and the rule's
    include right and wrong ones (the rule's map is the share of its classes that was right,
    whatever the model's vote); otherwise one map serves both."""
    from node.training.evaluate import primary

    found = [r for r in rows if r["found"] and r["predicted"]]
    fit, test = split_by_study(found)

    def arrays(rs: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (
            np.array([r["confidence"] for r in rs]),
            np.array([primary(r["truth"]) == primary(r["predicted"]) for r in rs], dtype=float),
            np.array([bool(r.get("by_rule")) for r in rs]),
        )

    cf, yf, rf = arrays(fit)
    ct, yt, rt = arrays(test)
    rule: Platt | None = None
    split = min(rf.sum(), (~rf).sum(), rt.sum(), (~rt).sum()) >= MIN_DISCS_PER_SOURCE
    if split and 0 < yf[rf].mean() < 1:
        # the rule's classes: the share of them that was right (the model's small vote for
        # the class the rule chose tells little; fitted on so few discs, a slope overfits)
        share = float(np.clip(yf[rf].mean(), EPS, 1 - EPS))
        model, rule = fit_platt(cf[~rf], yf[~rf]), Platt(0.0, float(np.log(share / (1 - share))))
    else:
        model = fit_platt(cf, yf)
    cal = Calibration(model, rule)
    after = np.array([cal(c, by_rule=bool(r)) for c, r in zip(ct, rt)])
    if out_png is not None:
        reliability_diagram(ct, after, yt, out_png, title)
    entry = model.to_dict()
    if rule is not None:
        entry["rule"] = {"a": round(rule.a, 5), "b": round(rule.b, 5)}
    return entry | {
        "fitted_on_discs": int(cf.size),
        "measured_on_discs": int(ct.size),
        "measured_decided_by_rule": int(rt.sum()),
        "ece_before": round(ece(ct, yt), 4),
        "ece_after": round(ece(after, yt), 4),
        "accuracy_of_measured": round(float(yt.mean()), 4) if yt.size else None,
        "mean_confidence_before": round(float(ct.mean()), 4) if ct.size else None,
        "mean_confidence_after": round(float(after.mean()), 4) if after.size else None,
    }
