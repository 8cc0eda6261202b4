"""Agreement metrics from a confusion matrix, as the IDAICS paper reports them.

Rows are the true classes, columns the predicted ones. Cohen's kappa comes with the
asymptotic standard errors of Fleiss, Cohen and Everitt (1969): the one under the
alternative for the 95% interval, the one under kappa = 0 for the p-value.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ClassMetrics:
    label: str
    support: int
    sensitivity: float
    specificity: float
    ppv: float
    npv: float
    youden: float


@dataclass(frozen=True)
class Metrics:
    labels: tuple[str, ...]
    confusion: tuple[tuple[int, ...], ...]
    n: int
    accuracy: float
    kappa: float
    kappa_ci95: tuple[float, float]
    kappa_p: float
    per_class: tuple[ClassMetrics, ...]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["confusion"] = [list(r) for r in self.confusion]
        return d

    def table(self) -> str:
        lines = [
            f"n = {self.n}   accuracy = {self.accuracy:.3f}   kappa = {self.kappa:.3f} "
            f"(95% CI {self.kappa_ci95[0]:.3f}-{self.kappa_ci95[1]:.3f}, p = {self.kappa_p:.2g})",
            "",
            "confusion (rows true, columns predicted)",
            " " * 12 + "".join(f"{lab[:10]:>11}" for lab in self.labels),
        ]
        for lab, row in zip(self.labels, self.confusion):
            lines.append(f"{lab[:11]:<12}" + "".join(f"{v:>11d}" for v in row))
        lines += [
            "",
            f"{'class':<12}{'n':>5}{'sens':>8}{'spec':>8}{'PPV':>8}{'NPV':>8}{'Youden':>8}",
        ]
        for c in self.per_class:
            lines.append(
                f"{c.label[:11]:<12}{c.support:>5}"
                + "".join(
                    f"{v:>8.3f}" if not math.isnan(v) else f"{'-':>8}"
                    for v in (c.sensitivity, c.specificity, c.ppv, c.npv, c.youden)
                )
            )
        return "\n".join(lines)


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def compute(confusion: np.ndarray | list, labels: list[str] | tuple[str, ...]) -> Metrics:
    """All metrics of a square confusion matrix with rows true and columns predicted."""
    cm = np.asarray(confusion, dtype=np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
    if cm.shape[0] != len(labels):
        raise ValueError(f"{cm.shape[0]} rows but {len(labels)} labels")
    if (cm < 0).any():
        raise ValueError("confusion matrix has negative counts")
    n = int(cm.sum())
    if n == 0:
        raise ValueError("confusion matrix is empty")
    rows = cm.sum(axis=1) / n
    cols = cm.sum(axis=0) / n
    p = cm / n
    po = float(np.trace(p))
    pe = float(rows @ cols)
    kappa = (po - pe) / (1 - pe) if pe < 1 else 1.0
    # Fleiss, Cohen & Everitt (1969) asymptotic variances.
    k = cm.shape[0]
    a = sum(p[i, i] * (1 - (rows[i] + cols[i]) * (1 - kappa)) ** 2 for i in range(k))
    b = (1 - kappa) ** 2 * sum(
        p[i, j] * (cols[i] + rows[j]) ** 2 for i in range(k) for j in range(k) if i != j
    )
    c = (kappa - pe * (1 - kappa)) ** 2
    var = max(a + b - c, 0.0) / (n * (1 - pe) ** 2) if pe < 1 else 0.0
    se = math.sqrt(var)
    var0 = (
        (pe + pe**2 - float(np.sum(rows * cols * (rows + cols)))) / (n * (1 - pe) ** 2)
        if pe < 1
        else 0.0
    )
    se0 = math.sqrt(max(var0, 0.0))
    z = kappa / se0 if se0 > 0 else float("inf")
    pval = math.erfc(abs(z) / math.sqrt(2)) if math.isfinite(z) else 0.0
    per = []
    for i, lab in enumerate(labels):
        tp = cm[i, i]
        fn = cm[i].sum() - tp
        fp = cm[:, i].sum() - tp
        tn = n - tp - fn - fp
        sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
        per.append(
            ClassMetrics(
                str(lab),
                int(tp + fn),
                sens,
                spec,
                _ratio(tp, tp + fp),
                _ratio(tn, tn + fn),
                sens + spec - 1,
            )
        )
    return Metrics(
        labels=tuple(str(x) for x in labels),
        confusion=tuple(tuple(int(v) for v in r) for r in cm),
        n=n,
        accuracy=po,
        kappa=kappa,
        kappa_ci95=(kappa - 1.96 * se, kappa + 1.96 * se),
        kappa_p=pval,
        per_class=tuple(per),
    )


def parse_confusion(text: str) -> np.ndarray:
    """Rows separated by ';', values by ',' (for example ``"19,2;2,26"``)."""
    try:
        rows = [[int(v) for v in row.split(",")] for row in text.strip().split(";") if row.strip()]
    except ValueError:
        raise ValueError(f"confusion matrix {text!r}: values must be whole numbers") from None
    if not rows or len({len(r) for r in rows}) != 1:
        raise ValueError(f"confusion matrix {text!r}: rows must all have the same length")
    return np.array(rows)


def plot_confusion(m: Metrics, path: Path) -> None:
    """The confusion matrix as a PNG (no fonts or network needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.array(m.confusion)
    fig, ax = plt.subplots(figsize=(5.5, 4.8), dpi=110)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(m.labels)), m.labels, rotation=30, ha="right")
    ax.set_yticks(range(len(m.labels)), m.labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                color="white" if cm[i, j] > cm.max() / 2 else "black",
            )
    ax.set_title(f"accuracy {m.accuracy:.3f}, kappa {m.kappa:.3f} (n={m.n})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
