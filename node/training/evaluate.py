"""Evaluation of a model: per image on a dataset split (`idaics evaluate --data`), and per
disc level on phantom studies against their truth (`idaics evaluate --studies`).

Per image:

Each image counts once, as in the IDAICS paper. Its true class is the ``target`` of the
manifest (the disc or node the image was made for) or, without a manifest, the most
specific class among its labels. The predicted class is that of the most confident
detection covering the image centre when the image has a target, else the most specific
class detected. An image with no detection is counted under ``none``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from node.classes import CLASS_NAMES, DiscClass, most_severe
from node.training.data import read_data_yaml
from node.training.metrics import Metrics, compute, plot_confusion

NONE = "none"
CONF = 0.25


@dataclass(frozen=True)
class ImageResult:
    image: str
    truth: str
    predicted: str
    confidence: float


def _label_classes(label_file: Path) -> set[DiscClass]:
    if not label_file.is_file():
        return set()
    return {
        DiscClass(CLASS_NAMES[int(line.split()[0])])
        for line in label_file.read_text().splitlines()
        if line.strip()
    }


def predict_image_class(result: Any, centred: bool, conf: float = CONF) -> tuple[str, float]:
    """Class of one ultralytics result, by the rule in the module docstring."""
    boxes = result.boxes
    if boxes is None or len(boxes) == 0:
        return NONE, 0.0
    cls = boxes.cls.cpu().numpy().astype(int)
    confs = boxes.conf.cpu().numpy()
    keep = confs >= conf
    if not keep.any():
        return NONE, 0.0
    if centred:
        h, w = result.orig_shape
        cy, cx = h / 2, w / 2
        xyxy = boxes.xyxy.cpu().numpy()
        inside = (
            keep & (xyxy[:, 0] <= cx) & (xyxy[:, 2] >= cx) & (xyxy[:, 1] <= cy) & (xyxy[:, 3] >= cy)
        )
        if result.masks is not None and inside.any():
            m = result.masks.data.cpu().numpy()
            mh, mw = m.shape[1:]
            on = m[:, int(mh / 2), int(mw / 2)] > 0.5
            if (inside & on).any():
                inside = inside & on
        pool = np.flatnonzero(inside) if inside.any() else np.flatnonzero(keep)
        best = pool[np.argmax(confs[pool])]
        return CLASS_NAMES[cls[best]], float(confs[best])
    found = {DiscClass(CLASS_NAMES[c]) for c in cls[keep]}
    top = most_severe(found)
    return top.value, float(confs[keep][cls[keep] == top.class_id].max())


def evaluate_dataset(
    model_dir: Path,
    data_yaml: Path,
    *,
    split: str = "val",
    out: Path | None = None,
    device: str | None = None,
    batch: int = 16,
) -> tuple[Metrics, list[ImageResult]]:
    from node.inference.model import offline_ultralytics
    from node.training.train import CARD, WEIGHTS, choose_device

    data = read_data_yaml(data_yaml)
    card = (
        yaml.safe_load((Path(model_dir) / CARD).read_text())
        if (Path(model_dir) / CARD).is_file()
        else {}
    )
    weights = (
        Path(model_dir) / card.get("weights", WEIGHTS)
        if Path(model_dir).is_dir()
        else Path(model_dir)
    )
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: model weights not found")
    offline_ultralytics()
    from ultralytics import YOLO  # type: ignore[attr-defined]  # its public name, re-exported lazily

    model = YOLO(str(weights))
    imgsz = int(card.get("input_size", 512))
    manifest = data.manifest()
    images = data.images(split)
    if not images:
        raise ValueError(f"{data.path}: no {split} images")
    results: list[ImageResult] = []
    dev = choose_device(device)
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        preds = model.predict(
            [str(p) for p in chunk],
            imgsz=imgsz,
            conf=CONF,
            device=dev,
            verbose=False,
            retina_masks=False,
        )
        for path, res in zip(chunk, preds):
            rel = str(path.relative_to(data.root))
            row = manifest.get(rel, {})
            label_file = data.root / "labels" / split / (path.stem + ".txt")
            truth = row.get("target") or (
                most_severe(_label_classes(label_file)).value if _label_classes(label_file) else ""
            )
            if not truth:
                continue  # an image without any labelled disc has no class to count
            pred, c = predict_image_class(res, centred=bool(row.get("target")))
            results.append(ImageResult(rel, truth, pred, c))
    labels = list(CLASS_NAMES) + ([NONE] if any(r.predicted == NONE for r in results) else [])
    cm = np.zeros((len(labels), len(labels)), dtype=int)
    for r in results:
        cm[labels.index(r.truth), labels.index(r.predicted)] += 1
    metrics = compute(cm, labels)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(
            json.dumps(
                {"unit": "image", "split": split, "data": str(data.path), "model": str(model_dir)}
                | metrics.to_dict()
                | {"images": [r.__dict__ for r in results]},
                indent=1,
            )
        )
        plot_confusion(metrics, out / "confusion_matrix.png")
    return metrics, results


def primary(classes: Iterable[str]) -> str:
    found = {DiscClass(c) for c in classes}
    return most_severe(found).value if found else NONE


#: Size bins (mm) for sensitivity by lesion size: extension for bulges and protrusions,
#: node radius for Schmorl's nodes.
SIZE_BINS = {
    "bulge": (0.0, 3.5, 5.0, 99.0),
    "protrusion": (0.0, 4.0, 5.5, 99.0),
    "schmorl": (0.0, 3.0, 4.0, 99.0),
}


def _lesion_size(entry: dict) -> dict:
    out = {}
    ins = entry.get("inserted") or {}
    for c in ("bulge", "protrusion"):
        if c in entry["classes"]:
            out[c] = float(ins.get(c, {}).get("mm", entry.get("extension_mm", 0.0)))
    if "schmorl" in entry["classes"] and entry.get("schmorl"):
        out["schmorl"] = float(entry["schmorl"]["radius_mm"])
    return out


def _by_size(rows: list[dict]) -> dict:
    """Per class and size bin: lesions found with that class / lesions."""
    out: dict = {}
    for cls, edges in SIZE_BINS.items():
        bins = {}
        for lo, hi in zip(edges, edges[1:]):
            sel = [r for r in rows if cls in r["size_mm"] and lo <= r["size_mm"][cls] < hi]
            if sel:
                key = f"{lo:g}-{hi:g} mm" if hi < 99 else f">= {lo:g} mm"
                bins[key] = {"found": sum(cls in r["predicted"] for r in sel), "lesions": len(sel)}
        if bins:
            out[cls] = bins
    return out


def evaluate_studies(
    model_dir: Path,
    studies: list[Path],
    *,
    out: Path | None = None,
    device: str | None = None,
    centre_tolerance_mm: float = 10.0,
    progress: bool = True,
    keep_rows: bool = False,
    rule_below_vote: float | None = None,
) -> tuple[Metrics, dict]:
    """Per-disc evaluation against phantom truth, the unit a radiologist reports.

    Each truth level counts once: its class is the most specific of its classes; the
    prediction is the most specific class the analysis reports for the level of that name
    (``none`` when the level was not found or not named, or found more than
    ``centre_tolerance_mm`` away). Schmorl's nodes, which may sit beside a bulge or a
    protrusion, are also scored on their own as present or absent. ``rule_below_vote``
    overrides both of the analysis' vote thresholds, `RULE_BELOW_VOTE` and `RULE_HOLDS_VOTE`
    (see `analyze_volume`): 0 measures the model alone, above 1 the rule alone.
    """
    from tqdm import tqdm

    from node.analysis.study import RULE_BELOW_VOTE, RULE_HOLDS_VOTE, analyze_volume
    from node.analysis.volume import VolumeError, load_folder
    from node.inference.model import load_model
    from node.phantom.generate import SERIES_DIR, TRUTH_FILE

    below = RULE_BELOW_VOTE if rule_below_vote is None else rule_below_vote
    holds = RULE_HOLDS_VOTE if rule_below_vote is None else rule_below_vote
    model = load_model(model_dir, device)
    rows = []
    refused = []
    for folder in tqdm(studies, desc="studies", unit="study", disable=not progress):
        truth = json.loads((folder / TRUTH_FILE).read_text())
        try:
            result = analyze_volume(
                load_folder(folder / SERIES_DIR),
                model,
                rule_below_vote=below,
                rule_holds_vote=holds,
            )
        except VolumeError as exc:
            refused.append({"study": folder.name, "reason": str(exc)})
            continue
        for lv in truth["levels"]:
            if "unknown" in lv["classes"]:
                continue  # a real disc left as scanned: its class is not known
            centre = np.array(lv["centre_lps"])
            near = sorted(result.discs, key=lambda x: float(np.linalg.norm(x.site.centre - centre)))
            d = near[0] if near else None
            ok = (
                d is not None
                and float(np.linalg.norm(d.site.centre - centre)) <= centre_tolerance_mm
            )
            pred = [c.value for c in d.classes] if (ok and d is not None) else []
            rows.append(
                {
                    "study": folder.name,
                    "level": lv["level"],
                    "truth": lv["classes"],
                    "predicted": pred,
                    "found": ok,
                    "named": bool(ok and d is not None and d.level == lv["level"]),
                    "confidence": round(d.confidence, 3) if (ok and d is not None) else 0.0,
                    "by_rule": bool(ok and d is not None and d.findings and d.findings[0].by_rule),
                    "size_mm": _lesion_size(lv),
                    "warnings": list(d.warnings) if (ok and d is not None) else [],
                }
            )
    if not rows:
        raise ValueError("no disc level to evaluate")
    labels = list(CLASS_NAMES) + ([NONE] if any(not r["predicted"] for r in rows) else [])
    cm = np.zeros((len(labels), len(labels)), dtype=int)
    for r in rows:
        cm[labels.index(primary(r["truth"])), labels.index(primary(r["predicted"]))] += 1
    metrics = compute(cm, labels)
    node_cm = np.zeros((2, 2), dtype=int)
    for r in rows:
        node_cm[int("schmorl" in r["truth"]), int("schmorl" in r["predicted"])] += 1
    extra = {
        "levels_found": sum(r["found"] for r in rows),
        "levels_named": sum(r["named"] for r in rows),
        "sensitivity_by_size": _by_size(rows),
        "levels": len(rows),
        "exact_class_sets": sum(sorted(r["truth"]) == sorted(r["predicted"]) for r in rows),
        "schmorl_present_vs_absent": compute(node_cm[::-1, ::-1], ["present", "absent"]).to_dict(),
        "refused": refused,
        "rule_below_vote": below,
        "rule_holds_vote": holds,
    }
    if keep_rows:
        extra["discs"] = rows
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics_per_disc.json").write_text(
            json.dumps(
                {"unit": "disc level", "model": str(model_dir), "studies": len(studies)}
                | metrics.to_dict()
                | extra
                | {"discs": rows},
                indent=1,
                default=float,
            )
        )
        plot_confusion(metrics, out / "confusion_matrix_per_disc.png")
    return metrics, extra
