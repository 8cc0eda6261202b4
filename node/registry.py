"""Versioned models with a gate: which model is live, how each did on the frozen test split,
promotion and rollback (`idaics models ...`).

The registry is a folder (``models_dir``, under the node's home): one folder per model (its
weights and card, the card's ``version``), ``registry.json`` (the live model and the history
of every change) and ``evaluations/`` (each model's per-disc figures on the frozen test split
of the labelled cases, `node.training.from_cases`). The bundled model is always known, under
its card's name; without a ``registry.json`` it is the live one.

``promote`` refuses a candidate that did worse than the live model on the same split (lower
per-disc accuracy or kappa), unless forced; the figures and their 95% intervals are printed and
kept in the history either way. Workers look at the live model before each job, so a promotion
or a rollback takes effect at the next job without a restart.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

from node.config import Settings
from node.inference.model import ModelError, read_card

REGISTRY_FILE = "registry.json"
EVALUATIONS = "evaluations"


class GateError(ValueError):
    """A promotion or rollback the registry refuses, with the reason."""


@dataclass(frozen=True)
class SplitScore:
    """A model's per-disc figures on one frozen test split."""

    model: str
    version: str
    split: str  # fingerprint of the split's cases and their labels
    cases: tuple[str, ...]
    discs: int
    accuracy: float
    accuracy_ci95: tuple[float, float]
    kappa: float
    kappa_ci95: tuple[float, float]
    at: str

    def line(self) -> str:
        a, k = self.accuracy_ci95, self.kappa_ci95
        return (
            f"{self.model} {self.version}: accuracy {self.accuracy:.3f} ({a[0]:.3f}-{a[1]:.3f}), "
            f"kappa {self.kappa:.3f} ({k[0]:.3f}-{k[1]:.3f}) on {self.discs} discs of "
            f"{len(self.cases)} case(s)"
        )


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson 95% interval of a proportion k/n."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


