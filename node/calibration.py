"""A model card's confidence calibration (fitted by `node.training.calibrate`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

EPS = 1e-4


@dataclass(frozen=True)
class Platt:
    a: float = 1.0
    b: float = 0.0

    def __call__(self, c: float) -> float:
        c = min(max(float(c), EPS), 1 - EPS)
        z = self.a * math.log(c / (1 - c)) + self.b
        return 1.0 / (1.0 + math.exp(-z))

    def to_dict(self) -> dict:
        return {"method": "platt", "a": round(self.a, 5), "b": round(self.b, 5)}


@dataclass(frozen=True)
class Calibration:
    """Platt maps of a card: one for the classes the model's vote decided, and one for those
    the 25% rule decided where the vote was weak (their raw confidence is the model's small
    vote for the rule's class, which says little of how often the rule is right). A card
    without the second map uses the first for both."""

    model: Platt
    rule: Platt | None = None

    def __call__(self, c: float, *, by_rule: bool = False) -> float:
        return (self.rule if by_rule and self.rule is not None else self.model)(c)

    @classmethod
    def from_card(cls, raw: dict | None) -> Calibration | None:
        if not raw or raw.get("method") != "platt":
            return None
        rule = raw.get("rule")
        return cls(
            Platt(float(raw["a"]), float(raw["b"])),
            Platt(float(rule["a"]), float(rule["b"])) if rule else None,
        )
