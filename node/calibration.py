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

    @classmethod
    def from_card(cls, raw: dict | None) -> Platt | None:
        if not raw or raw.get("method") != "platt":
            return None
        return cls(float(raw["a"]), float(raw["b"]))
