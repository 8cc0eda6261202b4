"""Read and check a dataset's data.yaml before anything trains or evaluates on it."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import yaml

from node.classes import CLASS_NAMES
from node.training.yolo import MANIFEST


class DataError(ValueError):
    """A data.yaml that cannot be used, with the reason."""


@dataclass(frozen=True)
class DataSpec:
    path: Path  # the data.yaml
    root: Path
    train: Path
    val: Path
    names: tuple[str, ...]
    idaics: dict

    def images(self, split: str) -> list[Path]:
        folder = self.train if split == "train" else self.val
        return sorted(
            p
            for p in folder.iterdir()
            if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".tif"}
        )

    def manifest(self) -> dict[str, dict]:
        """Manifest rows by image path relative to the dataset root (empty if none)."""
        path = self.root / MANIFEST
        if not path.is_file():
            return {}
        with open(path, newline="") as f:
            return {row["image"]: row for row in csv.DictReader(f)}


def read_data_yaml(path: Path) -> DataSpec:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data.yaml not found")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a mapping with path, train, val and names")
    missing = [k for k in ("train", "val", "names") if k not in doc]
    if missing:
        raise DataError(f"{path}: missing {', '.join(missing)}")
    names = doc["names"]
    if isinstance(names, dict):
        try:
            names = [names[i] for i in sorted(int(k) for k in names)]
        except (KeyError, ValueError):
            raise DataError(f"{path}: names must be a list or a table of class id: name") from None
    names = tuple(str(n) for n in names)
    if names != CLASS_NAMES:
        unknown = [n for n in names if n not in CLASS_NAMES]
        why = f"unknown class names {unknown}" if unknown else f"class order {list(names)}"
        raise DataError(
            f"{path}: {why}; the four classes must be, in this order: "
            f"{', '.join(CLASS_NAMES)} (rebuild the dataset with a label mapping)"
        )
    root = Path(doc.get("path") or path.parent)
    if not root.is_absolute():
        root = (path.parent / root).resolve()
    spec = {}
    for split in ("train", "val"):
        folder = root / str(doc[split])
        if not folder.is_dir():
            raise DataError(f"{path}: {split} folder {folder} does not exist")
        spec[split] = folder
    ds = DataSpec(
        path=path,
        root=root,
        train=spec["train"],
        val=spec["val"],
        names=names,
        idaics=dict(doc.get("idaics") or {}),
    )
    return ds