class Registry:
    def __init__(self, settings: Settings) -> None:
        self.root = settings.models_dir
        self.bundled = settings.model
        self.path = self.root / REGISTRY_FILE

    # -- which models there are ---------------------------------------------------------
    def folders(self) -> dict[str, Path]:
        """Every model by name: the bundled one and each folder of the registry with a card."""
        out = {self.bundled_name: self.bundled}
        if self.root.is_dir():
            for p in sorted(self.root.iterdir()):
                if (p / "model.yaml").is_file():
                    out.setdefault(p.name, p)
        return out

    def folder(self, name: str) -> Path:
        found = self.folders()
        if name not in found:
            raise GateError(f"no model {name!r} (known: {', '.join(found)})")
        return found[name]

    def state(self) -> dict:
        if self.path.is_file():
            return dict(json.loads(self.path.read_text()))
        return {"live": self.bundled_name, "history": []}

    def live_name(self) -> str:
        return str(self.state()["live"])

    @cached_property
    def bundled_name(self) -> str:
        return read_card(self.bundled).name

    def live(self) -> Path:
        """The folder of the live model (read before each job: a file test or two)."""
        if not self.path.is_file():
            return self.bundled
        name = self.live_name()
        if (self.root / name / "model.yaml").is_file():
            return self.root / name
        if name == self.bundled_name:
            return self.bundled
        raise ModelError(f"{self.path}: the live model {name!r} is not in {self.root}")

    def shadow(self) -> Path | None:
        """The folder of the model that runs in the shadow of the live one, if any."""
        if not self.path.is_file():
            return None
        name = self.state().get("shadow")
        if not name:
            return None
        if (self.root / name / "model.yaml").is_file():
            return self.root / name
        return self.bundled if name == self.bundled_name else None

    def set_shadow(self, name: str | None) -> None:
        """Run ``name`` in the shadow of the live model from the next job on (None: stop)."""
        if name is not None:
            self.folder(name)
            if name == self.live_name():
                raise GateError(f"{name} is the live model; a shadow runs beside it")
        state = self.state()
        state["history"] = [
            *state.get("history", []),
            {
                "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "action": "shadow" if name else "shadow off",
                "live": state["live"],
                "shadow": name,
            },
        ]
        state["shadow"] = name
        self._write(state)

    def _write(self, state: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.path)

    # -- figures on the frozen split ------------------------------------------------------
    def score(self, name: str) -> SplitScore | None:
        path = self.root / EVALUATIONS / f"{name}.json"
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        return SplitScore(
            **{
                **raw,
                "cases": tuple(raw["cases"]),
                "accuracy_ci95": tuple(raw["accuracy_ci95"]),
                "kappa_ci95": tuple(raw["kappa_ci95"]),
            }
        )

    def evaluate(self, name: str, cases_root: Path, device: str | None = None) -> SplitScore:
        """Score a model on the frozen test split of the labelled cases and keep the figures."""
        from node.training.evaluate import evaluate_studies

        tests = test_cases(cases_root)
        if not tests:
            raise GateError(
                f"{cases_root}: the frozen test split holds no case yet (build a dataset from "
                "the cases first: idaics dataset build --source cases)"
            )
        folder = self.folder(name)
        card = read_card(folder)
        metrics, _ = evaluate_studies(folder, tests, device=device, progress=False)
        right = sum(metrics.confusion[i][i] for i in range(len(metrics.labels)))
        score = SplitScore(
            model=name,
            version=card.version,
            split=fingerprint(tests),
            cases=tuple(t.name for t in tests),
            discs=metrics.n,
            accuracy=metrics.accuracy,
            accuracy_ci95=wilson(right, metrics.n),
            kappa=metrics.kappa,
            kappa_ci95=metrics.kappa_ci95,
            at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        )
        out = self.root / EVALUATIONS
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(asdict(score), indent=1, default=float))
        return score

    # -- changing the live model ----------------------------------------------------------
    def promote(
        self, name: str, cases_root: Path, *, force: bool = False, device: str | None = None
    ) -> tuple[SplitScore, SplitScore, str]:
        """Make ``name`` live if it did at least as well as the live model on the current
        frozen split (both scored on it now where their figures are of another split)."""
        live = self.live_name()
        if name == live:
            raise GateError(f"{name} is already the live model")
        split = fingerprint(test_cases(cases_root))
        scores = []
        for n in (name, live):
            s = self.score(n)
            scores.append(
                s if s is not None and s.split == split else self.evaluate(n, cases_root, device)
            )
        cand, current = scores
        worse = [
            what
            for what, a, b in (
                ("accuracy", cand.accuracy, current.accuracy),
                ("kappa", cand.kappa, current.kappa),
            )
            if a < b or (math.isnan(a) and not math.isnan(b))
        ]
        overlap = (
            cand.accuracy_ci95[1] >= current.accuracy_ci95[0]
            and current.accuracy_ci95[1] >= cand.accuracy_ci95[0]
        )
        verdict = (
            f"worse than the live model in {' and '.join(worse)}"
            + (" (the 95% intervals of accuracy overlap)" if overlap else "")
            if worse
            else "at least as good as the live model"
        )
        if worse and not force:
            raise GateError(
                f"{name} not promoted: {verdict}.\n  candidate {cand.line()}\n  live      "
                f"{current.line()}\n(promote with --force to override)"
            )
        state = self.state()
        state["history"] = [
            *state.get("history", []),
            {
                "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "action": "promote",
                "live": name,
                "version": cand.version,
                "previous": live,
                "forced": bool(worse and force),
                "verdict": verdict,
                "candidate": asdict(cand),
                "was_live": asdict(current),
            },
        ]
        state["live"] = name
        self._write(state)
        return cand, current, verdict

    def rollback(self) -> str:
        """Make the model that was live before the last change live again; its name."""
        state = self.state()
        history = state.get("history", [])
        changes = [h for h in history if h.get("action") in ("promote", "rollback")]
        if not changes:
            raise GateError("nothing to roll back: the live model has never been changed")
        back = str(changes[-1]["previous"])
        self.folder(back)  # still there
        state["history"] = [
            *history,
            {
                "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "action": "rollback",
                "live": back,
                "previous": state["live"],
            },
        ]
        state["live"] = back
        if state.get("shadow") == back:
            state["shadow"] = None  # the live model has no shadow of itself
        self._write(state)
        return back


def test_cases(cases_root: Path) -> list[Path]:
    """The labelled cases of the patients in the frozen test split."""
    from node.training.from_cases import case_folders, frozen_splits, patient_of

    cases = case_folders(cases_root)
    patients = {c: patient_of(c) for c in cases}
    known = Path(cases_root) / "splits.json"
    if not known.is_file():
        return []
    splits = frozen_splits(cases_root, sorted(set(patients.values())))
    return [c for c in cases if splits[patients[c]] == "test"]


def fingerprint(cases: list[Path]) -> str:
    """Which cases, with which labels: two scores compare only on the same fingerprint."""
    h = hashlib.sha256()
    for c in sorted(cases, key=lambda p: p.name):
        h.update(c.name.encode())
        h.update((c / "truth.json").read_bytes())
    return h.hexdigest()[:16]
