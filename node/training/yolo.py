"""The on-disk YOLO-seg dataset that every builder writes and `idaics train` reads.

Layout (ultralytics convention)::

    DATASET/
      data.yaml            class names, splits, and the ``idaics`` block (windowing, views)
      images/{train,val}/NAME.png
      labels/{train,val}/NAME.txt    one instance per line: class x1 y1 x2 y2 ... (0..1)
      manifest.csv         per image: split, study, level, view, target class, source

The ``target`` of an image is the class of the disc (or node) the image was made for, the
unit that per-image evaluation counts, as the IDAICS paper does.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import yaml
from PIL import Image

from node.classes import CLASS_NAMES, DiscClass

MIN_AREA_PX = 25.0
MANIFEST = "manifest.csv"
MANIFEST_FIELDS = ["split", "image", "study", "level", "view", "target", "source"]


@dataclass(frozen=True)
class Instance:
    cls: DiscClass
    polygon: np.ndarray  # (n, 2) pixel coordinates x (column), y (row)


@dataclass(frozen=True)
class Sample:
    name: str
    image: np.ndarray  # uint8 greyscale (h, w)
    instances: tuple[Instance, ...]
    study: str
    level: str = ""
    view: str = ""
    target: DiscClass | None = None
    source: str = ""


def mask_polygons(mask: np.ndarray, min_area: float = MIN_AREA_PX) -> list[np.ndarray]:
    """Outer contours of a binary mask as polygons (x, y), one per connected component."""
    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    out = []
    for c in contours:
        if cv2.contourArea(c) < min_area:
            continue
        c = cv2.approxPolyDP(c, 0.8, True)
        if len(c) >= 3:
            out.append(c[:, 0, :].astype(float))
    return out


def class_map_instances(class_map: np.ndarray) -> tuple[Instance, ...]:
    """Instances from a map holding ``class_id + 1`` per pixel."""
    inst = []
    for cid, name in enumerate(CLASS_NAMES):
        for poly in mask_polygons(class_map == cid + 1):
            inst.append(Instance(DiscClass(name), poly))
    return tuple(inst)


def rasterize(
    instances: tuple[Instance, ...] | list[Instance], shape: tuple[int, int]
) -> np.ndarray:
    """The inverse of `class_map_instances`: ``class_id + 1`` per pixel."""
    out = np.zeros(shape, dtype=np.uint8)
    for inst in instances:
        cv2.fillPoly(out, [np.rint(inst.polygon).astype(np.int32)], inst.cls.class_id + 1)
    return out


@dataclass
class DatasetWriter:
    """Writes samples into the split folders and keeps the per-split class counts."""

    root: Path
    extra: dict = field(default_factory=dict)
    counts: dict[str, Counter] = field(
        default_factory=lambda: {"train": Counter(), "val": Counter()}
    )
    images: Counter = field(default_factory=Counter)
    _rows: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        for split in ("train", "val"):
            (self.root / "images" / split).mkdir(parents=True, exist_ok=True)
            (self.root / "labels" / split).mkdir(parents=True, exist_ok=True)

    def add(self, sample: Sample, split: str) -> None:
        h, w = sample.image.shape
        Image.fromarray(sample.image).save(
            self.root / "images" / split / f"{sample.name}.png", optimize=False
        )
        lines = []
        for inst in sample.instances:
            xy = np.clip(inst.polygon / [w, h], 0.0, 1.0)
            lines.append(f"{inst.cls.class_id} " + " ".join(f"{v:.5f}" for v in xy.ravel()))
            self.counts[split][inst.cls.value] += 1
        (self.root / "labels" / split / f"{sample.name}.txt").write_text(
            "\n".join(lines) + ("\n" if lines else "")
        )
        self.images[split] += 1
        self._rows.append(
            {
                "split": split,
                "image": f"images/{split}/{sample.name}.png",
                "study": sample.study,
                "level": sample.level,
                "view": sample.view,
                "target": sample.target.value if sample.target else "",
                "source": sample.source,
            }
        )

    def finish(self) -> Path:
        """Write data.yaml and the manifest; returns the data.yaml path."""
        data = {
            "path": str(self.root.resolve()),
            "train": "images/train",
            "val": "images/val",
            "names": dict(enumerate(CLASS_NAMES)),
            "idaics": self.extra
            | {
                "images": dict(self.images),
                "instances": {s: dict(c) for s, c in self.counts.items()},
            },
        }
        path = self.root / "data.yaml"
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
        os.replace(tmp, path)
        with open(self.root / MANIFEST, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS)
            wr.writeheader()
            wr.writerows(self._rows)
        return path

    def summary(self) -> str:
        """Class counts per split, as a table (the paper's Figure 1 shows the same)."""
        lines = [f"{'split':<6} {'images':>7} " + " ".join(f"{n:>11}" for n in CLASS_NAMES)]
        for split in ("train", "val"):
            c = self.counts[split]
            lines.append(
                f"{split:<6} {self.images[split]:>7} "
                + " ".join(f"{c[n]:>11}" for n in CLASS_NAMES)
            )
        return "\n".join(lines)


def split_studies(studies: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    """Assign whole studies to train or val (never both), reproducibly."""
    if not 0.0 < val_fraction <= 1.0:
        raise ValueError(
            f"val fraction must be above 0 and at most 1 (1: all held out), got {val_fraction}"
        )
    order = sorted(studies)
    rng = np.random.default_rng(seed)
    rng.shuffle(order)
    if val_fraction == 1.0:
        n_val = len(order)
    else:
        n_val = max(1, int(round(len(order) * val_fraction))) if len(order) > 1 else 0
    return {s: ("val" if i < n_val else "train") for i, s in enumerate(order)}
